"""What the cross-batch memory does during training, XBM against XBN, on the Omniglot subsets.

Each variant trains one model through the CLI on MLRC fold 0 of the training classes (the
tuning split; the test split is never built) with the training diagnostics logged every 10 steps
and the memory's drift measured every 50 (``dml.callbacks.MemoryDrift``); the logged series are
drawn into one figure (share of active stored negatives, memory / batch gradient norm, stored
positives per anchor, drift cosine, validation MAP@R) and summed up in a Markdown table.

    python benchmarks/memory_diagnostics.py --root ROOT --out DIR [--epochs 4] [--size 32]
        [--variant "LABEL=METHOD[:CONFIG][:EXTRA ARGS]" ...]

Without ``--variant``: no memory; XBM, XBN and adaptive XBN with the configs' settings (the
paper's summed loss, weight 1, memory from step 50); XBM with one change each (weight 0.1; 128
stored rows; pytorch-metric-learning's averaging contrastive loss for the memory term); XBM and
XBN with the tuned settings of the equal-budget search
(``experiments/results/omniglot_small/tune/<row>.best.yaml``) where those files exist.
Writes DIR/memory_diagnostics.png, DIR/memory_diagnostics.md and DIR/series.json (every
logged value). A variant trained before with the same arguments
(``<runs>/<label>/args.json``) is read again, not trained again.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import shlex
import statistics
import sys
from typing import Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dml.child_runs import fit_args, launch  # noqa: E402

TUNED = "experiments/results/omniglot_small/tune"
KEYS = {
    "active": "train/memory/active_negatives",
    "memory_norm": "train/grad_norm/memory",
    "batch_norm": "train/grad_norm/metric",
    "positives": "train/memory/positives_per_anchor",
    "drift": "train/memory/drift_cosine",
    "drift_newest": "train/memory/drift_cosine_newest",
    "map_r": "val/MAP@R",
}


# The XBM paper's memory term (summed loss, weight 1), not the Omniglot family's defaults
PAPER = ["--model.memory.loss", "null", "--model.memory.weight", "1.0"]


def default_variants() -> List[Tuple[str, str, str, List[str]]]:
    variants = [
        ("no memory", "none_memory", "", []),
        ("XBM, paper settings", "xbm", "", PAPER),
        ("XBN, paper settings", "xbn", "", PAPER),
        ("adaptive XBN, paper settings", "adaptive_xbn", "", PAPER),
        # what rescues XBM: a smaller weight, fresh rows only, the averaging loss
        ("XBM, summed loss, weight 0.1", "xbm", "", [*PAPER, "--model.memory.weight", "0.1"]),
        ("XBM, 128 stored rows (8 batches)", "xbm", "", [*PAPER, "--model.memory.size", "128"]),
        ("XBM, averaged loss", "xbm", "", [*PAPER, "--model.memory.loss", "contrastive"]),
    ]
    for row, method, label in (("xbm", "xbm", "XBM"), ("xbn", "xbn", "XBN")):
        path = os.path.join(TUNED, f"{row}.best.yaml")
        if os.path.isfile(path):
            variants.append((f"{label}, tuned", method, path, []))
    return variants


def parse_variant(text: str) -> Tuple[str, str, str, List[str]]:
    label, _, rest = text.partition("=")
    method, _, rest = rest.partition(":")
    config, _, extra = rest.partition(":")
    if not label or not method:
        raise SystemExit(f"--variant {text!r}: expected LABEL=METHOD[:CONFIG][:EXTRA ARGS]")
    return label, method, config, shlex.split(extra)


def series(folder: str) -> Dict[str, List[Tuple[int, float]]]:
    """{short key: [(step, value), ...]} from the metrics.csv of the newest run in ``folder``."""
    path = max(glob.glob(os.path.join(folder, "*", "metrics.csv")), key=os.path.getmtime)
    out: Dict[str, List[Tuple[int, float]]] = {k: [] for k in KEYS}
    with open(path) as f:
        for row in csv.DictReader(f):
            for short, key in KEYS.items():
                if row.get(key):
                    out[short].append((int(row["step"]), float(row[key])))
    return out


def late_mean(points: List[Tuple[int, float]], last_steps: int) -> float:
    """Mean of the values logged in the last ``last_steps`` steps of the run (NaN if none)."""
    if not points:
        return float("nan")
    end = max(s for s, _ in points)
    values = [v for s, v in points if s > end - last_steps]
    return statistics.fmean(values) if values else float("nan")


def cell(value: float, spec: str) -> str:
    """A table cell; "-" where nothing was logged (no memory)."""
    return "-" if value != value else format(value, spec)


def ratio_series(s: Dict[str, list]) -> List[Tuple[int, float]]:
    batch = dict(s["batch_norm"])
    return [(k, v / batch[k]) for k, v in s["memory_norm"] if batch.get(k)]


def draw(results: Dict[str, Dict[str, list]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5, figsize=(24, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (label, s), colour in zip(results.items(), colours):
        panels = [
            (axes[0], s["active"], "-"),
            (axes[1], ratio_series(s), "-"),
            (axes[2], s["positives"], "-"),
            (axes[3], s["drift"], "-"),
            (axes[3], s["drift_newest"], ":"),
            (axes[4], s["map_r"], "-"),
        ]
        for ax, points, style in panels:
            if points:
                steps, values = zip(*points)
                marker = "o" if ax in (axes[3], axes[4]) else None
                ax.plot(steps, values, style, color=colour, marker=marker, label=label)
    titles = [
        "stored negatives inside the margin (share)",
        "gradient norm at the head: memory / batch term",
        "stored positives per anchor",
        "cos(stored row, its image now); dotted: newest batch",
        "validation MAP@R (fold 0)",
    ]
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
    axes[1].set_yscale("log")
    axes[4].legend(fontsize=8)  # every variant has a validation curve
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="the folder of the two Omniglot zips")
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--drift-every", type=int, default=50)
    parser.add_argument("--variant", action="append", default=[])
    parser.add_argument("--runs", default="runs/memory_diagnostics")
    opts = parser.parse_args(argv)
    variants = [parse_variant(v) for v in opts.variant] or default_variants()
    os.makedirs(opts.out, exist_ok=True)
    results, lines = {}, []
    for label, method, config, extra in variants:
        folder = os.path.join(opts.runs, label.replace(" ", "_").replace(",", ""))
        args = fit_args(
            "omniglot_small",
            method,
            config=config or None,
            fold=0,
            seed=0,
            folder=folder,
            epochs=opts.epochs,
            size=opts.size,
            root=opts.root,
            extra=[
                "--trainer.log_every_n_steps",
                "10",
                "--memory_drift.every",
                str(opts.drift_every),
                *extra,
            ],
        )
        record = os.path.join(folder, "args.json")
        if os.path.isfile(record) and json.load(open(record)) == args:
            print(f"{label}: trained before with these arguments ({folder})", flush=True)
        else:
            launched = launch(args, label, log=os.path.join(folder, "unit.log"))
            if not launched.ok:
                raise SystemExit(f"{label}: {launched.reason}")
            with open(record, "w") as f:
                json.dump(args, f)
        s = series(folder)
        results[label] = s
        last = 130  # about the last epoch (127 steps of 4 x 4 at 2,040 training images)
        ratio = ratio_series(s)
        cells = [
            cell(late_mean(s["active"], last), ".3f"),
            cell(late_mean(ratio, last), ".2f"),
            cell(late_mean(s["positives"], last), ".1f"),
            cell(late_mean(s["drift"], last), ".3f"),
            cell(late_mean(s["drift_newest"], last), ".3f"),
            cell(100 * max((v for _, v in s["map_r"]), default=float("nan")), ".1f"),
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    draw(results, os.path.join(opts.out, "memory_diagnostics.png"))
    with open(os.path.join(opts.out, "series.json"), "w") as f:
        json.dump(results, f)
    header = [
        "| variant | active stored negatives | memory / batch gradient norm | stored "
        "positives per anchor | drift cosine | newest-batch cosine | best val MAP@R |",
        "|---|---|---|---|---|---|---|",
    ]
    command = "python benchmarks/memory_diagnostics.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    text = "\n".join(
        [
            f"Made by `{command}`; means over the last epoch's logged steps.",
            "",
            *header,
            *lines,
            "",
        ]
    )
    with open(os.path.join(opts.out, "memory_diagnostics.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
