"""``make mlrc``: the Metric Learning Reality Check protocol (Musgrave et al., 2020) end to end.

    python -m dml.mlrc --dataset cub --method gsp_contrastive [--seeds 0 1] [--devices 4]
        [--root PATH] [--epochs N] [--size PX] [-- extra CLI arguments]

For each seed, four models are trained, model k on the training classes outside fold k and
validated on fold k (``data.init_args.mlrc_fold``: 4 class-disjoint folds of the sorted
training classes), the checkpoint kept being the one of best validation MAP@R (early stopping as
the method's config sets it). The test split is touched by nothing but the final evaluation:
each fold model embeds it, and the metrics are reported

- **separated**: P@1 (= R@1), R-Precision, MAP@R and the data set's R@K of each fold model,
  as the mean and the half-width of a 95 % Student-t confidence interval over the folds (and
  seeds): mean +- t_{0.975, n-1} s / sqrt(n);
- **concatenated**: the same metrics of the four L2-normalised embeddings concatenated and
  normalised again (4 x 128 = 512-d in the MLRC setting).

Every fold is trained in its own run folder under ``runs/mlrc/<dataset>/<name>/seed<s>/
fold<k>/<fingerprint>`` (``--runs``; the fingerprint of its arguments, config files and data,
``dml.jobs``) and recorded in ``fold.json`` when it finishes: a fold finished with the same
settings is not trained again, so an interrupted protocol resumes, and one with other settings
(``--epochs``, a config edit) trains anew. A fold that fails is recorded with its reason, the
other folds and seeds go on, and the table lists the failure; its output is shown, line by
line, while it trains. One JSON line per (method, seed) goes to
``<out>/<dataset>/mlrc/runs.jsonl`` (a re-run replaces its line), and the table of every
method there to ``<out>/<dataset>/mlrc/table.md``, with the same numbers as LaTeX (booktabs,
best of each column in bold, the git commit and the command in a comment; ``dml.latex_table``)
in ``<out>/<dataset>/mlrc/table.tex``.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shlex
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from dml import jobs
from dml.child_runs import fit_args, launch
from dml.compose import config_files
from dml.errors import ConfigError
from dml.latex_table import MISSING, Cell, git_commit, plain, tabular, write_atomic
from dml.short_help import config_names

FOLDS = 4
REPORTED = ("P@1", "R-Precision", "MAP@R")


def confidence_interval(values: Sequence[float], level: float = 0.95):
    """(mean, half-width) of the Student-t interval; half-width 0 for a single value."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return float(x.mean()), 0.0
    half = stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(half)


def concatenate_normalized(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Each part L2-normalised per row, concatenated, and normalised again (MLRC's 512-d)."""
    normed = [p / np.linalg.norm(p, axis=1, keepdims=True).clip(1e-12) for p in parts]
    x = np.concatenate(normed, axis=1)
    return (x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)).astype(np.float32)


def check_names(dataset: str, method: str, backbone: Optional[str] = None) -> None:
    """A ConfigError naming the data set, method or backbone that has no config file."""
    try:
        config_files(dataset, method, backbone=backbone)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def fold_args(
    dataset: str,
    method: str,
    fold: int,
    seed: int,
    folder: str,
    extra: Sequence[str] = (),
    epochs: Optional[int] = None,
    size: Optional[int] = None,
    devices: int = 1,
    root: Optional[str] = None,
    config: Optional[str] = None,
    backbone: Optional[str] = None,
) -> List[str]:
    """The ``python -m dml fit`` arguments of fold model ``fold`` (``dml.child_runs.fit_args``)."""
    return fit_args(
        dataset,
        method,
        backbone=backbone,
        config=config,
        fold=fold,
        seed=seed,
        folder=folder,
        devices=devices,
        run_name=f"{method}-fold{fold}",
        epochs=epochs,
        size=size,
        root=root,
        extra=extra,
    )


def best_checkpoint(folder: str) -> Optional[str]:
    found = sorted(glob.glob(os.path.join(folder, "*", "checkpoints", "best-*.ckpt")))
    return found[-1] if found else None


def recorded_path(path: str) -> str:
    """``path`` as the records write it: relative to the working directory when it lies below
    it (as the recorded commands' ``--trainer.default_root_dir`` is), so that runs.jsonl
    names no user's folders; absolute otherwise."""
    full = os.path.abspath(path)
    relative = os.path.relpath(full)
    return full if relative == os.pardir or relative.startswith(os.pardir + os.sep) else relative


def fold_folder(base: str, args: Sequence[str]) -> str:
    """``base/<fingerprint>``: a fold trained with other settings (arguments, config files,
    data) never shares a folder with this one (``dml.jobs.fingerprint``)."""
    return os.path.join(base, jobs.fingerprint(args))


def train_fold(args: List[str], folder: str, label: str = "fold") -> Dict:
    """Train one fold model into ``folder`` (or find it trained there): {"status": "done",
    "checkpoint", "seconds"} or {"status": "failed", "reason"}. A failed fold is tried again
    by the next run of the job."""
    record = os.path.join(folder, "fold.json")
    if os.path.isfile(record):
        with open(record) as f:
            done = json.load(f)
        if done.get("status", "done") == "done" and os.path.isfile(done.get("checkpoint", "")):
            return dict(done, resumed=True)
    launched = launch(args, label, log=os.path.join(folder, "unit.log"))
    result = {
        "status": "done" if launched.ok else "failed",
        "seconds": launched.seconds,
        **({} if launched.ok else {"reason": launched.reason}),
    }
    result["command"] = "python -m dml " + shlex.join(args)
    if result["status"] == "done":
        checkpoint = best_checkpoint(folder)
        if checkpoint is None:
            result.update(status="failed", reason="the run wrote no best checkpoint")
        else:
            result["checkpoint"] = recorded_path(checkpoint)
    tmp = record + ".partial"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, record)
    return result


