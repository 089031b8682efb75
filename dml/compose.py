"""How a run's configuration is composed from the files under ``experiments/``: the one rule,
used by ``make train``, ``dml.reproduce`` and the tests.

For a data set D and a method M, in this order (later files override earlier ones; the ones in
brackets only where they exist):

    trainer.yaml                     epochs, loggers, checkpoints
    data/D.yaml                      the DataModule, image size, a small default model
    [protocol/P.yaml]                the evaluation protocol M's family follows on D (MLRC for
                                     CCP and GSP on the four benchmarks: backbone, 128-d, Adam)
    method/M.yaml                    the method's switches and defaults
    [family/F/G.yaml]                settings M's family F shares on D's group G (small: CUB,
                                     Cars; large: SOP, In-Shop; omniglot: both Omniglot sets)
    [family/F/D.yaml]                F's settings for D alone
    [method/M/D.yaml]                M's own settings for D (e.g. CCP's margins per data set)
    [backbone/B.yaml]                with a backbone B named: its network, embedding size,
    [backbone/B/G.yaml]              optimizer and schedule (e.g. vit_s16_dino: the ViT-S/16
    [backbone/B/D.yaml]              DINO setting of the recent literature), over everything

so that a setting shared by several methods or data sets is written once.

    python -m dml.compose DATASET METHOD [BACKBONE]   # prints --config arguments (make train)
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Dict, List, Optional, Sequence

from dml.errors import ConfigError

ROOT = "experiments"
# Methods that share per-data-set settings.
FAMILIES: Dict[str, Sequence[str]] = {
    "ccp": ("ccp_c1", "ccp_c2", "ccp_ms", "ccp_triplet"),
    "gsp": ("gsp_contrastive", "gsp_proxy_anchor"),
    "memory": ("xbm", "xbn", "adaptive_xbn", "none_memory"),
}
# Data sets that share settings within a family.
GROUPS: Dict[str, str] = {
    "cub": "small",
    "cars": "small",
    "sop": "large",
    "inshop": "large",
    "omniglot": "omniglot",
    "omniglot_small": "omniglot",
}
# The evaluation protocol a family follows on a group of data sets.
PROTOCOLS: Dict[str, Dict[str, str]] = {
    "ccp": {"small": "mlrc", "large": "mlrc"},
    "gsp": {"small": "mlrc", "large": "mlrc"},
}


def family_of(method: str) -> Optional[str]:
    return next((f for f, members in FAMILIES.items() if method in members), None)


def names(kind: str, root: str = ROOT) -> List[str]:
    """The data sets ("data"), methods ("method") or backbones ("backbone") that have a config
    file."""
    folder = os.path.join(root, kind)
    if not os.path.isdir(folder):
        return []
    return sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml"))


def config_files(
    dataset: str, method: str, root: str = ROOT, backbone: Optional[str] = None
) -> List[str]:
    """The config files of (dataset, method[, backbone]), in composition order."""
    for kind, name in (("data", dataset), ("method", method)) + (
        (("backbone", backbone),) if backbone else ()
    ):
        if not os.path.isfile(os.path.join(root, kind, f"{name}.yaml")):
            raise ValueError(
                f"no config {root}/{kind}/{name}.yaml. Data sets: "
                f"{' '.join(names('data', root))}; methods: "
                f"{' '.join(names('method', root))}; backbones: "
                f"{' '.join(names('backbone', root)) or 'none'}"
            )
    family, group = family_of(method), GROUPS.get(dataset)
    protocol = PROTOCOLS.get(family, {}).get(group) if family and group else None
    candidates = [
        ("trainer.yaml", True),
        (f"data/{dataset}.yaml", True),
        (f"protocol/{protocol}.yaml", protocol is not None),
        (f"method/{method}.yaml", True),
        (f"family/{family}/{group}.yaml", family is not None and group is not None),
        (f"family/{family}/{dataset}.yaml", family is not None),
        (f"method/{method}/{dataset}.yaml", True),
        (f"backbone/{backbone}.yaml", bool(backbone)),
        (f"backbone/{backbone}/{group}.yaml", bool(backbone) and group is not None),
        (f"backbone/{backbone}/{dataset}.yaml", bool(backbone)),
    ]
    files = []
    for path, applies in candidates:
        full = os.path.join(root, path)
        if applies and os.path.isfile(full):
            files.append(full)
    return files


def config_args(
    dataset: str, method: str, root: str = ROOT, backbone: Optional[str] = None
) -> List[str]:
    """``--config FILE`` for each file, as the CLI takes them."""
    return [a for f in config_files(dataset, method, root, backbone) for a in ("--config", f)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) not in (2, 3):
        print("usage: python -m dml.compose DATASET METHOD [BACKBONE]", file=sys.stderr)
        return 2
    try:
        print(" ".join(config_args(argv[0], argv[1], backbone=argv[2] if len(argv) > 2 else None)))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())


# --- layering: dicts merge key by key ---------------------------------------------------------
# jsonargparse replaces a dict-typed value as a whole when a later file (or a dotted command-line
# key) sets part of it: a data-set file with ``pooling: {params: {num_prototypes: 128}}`` would
# drop the method's gamma. The CLI therefore merges the config files itself, dicts key by key
# (lists and scalars are replaced), and folds dotted overrides that reach into such a dict
# (``--model.loss.params.margin 0.3``) into the merge.
DICT_KEYS = (
    "model.terms",
    "model.pooling.params",
    "model.loss.params",
    "model.loss.miner_params",
    "model.memory.params",
    "model.memory.loss_params",
    "model.memory.miner_params",
)


# (what a mapping selects, the arguments that belong to that choice): a layer that selects
# another pooling, loss, miner or memory class drops the arguments of the one before
CHOICE_ARGUMENTS = (
    ("name", "params"),
    ("miner", "miner_params"),
    ("loss", "loss_params"),
    ("implementation", "params"),
)


def deep_merge(base: dict, update: dict) -> dict:
    """``update`` merged into ``base`` in place: nested dicts merge, anything else replaces; a
    dict naming another ``class_path`` replaces the old one (its init_args belong to the old
    class), as jsonargparse does, and one naming another pooling, loss, miner or memory
    (``CHOICE_ARGUMENTS``) drops the old one's arguments."""
    for key, value in update.items():
        old = base.get(key)
        other_class = (
            isinstance(value, dict)
            and isinstance(old, dict)
            and "class_path" in value
            and value.get("class_path") != old.get("class_path")
        )
        if isinstance(value, dict) and isinstance(old, dict) and not other_class:
            for choice, arguments in CHOICE_ARGUMENTS:
                if (
                    isinstance(value.get(choice), str)
                    and value[choice] != old.get(choice)
                    and arguments not in value
                ):
                    old.pop(arguments, None)
            deep_merge(old, value)
        else:
            base[key] = value
    return base


