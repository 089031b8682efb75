"""Method comparison on real Omniglot (train small1, test the 3 unseen alphabets), same budget.

Each variant is a method config plus optional overrides; each runs for every seed with the
same epochs and batches, and the last validation metrics are collected. Prints one JSON line a
run and a Markdown table of mean +- std.

    python benchmarks/omniglot_compare.py --suite pooling --epochs 4 --seeds 0 1 2
    python benchmarks/omniglot_compare.py --suite memory --epochs 4 --seeds 0 1 2
    python benchmarks/omniglot_compare.py --suite ccp --epochs 8 --seeds 0 1 2

The ccp suite validates after every epoch (CCP's rounds end on a validation plateau), with and
without CCP alike, and reports the rounds and the seconds each proxy re-pick took.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

# The XBM paper's memory term (summed loss, weight 1, from step 50), which the Omniglot memory
# family no longer defaults to (experiments/family/memory/omniglot.yaml): these rows keep it.
PAPER = ["--model.memory.loss", "null", "--model.memory.weight", "1.0"]
LATE_MEMORY = PAPER + ["--model.memory.start_iteration", "340"]
SUITES = {
    "pooling": {
        "GAP (contrastive)": ("contrastive", []),
        "GSP (contrastive)": (
            "gsp_contrastive",
            ["--model.zero_shot.weight", "0", "--model.zero_shot.metric_weight", "1"],
        ),
        "GSP + zero-shot (contrastive)": ("gsp_contrastive", []),
    },
    "memory": {  # batches of 4 classes x 4 (family/memory/omniglot.yaml), the paper's memory
        "no memory": ("none_memory", []),
        "XBM": ("xbm", PAPER),
        "XBN": ("xbn", PAPER),
        "adaptive XBN": ("adaptive_xbn", PAPER),
        # the memory switched on half-way (step 340 of 680), once the network has learned
        "XBM, memory from step 340": ("xbm", LATE_MEMORY),
        "XBN, memory from step 340": ("xbn", LATE_MEMORY),
    },
}
# Without CCP: the same pair loss on the batch alone (the paper's baselines).
NO_CCP = ["--model.loss.proxies_per_class", "0", "--ccp.enabled", "false"]
# CCP on a CPU budget: a round ends after one validation without gain.
CCP = ["--ccp.patience", "1"]
for label, method in [
    ("C1", "ccp_c1"),
    ("C2", "ccp_c2"),
    ("MS", "ccp_ms"),
    ("triplet", "ccp_triplet"),
]:
    SUITES.setdefault("ccp", {})[label] = (method, NO_CCP)
    SUITES["ccp"][f"{label}-CCP"] = (method, CCP)
    # Rounds on a schedule (a gain below min_delta does not count): one every 2 validations,
    # so that re-picks and the proximal term act within a short budget.
    SUITES["ccp"][f"{label}-CCP, a round every 2 epochs"] = (
        method,
        CCP + ["--ccp.min_delta", "1.0"],
    )
VALIDATE_EVERY_EPOCH = {"ccp"}


def run(method, extra, seed, epochs, dataset, val_every=None, size=None, root=None):
    from dml.callbacks import ChanceConstraintProjection
    from dml.reproduce import run_args, run_once

    metrics, trainer = run_once(
        run_args(dataset, method, extra, seed, epochs, size, val_every, root=root)
    )
    ccp = [c for c in trainer.callbacks if isinstance(c, ChanceConstraintProjection)]
    extra_info = {}
    if ccp and ccp[0].enabled:
        extra_info = {
            "ccp_rounds": ccp[0].round,
            "reinit_seconds": [round(h["seconds"], 2) for h in ccp[0].history],
        }
    return metrics, extra_info


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dataset", default="omniglot_small")
    parser.add_argument("--suite", choices=sorted(SUITES), default="pooling")
    parser.add_argument(
        "--size", type=int, default=None, help="image size (default: the data config's, 64 px)"
    )
    parser.add_argument(
        "--variants", nargs="+", default=None, help="run only these variants of the suite"
    )
    parser.add_argument(
        "--root", default=None, help="the data set's folder (default: the config's, data/omniglot)"
    )
    parser.add_argument(
        "--merge", default=None, help="a log of earlier JSON lines (same settings) to table with"
    )
    args = parser.parse_args()
    results = {}
    if args.merge:
        for line in open(args.merge):
            if line.startswith("{"):
                row = json.loads(line)
                results.setdefault(row["variant"], []).append(row)
    for name, (method, extra) in SUITES[args.suite].items():
        if args.variants and name not in args.variants:
            continue
        for seed in args.seeds:
            start = time.perf_counter()
            metrics, info = run(
                method,
                extra,
                seed,
                args.epochs,
                args.dataset,
                1 if args.suite in VALIDATE_EVERY_EPOCH else None,
                args.size,
                args.root,
            )
            results.setdefault(name, []).append(metrics)
            print(
                json.dumps(
                    {
                        "variant": name,
                        "seed": seed,
                        **metrics,
                        **info,
                        "seconds": round(time.perf_counter() - start, 1),
                    }
                ),
                flush=True,
            )
    keys = ["R@1", "MAP@R", "R-Precision", "NMI"]
    size = f", {args.size} px" if args.size else ""
    print(
        f"\n| variant ({args.dataset}{size}, {args.epochs} epochs, seeds {args.seeds}) | "
        + " | ".join(keys)
        + " |"
    )
    print("|---|" + "---|" * len(keys))
    for name, runs in results.items():
        cells = []
        for k in keys:
            values = [100 * r[k] for r in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.1f} +- {spread:.1f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