def test_embeddings(checkpoint: str, root: Optional[str]) -> Dict[str, "object"]:
    """The test split's embeddings of one fold model: {"test": set} or {"query", "gallery"}."""
    from dml.inference import Embedder

    return Embedder.from_checkpoint(checkpoint).embed_evaluation_sets(root)


def metrics_of(
    sets: Dict[str, np.ndarray], labels: Dict[str, np.ndarray], ks: Sequence[int]
) -> Dict[str, float]:
    from dml.metrics import retrieval_metrics

    if "test" in sets:
        out = retrieval_metrics(sets["test"], labels["test"], ks)
    else:
        out = retrieval_metrics(
            sets["query"],
            labels["query"],
            ks,
            gallery_embeddings=sets["gallery"],
            gallery_labels=labels["gallery"],
        )
    out["P@1"] = out["R@1"]
    return out


def evaluate(checkpoints: Sequence[str], root: Optional[str], ks: Sequence[int]) -> Dict:
    """Separated (per fold model) and concatenated metrics on the test split."""
    per_fold = [test_embeddings(c, root) for c in checkpoints]
    names = list(per_fold[0])
    labels = {n: per_fold[0][n].labels for n in names}
    for fold in per_fold[1:]:
        for n in names:
            if fold[n].paths != per_fold[0][n].paths:
                raise RuntimeError("the fold models embedded different test images")
    separated = [metrics_of({n: f[n].float32() for n in names}, labels, ks) for f in per_fold]
    concatenated = metrics_of(
        {n: concatenate_normalized([f[n].float32() for f in per_fold]) for n in names}, labels, ks
    )
    return {
        "separated": separated,
        "concatenated": concatenated,
        "dims": {
            "separated": per_fold[0][names[0]].dim,
            "concatenated": sum(f[names[0]].dim for f in per_fold),
        },
    }