def _set_dotted(tree: dict, dotted: str, value) -> None:
    """``tree[a][b][c] = value`` for ``a.b.c``, merged as a layer of its own would be."""
    update: Any = value
    for name in reversed(dotted.split(".")):
        update = {name: update}
    deep_merge(tree, update)


def load_yaml_file(path: str):
    """A config file's content; a ConfigError naming the file, line and column where it is not
    valid YAML, and where its top level is not a mapping of keys."""
    import yaml

    try:
        with open(path) as f:
            content = yaml.safe_load(f)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if content is not None and not isinstance(content, dict):
        raise ConfigError(
            f"{path}: expected a mapping of config keys (model:, data:, "
            f"trainer:, ...), got a {type(content).__name__}"
        )
    return content or {}


def merge_config_args(argv: Sequence[str], folder: str):
    """(new argv, merged file or None): the ``--config`` files of a subcommand's arguments
    merged into one file in ``folder``, in their order, with the overrides folded in where
    their order matters: a dotted override into ``DICT_KEYS`` (``--model.loss.params.margin
    0.3``) always, any other ``--key value`` when a config file comes after it (``make train
    ARGS='--config layer.yaml'`` puts one after ``--trainer.devices``). Overrides after the last
    file stay on the command line, after the merged file. Arguments are left as they are when
    there is at most one file and nothing to fold, when a file is missing (the CLI names it),
    or when an argument that cannot be folded (``--trainer.callbacks+=...``, ``--print_config``)
    comes before a file. Flags without a value (``FLAGS``: ``--zero-shot``) stay where they
    are."""
    import yaml

    argv = list(argv)
    last_config = max(
        (i for i, a in enumerate(argv) if a in ("--config", "-c") or a.startswith("--config=")),
        default=-1,
    )
    layers: List[tuple] = []  # ("file", path) | ("set", dotted key, value), in order
    rest: List[str] = []
    contents: Dict[str, dict] = {}
    at: Optional[int] = None  # where the merged file goes in ``rest``
    i = 0
    while i < len(argv):
        arg = argv[i]
        key, value = (arg.split("=", 1) + [None])[:2] if arg.startswith("--") else (arg, None)
        has_next = i + 1 < len(argv)
        if key in FLAGS and value is None:  # takes no value: it stays as it is, anywhere
            rest.append(arg)
            i += 1
            continue
        if key in ("--config", "-c"):
            path = value if value is not None else (argv[i + 1] if has_next else None)
            if path and os.path.isfile(path):
                contents[path] = load_yaml_file(path)  # a syntax error names the file
            layers.append(("file", path))
            at = len(rest) if at is None else at
            i += 1 if value is not None else 2
            continue
        dotted = key[2:] if key.startswith("--") else None
        into_dict = dotted and any(dotted.startswith(k + ".") for k in DICT_KEYS)
        if dotted and (into_dict or i < last_config):
            raw = value if value is not None else (argv[i + 1] if has_next else None)
            if (
                not FOLDABLE.match(dotted)
                or raw is None
                or (value is None and raw.startswith("--"))
            ):
                if into_dict:
                    raise ConfigError(f"--{dotted}: expected a value")
                return argv, None  # cannot be folded and comes before a file: keep the order
            try:
                layers.append(("set", dotted, yaml.safe_load(raw)))
            except yaml.YAMLError as error:
                raise ConfigError(
                    f"--{dotted}: not a valid YAML value: {raw!r} ({str(error).splitlines()[0]})"
                ) from None
            at = len(rest) if at is None else at
            i += 1 if value is not None else 2
            continue
        rest.append(arg)
        i += 1
    files = [layer[1] for layer in layers if layer[0] == "file"]
    if len(layers) < 2 or any(f is None or not os.path.isfile(f) for f in files):
        return argv, None
    merged: dict = {}
    for layer in layers:
        if layer[0] == "file":
            deep_merge(merged, contents[layer[1]])
        else:
            _set_dotted(merged, layer[1], layer[2])
    os.makedirs(folder, exist_ok=True)
    import tempfile

    handle, path = tempfile.mkstemp(prefix="composed-", suffix=".yaml", dir=folder)
    with os.fdopen(handle, "w") as f:
        yaml.safe_dump(merged, f, sort_keys=False)
    return rest[:at] + ["--config", path] + rest[at:], path


# flags that take no value (``test --zero-shot``): left on the command line wherever they are
FLAGS = ("--zero-shot",)

# an override that can be a key of the merged file: dotted words (not ``key+=``, not a
# top-level action such as --print_config or --help)
FOLDABLE = re.compile(r"^(?!print_config$|help$)[A-Za-z_][\w]*(\.[A-Za-z_0-9][\w]*)*$")


SUBCOMMAND_WORDS = ("fit", "validate", "test", "predict")
