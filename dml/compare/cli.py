"""``python -m dml compare A B``: is B better than A on the same queries, or is it chance?

    python -m dml compare A B [--gallery A_GALLERY B_GALLERY] [--unit query|class]
        [--resamples 10000] [--level 0.95] [--seed 0] [--ks 1 2 4 8] [--root PATH]
        [--mlrc-seed S] [--out DIR]

A and B: two embeddings files of the same split (``python -m dml embed CKPT --split test``),
two checkpoints (each embeds its data set's test split), or two MLRC folders
(``runs/mlrc/<data set>/<name>``: the concatenated fold models). Prints each metric of both,
B - A with its paired bootstrap interval and p-value, and McNemar's test of R@1; with ``--out``
also writes compare.json, per_class.csv, queries.csv and report.html there. Bad input is one
line naming the file, exit status 2.
"""

from __future__ import annotations

import argparse
import os
from typing import List, Optional

from dml.errors import ConfigError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dml compare", allow_abbrev=False, description=__doc__.split("\n")[0]
    )
    p.add_argument("a", help="model A: .npz embeddings, .ckpt, or an MLRC folder")
    p.add_argument("b", help="model B, of any of the three kinds, on the same split")
    p.add_argument(
        "--gallery",
        nargs=2,
        metavar=("A_GALLERY", "B_GALLERY"),
        help="embeddings files: the galleries A's and B's queries search (In-Shop)",
    )
    p.add_argument(
        "--unit",
        choices=("query", "class"),
        default="query",
        help="what the bootstrap resamples: queries, or whole classes (their "
        "queries share references and are not independent)",
    )
    p.add_argument("--resamples", type=int, default=10000)
    p.add_argument("--level", type=float, default=0.95, help="the interval's confidence")
    p.add_argument("--seed", type=int, default=0, help="the bootstrap's random seed")
    p.add_argument(
        "--ks",
        type=int,
        nargs="+",
        default=None,
        help="the Ks of Recall@K (default: the data set's)",
    )
    p.add_argument("--root", help="checkpoints, MLRC folders: the data set's folder")
    p.add_argument(
        "--mlrc-seed",
        type=int,
        default=None,
        help="MLRC folders: the seed whose fold models are compared (default: the "
        "smallest with all folds)",
    )
    p.add_argument(
        "--trust-module",
        action="append",
        default=[],
        metavar="MODULE",
        help="checkpoints: import classes of this module that they name",
    )
    p.add_argument(
        "--out", help="a folder for compare.json, per_class.csv, queries.csv and report.html"
    )
    return p


def run(args) -> str:
    from dml.compare.inputs import load_model
    from dml.compare.paired import compare_models
    from dml.compare.report import summary, write_outputs
    from dml.metrics.significance import minimum_resamples

    if not 0 < args.level < 1:
        raise ConfigError(f"--level {args.level}: expected a confidence in (0, 1)")
    if args.resamples < minimum_resamples(args.level):
        raise ConfigError(
            f"--resamples {args.resamples}: a {100 * args.level:g} % interval "
            f"needs at least {minimum_resamples(args.level)} resamples (one in "
            f"each tail); 10000 is the default"
        )
    if args.seed < 0:
        raise ConfigError(f"--seed {args.seed}: expected a non-negative integer")
    if args.ks is not None and min(args.ks) < 1:
        raise ConfigError(f"--ks {args.ks}: expected positive integers")
    if args.out and os.path.isfile(args.out):
        raise ConfigError(f"--out {args.out}: is a file; name a folder")
    galleries = args.gallery or (None, None)
    a, b = (
        load_model(path, gallery, args.root, args.mlrc_seed, args.trust_module)
        for path, gallery in zip((args.a, args.b), galleries)
    )
    try:
        comparison = compare_models(a, b, args.ks, args.unit, args.resamples, args.level, args.seed)
    except ConfigError:
        raise
    except ValueError as error:  # e.g. no query with a relevant reference
        raise ConfigError(f"{args.a}, {args.b}: {error}") from None
    text = summary(comparison)
    print(text)
    if args.out:
        written = write_outputs(comparison, args.out)
        print("written: " + ", ".join(written))
    return text


def main(argv: Optional[List[str]] = None) -> int:
    from dml.errors import one_line_errors
    from dml.quiet import quiet_known_noise

    quiet_known_noise()
    return one_line_errors(run, parser().parse_args(argv))