def load_lines(path: str) -> List[Dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_lines(path: str, lines: List[Dict]) -> None:
    tmp = path + ".partial"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    os.replace(tmp, path)


def summary(lines: List[Dict]) -> Tuple[List[str], List[list], List[str]]:
    """(header, rows, failure notes) of the table, once for both renderers: one row per method,
    separated (mean, 95 % CI half-width) over folds x seeds and concatenated (mean, half-width
    over seeds or None for one seed), in %."""
    methods = list(dict.fromkeys(line["method"] for line in lines))
    scored = [line for line in lines if not line.get("failed")]
    ks = [k for k in scored[0]["concatenated"] if k.startswith("R@")] if scored else []
    head = (
        [f"{m} sep." for m in REPORTED]
        + [f"{m} concat." for m in REPORTED]
        + [f"{k} concat." for k in ks]
    )
    rows: List[list] = []
    notes: List[str] = []
    for method in methods:
        failed = [line for line in lines if line["method"] == method and line.get("failed")]
        mine = [line for line in lines if line["method"] == method and not line.get("failed")]
        if failed:
            notes.append(
                f"{method}: seed(s) "
                + ", ".join(f"{line['seed']} ({'; '.join(line['failed'])})" for line in failed)
                + " failed and are not in the row"
            )
        if not mine:
            rows.append([method, "failed", MISSING] + [MISSING for _ in head])
            continue
        cells: List[Cell] = []
        for metric in REPORTED:
            mean, half = confidence_interval(
                [f[metric] for line in mine for f in line["separated"]]
            )
            cells.append((100 * mean, 100 * half))
        for metric in list(REPORTED) + ks:
            mean, half = confidence_interval([line["concatenated"][metric] for line in mine])
            cells.append((100 * mean, 100 * half if len(mine) > 1 else None))
        dims = mine[0]["dims"]
        rows.append(
            [method, str(len(mine)), f"{dims['separated']} / {dims['concatenated']}", *cells]
        )
    return ["method", "seeds", "dims (sep. / concat.)", *head], rows, notes


def table(lines: List[Dict], dataset: str) -> str:
    """One row per method: separated mean +- 95 % CI over folds x seeds, concatenated."""
    header, rows, notes = summary(lines)
    text = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    text += ["| " + " | ".join(plain(c) for c in row) + " |" for row in rows]
    return (
        f"# MLRC protocol on {dataset}\n\nSeparated: mean +- half-width of the 95 % t "
        f"interval over the {FOLDS} fold models (x seeds); concatenated: the fold models' "
        f"normalised embeddings concatenated (mean +- interval over seeds when several). "
        f"In %. Made by `python -m dml.mlrc` (runs.jsonl beside this file holds every "
        f"command and checkpoint).\n\n"
        + "\n".join(text)
        + "\n"
        + ("\nFailed runs:\n" + "\n".join(f"- {n}" for n in notes) + "\n" if notes else "")
    )


def latex(lines: List[Dict], dataset: str, command: str, commit: Optional[str] = None) -> str:
    """The table of ``table`` as LaTeX (``dml.latex_table``); failures in its comment."""
    header, rows, notes = summary(lines)
    caption = (
        f"MLRC protocol on {dataset}. Separated: mean and half-width of the 95 % "
        f"Student-t interval over the {FOLDS} fold models (and seeds); concatenated: the "
        f"fold models' normalised embeddings concatenated (mean and interval over seeds "
        f"when several). In %."
    )
    extra = [
        "The table holds every method of runs.jsonl beside it; each line there holds "
        "its commands and checkpoints."
    ] + (["Failed runs:"] + notes if notes else [])
    return tabular(header, rows, caption, command, commit, extra)


def job_parser(prog: str, doc: Optional[str]) -> argparse.ArgumentParser:
    """The parser of a multi-run job (``dml.mlrc``, ``dml.tune``): its docstring as the help,
    the valid names as the epilog, and the --dataset and --method every job takes."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=doc,
        epilog=config_names(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--dataset", required=True, help="a data config: experiments/data/<dataset>.yaml"
    )
    parser.add_argument(
        "--method", required=True, help="a method config: experiments/method/<method>.yaml"
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> str:
    parser = job_parser("python -m dml.mlrc", __doc__)
    parser.add_argument(
        "--name",
        default=None,
        help="the row's name (default: the method); e.g. a variant made with extra arguments",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--root", default=None)
    parser.add_argument("--epochs", type=int, default=None, help="default: the configs'")
    parser.add_argument("--size", type=int, default=None, help="crop size; default: configs'")
    parser.add_argument("--config", default=None, help="a config file layered last (tuning)")
    parser.add_argument(
        "--backbone",
        default=None,
        help="a backbone layer (experiments/backbone/<name>.yaml, e.g. "
        "vit_s16_dino); the row is then <method>-<backbone>",
    )
    parser.add_argument(
        "--out",
        default="experiments/results",
        help="runs.jsonl and table.md go to OUT/<dataset>/mlrc/",
    )
    parser.add_argument(
        "--runs",
        default="runs/mlrc",
        help="the fold models' run folders: RUNS/<dataset>/<name>/seed<s>/fold<k>",
    )
    parser.add_argument(
        "extra", nargs=argparse.REMAINDER, help="after --: more python -m dml fit arguments"
    )
    opts = parser.parse_args(argv)
    commit = git_commit()  # before this job writes anything
    command = "python -m dml.mlrc " + shlex.join(argv if argv is not None else sys.argv[1:])
    check_names(opts.dataset, opts.method, opts.backbone)
    extra = [a for a in opts.extra if a != "--"]
    name = opts.name or (f"{opts.method}-{opts.backbone}" if opts.backbone else opts.method)
    base = os.path.join(opts.out, opts.dataset, "mlrc")
    os.makedirs(base, exist_ok=True)
    lines_path = os.path.join(base, "runs.jsonl")
    failures: List[str] = []
    for seed in opts.seeds:
        checkpoints, folds = [], []
        for fold in range(FOLDS):
            base_folder = os.path.join(
                opts.runs, opts.dataset, name.replace(" ", "_"), f"seed{seed}", f"fold{fold}"
            )
            args = fold_args(
                opts.dataset,
                opts.method,
                fold,
                seed,
                base_folder,
                extra,
                opts.epochs,
                opts.size,
                opts.devices,
                opts.root,
                opts.config,
                opts.backbone,
            )
            folder = fold_folder(base_folder, args)
            args[args.index("--trainer.default_root_dir") + 1] = folder
            done = train_fold(args, folder, f"{name} seed {seed} fold {fold}")
            if done["status"] == "done":
                took = (
                    "already trained with these settings"
                    if done.get("resumed")
                    else f"{done['seconds']} s"
                )
                print(f"{name} seed {seed} fold {fold}: {took} -> {done['checkpoint']}", flush=True)
                checkpoints.append(done["checkpoint"])
            folds.append(dict(done, fold=fold))
        line = {
            "method": name,
            "config_method": opts.method,
            "backbone": opts.backbone,
            "seed": seed,
            "dataset": opts.dataset,
            "folds": folds,
            "extra": extra,
            "config": opts.config,
            "epochs": opts.epochs,
            "size": opts.size,
        }
        failed = [f for f in folds if f["status"] != "done"]
        if failed:  # recorded, marked in the table; the other seeds go on
            line["failed"] = [f"fold {f['fold']}: {f['reason']}" for f in failed]
            failures += [f"seed {seed} {x}" for x in line["failed"]]
            print(f"{name} seed {seed}: not evaluated, {len(failed)} fold(s) failed", flush=True)
        else:
            from dml.inference.embedder import data_class_and_args, read_checkpoint

            data_class, _ = data_class_and_args(read_checkpoint(checkpoints[0]))
            ks = list(getattr(data_class, "standard_recall_ks", (1, 2, 4, 8)))
            result = evaluate(checkpoints, opts.root, ks)
            line.update(result)
            sep = {m: confidence_interval([f[m] for f in result["separated"]]) for m in REPORTED}
            print(
                f"{name} seed {seed} (test split): separated "
                + ", ".join(f"{m} {100 * v[0]:.1f} +- {100 * v[1]:.1f}" for m, v in sep.items())
                + "; concatenated "
                + ", ".join(f"{m} {100 * result['concatenated'][m]:.1f}" for m in REPORTED),
                flush=True,
            )
        lines = [x for x in load_lines(lines_path) if (x["method"], x["seed"]) != (name, seed)] + [
            line
        ]
        write_lines(lines_path, lines)
    lines = load_lines(lines_path)
    text = table(lines, opts.dataset)
    write_atomic(os.path.join(base, "table.md"), text)
    tex = os.path.join(base, "table.tex")
    write_atomic(tex, latex(lines, opts.dataset, command, commit))
    print(text)
    print(f"LaTeX table: {tex}", flush=True)
    if failures:
        raise RuntimeError(
            f"{len(failures)} fold run(s) failed ({'; '.join(failures)}); "
            f"the others are in {base}/table.md, which lists the failures"
        )
    return text


if __name__ == "__main__":
    from dml.console import run_command

    run_command(main, (ConfigError, RuntimeError))
