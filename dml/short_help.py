"""The short ``python -m dml fit|validate|test --help``: how a run is composed and every valid
name (data sets, methods, backbones, poolings, losses). ``--help-all`` prints LightningCLI's
full list of keys with their defaults."""

from __future__ import annotations

import glob
import os
import textwrap
from typing import List

EXPERIMENTS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"
)


def _names(folder: str) -> List[str]:
    paths = glob.glob(os.path.join(EXPERIMENTS, folder, "*.yaml"))
    return sorted(os.path.splitext(os.path.basename(p))[0] for p in paths)


def _line(label: str, names: List[str], where: str) -> str:
    body = " ".join(names) + f"  ({where})"
    return textwrap.fill(
        body, width=100, initial_indent=f"  {label:<11}", subsequent_indent=" " * 13
    )


MAKE_LINE = {
    "fit": "       make train DATASET=NAME METHOD=NAME [BACKBONE=NAME] [ARGS='--KEY VALUE ...']",
    "test": "       python -m dml test --config runs/RUN/config.yaml --ckpt_path CHECKPOINT\n"
    "       make zero-shot DATASET=NAME [BACKBONE=NAME]   (the untrained backbone)",
    "validate": "       python -m dml validate --config runs/RUN/config.yaml "
    "--ckpt_path CHECKPOINT",
}
SUBCOMMANDS = (
    "  fit | validate | test    train, or score a checkpoint (LightningCLI; --help for each)",
    "  embed | index | search | export    use a trained checkpoint (docs/usage.md)",
    "  compare                  two models on the same queries, with intervals and p-values",
)


def config_names() -> str:
    """The valid data set, method and backbone names (the epilog of dml.tune and dml.mlrc)."""
    return "\n".join(
        [
            "valid names:",
            _line("data sets", _names("data"), "experiments/data, --dataset"),
            _line("methods", _names("method"), "experiments/method, --method"),
            _line("backbones", _names("backbone"), "experiments/backbone, --backbone"),
        ]
    )


def top_help() -> str:
    """``python -m dml --help``: every subcommand."""
    return "\n".join(
        [
            "usage: python -m dml SUBCOMMAND ...   (python -m dml SUBCOMMAND --help for each)",
            "",
            "subcommands:",
            *SUBCOMMANDS,
            "",
            "also: python -m dml.tune (Optuna search), python -m dml.mlrc, python -m dml.compose,",
            "python -m dml.data.download; `make help` lists the make targets.",
        ]
    )


def short_help(subcommand: str) -> str:
    from dml.builder import POOLINGS
    from dml.losses.factory import LOSSES
    from dml.models.backbones import BACKBONES

    return "\n".join(
        [
            f"usage: python -m dml {subcommand} --config FILE [--config FILE ...] "
            "[--KEY VALUE ...]",
            MAKE_LINE.get(subcommand, ""),
            "",
            "Config files layer in order, dicts merged key by key; `python -m dml.compose DATASET",
            "METHOD [BACKBONE]` prints the files of a data set and method: trainer, data,",
            "[protocol], method, [family], [method on data], [backbone].",
            "",
            "valid names:",
            _line("data sets", _names("data"), "experiments/data, DATASET="),
            _line("methods", _names("method"), "experiments/method, METHOD="),
            _line("backbones", _names("backbone"), "experiments/backbone, BACKBONE="),
            _line("networks", sorted(BACKBONES) + ["timm:<any timm model>"], "model.backbone.name"),
            _line("poolings", sorted(POOLINGS), "model.pooling.name"),
            _line("losses", sorted(LOSSES), "model.loss.name"),
            "",
            "common keys:",
            "  --trainer.max_epochs N   --trainer.devices N   --model.optimizer.lr X",
            "  --data.init_args.root DIR   --run_name NAME   --seed_everything N",
            "  --ckpt_path FILE   (fit: resume in its run folder; test/validate: the model scored)",
            "  --zero-shot        (test: the backbone's pooled features, no training, no head)",
            "",
            "--print_config: the composed config, every key with the value this run would use",
            "  (make train DATASET=cub METHOD=xbm ARGS=--print_config); --help-all: every key",
            "  with its class's default (long). docs/usage.md explains them.",
        ]
    )
