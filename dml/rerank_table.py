"""What re-ranking gives each model: a Markdown table of the plain and re-ranked test metrics.

    python -m dml.rerank_table MODEL [MODEL ...] [--root PATH] [--rerank k_reciprocal alpha_qe]
        [--param k_reciprocal.k1=20 ...] [--out table.md]

Each MODEL is what ``python -m dml compare`` takes (an embeddings file, a checkpoint, an MLRC
folder: its concatenated fold models). Every row is scored by the same exact evaluator and tie
rule (``results_from_distances``); the re-ranked rows stand beside the plain one.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from dml.atomic_files import write_text_atomic
from dml.errors import ConfigError

METRICS = ("R@1", "MAP@R", "R-Precision")


def rows_for(model, names: Sequence[str], params: Dict[str, Dict]) -> List[Dict]:
    from dml.compare.paired import results_of
    from dml.metrics.retrieval import results_from_distances
    from dml.reranking import DEFAULTS, rerank

    ks = model.recall_ks
    out = [dict(results_of(model, ks).metrics(ks), variant="plain", seconds=None)]
    query = torch.from_numpy(model.query.float32())
    gallery = None if model.gallery is None else torch.from_numpy(model.gallery.float32())
    for name in names:
        start = time.perf_counter()
        reranked = rerank(name, query, gallery, **params.get(name, {}))
        results = results_from_distances(
            reranked, model.query.labels, None if model.gallery is None else model.gallery.labels
        )
        settings = ", ".join(
            f"{k} {v:g}" for k, v in dict(DEFAULTS[name], **params.get(name, {})).items()
        )
        out.append(
            dict(
                results.metrics(ks),
                variant=f"{name} ({settings})",
                seconds=time.perf_counter() - start,
            )
        )
    return out


def labels_of(paths: Sequence[str]) -> List[str]:
    """Each model's row label: its file or folder name, or the path as given where two names
    are the same."""
    names = [os.path.basename(os.path.normpath(p)).replace("_", " ") for p in paths]
    return [n if names.count(n) == 1 else p for n, p in zip(names, paths)]


def markdown(table: Dict[str, List[Dict]], command: str, split: str = "test") -> str:
    lines = [
        "| model | variant | " + " | ".join(METRICS) + " | seconds |",
        "|---|---|" + "---|" * (len(METRICS) + 1),
    ]
    for model, rows in table.items():
        for row in rows:
            cells = " | ".join(f"{100 * row[m]:.1f}" for m in METRICS)
            took = "" if row["seconds"] is None else f"{row['seconds']:.1f}"
            lines.append(f"| {model} | {row['variant']} | {cells} | {took} |")
    return (
        f"The {split} split, in %; re-ranked rows from the same exact evaluator and tie "
        f"rule. Made by `{command}`.\n\n" + "\n".join(lines) + "\n"
    )


def parse_params(pairs: Sequence[str]) -> Dict[str, Dict[str, float]]:
    params: Dict[str, Dict[str, float]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        name, dot, arg = key.partition(".")
        try:
            number = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            sep = ""
        if not (sep and dot and arg):
            raise ConfigError(f"--param {pair}: expected NAME.KEY=NUMBER, e.g. k_reciprocal.k1=20")
        params.setdefault(name, {})[arg] = number
    return params


def main(argv: Optional[Sequence[str]] = None) -> str:
    from dml.compare.inputs import load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("models", nargs="+")
    p.add_argument("--root")
    p.add_argument("--rerank", nargs="+", default=["k_reciprocal", "alpha_qe"])
    p.add_argument("--param", action="append", default=[], metavar="NAME.KEY=VALUE")
    p.add_argument("--out")
    args = p.parse_args(argv)
    params = parse_params(args.param)
    from dml.reranking import settings

    for name in set(args.rerank) | set(params):
        try:
            settings(name, params.get(name))
        except ValueError as error:
            raise ConfigError(f"--rerank / --param: {error}") from None
    if args.out and os.path.isdir(args.out):
        raise ConfigError(f"--out {args.out}: is a folder; name the table's file")
    table, splits = {}, set()
    for path, name in zip(args.models, labels_of(args.models)):
        model = load_model(path, root=args.root)
        splits.add(str(model.query.meta.get("split", "test")))
        try:
            table[name] = rows_for(model, args.rerank, params)
        except ValueError as error:  # e.g. no query with a relevant reference
            raise ConfigError(f"{path}: {error}") from None
        print(
            f"{name}: "
            + "; ".join(
                f"{r['variant']} R@1 {100 * r['R@1']:.1f} MAP@R {100 * r['MAP@R']:.1f}"
                for r in table[name]
            ),
            flush=True,
        )
    command = "python -m dml.rerank_table " + shlex.join(
        sys.argv[1:] if argv is None else list(argv)
    )
    text = markdown(table, command, " and ".join(sorted(splits)))
    if args.out:
        write_text_atomic(args.out, text)
    print(text)
    return text


if __name__ == "__main__":
    from dml.console import run_command

    run_command(main, (ConfigError,))
