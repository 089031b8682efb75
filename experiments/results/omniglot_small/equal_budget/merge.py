"""Gather the equal-budget rows (run.sh) into this folder: runs.jsonl, table.md (the MLRC table
of dml.mlrc) and tuning.md (each row's search: trials, best validation MAP@R, best settings).

    python experiments/results/omniglot_small/equal_budget/merge.py
"""

from __future__ import annotations

import csv
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(HERE))))
sys.path.insert(0, REPO)

from dml.mlrc import confidence_interval, load_lines, table, write_lines  # noqa: E402

ROWS = [
    ("gap", "GAP (contrastive)"),
    ("gsp_zero_shot", "GSP + zero-shot"),
    ("c2", "C2"),
    ("c2_ccp", "C2-CCP"),
    ("ibc_no_mpn", "IBC without message passing"),
    ("ibc", "IBC"),
    ("no_memory", "no memory (4 x 4 batches)"),
    ("xbm", "XBM"),
    ("xbn", "XBN"),
    ("adaptive_xbn", "adaptive XBN"),
    # not searched: the no-memory row at the learning rate the memory rows' search chose
    ("no_memory_at_xbm_lr", "no memory, at XBM's tuned lr"),
]


# (baseline, method): does the method beat its baseline?
PAIRS = [
    ("gap", "gsp_zero_shot"),
    ("c2", "c2_ccp"),
    ("ibc_no_mpn", "ibc"),
    ("no_memory", "xbm"),
    ("no_memory", "xbn"),
    ("no_memory", "adaptive_xbn"),
    ("xbm", "xbn"),
    ("no_memory_at_xbm_lr", "xbm"),
    ("no_memory_at_xbm_lr", "xbn"),
]


def fold_values(lines: list, label: str, metric: str) -> dict:
    """{(seed, fold): value} of one row's fold models (separated)."""
    out = {}
    for line in lines:
        if line["method"] == label and not line.get("failed"):
            for fold, values in enumerate(line["separated"]):
                out[(line["seed"], fold)] = values[metric]
    return out


def paired_lines(lines: list) -> list:
    """Method - baseline over the fold models both trained on the same (seed, fold) (the same
    training classes, validation fold and data order): mean and 95 % t interval, in %."""
    labels = dict(ROWS)
    out = [
        "| method - baseline | pairs | P@1 | MAP@R | R-Precision | beyond the interval |",
        "|---|---|---|---|---|---|",
    ]
    for base, method in PAIRS:
        cells, beyond = [], []
        for metric in ("P@1", "MAP@R", "R-Precision"):
            a = fold_values(lines, labels[base], metric)
            b = fold_values(lines, labels[method], metric)
            keys = sorted(set(a) & set(b))
            if len(keys) < 2:
                cells.append("n/a")
                continue
            mean, half = confidence_interval([100 * (b[k] - a[k]) for k in keys])
            cells.append(f"{mean:+.1f} [{mean - half:+.1f}, {mean + half:+.1f}]")
            if abs(mean) > half:
                beyond.append(f"{metric} {'better' if mean > 0 else 'worse'}")
        out.append(
            f"| {labels[method]} - {labels[base]} | {len(keys)} | {' | '.join(cells)} | "
            f"{', '.join(beyond) or 'no'} |"
        )
    return out


def tuning_lines() -> list:
    out = [
        "| row | trials complete / failed | best validation MAP@R (fold 0) | median | "
        "best settings |",
        "|---|---|---|---|---|",
    ]
    for row, label in ROWS:
        path = os.path.join(HERE, "..", "tune", f"{row}.trials.csv")
        if not os.path.isfile(path):
            out.append(f"| {label} | not searched | | | |")
            continue
        with open(path) as f:
            trials = list(csv.DictReader(f))
        score = "mean validation MAP@R (fraction)"
        done = [t for t in trials if t["state"] == "COMPLETE"]
        failed = [t for t in trials if t["state"] == "FAIL"]
        values = sorted(float(t[score]) for t in done)
        best = max(done, key=lambda t: float(t[score]))
        keys = [k for k in best if k not in ("trial", "state", score, "failure")]
        settings = ", ".join(f"{k.split('.')[-1]} {short(best[k])}" for k in keys)
        median = (
            values[len(values) // 2]
            if len(values) % 2
            else sum(values[len(values) // 2 - 1 : len(values) // 2 + 1]) / 2
        )
        out.append(
            f"| {label} | {len(done)} / {len(failed)} | {100 * float(best[score]):.1f} | "
            f"{100 * median:.1f} | {settings} |"
        )
    return out


def short(value: str) -> str:
    if value == "":
        return "null (the method's loss)"
    try:
        number = float(value)
    except ValueError:
        return value
    return f"{number:.3g}"


def main() -> None:
    lines = []
    for row, label in ROWS:
        path = os.path.join(
            REPO, "runs", "equal_budget", row, "omniglot_small", "mlrc", "runs.jsonl"
        )
        for line in load_lines(path):
            line["method"] = label
            lines.append(line)
    write_lines(os.path.join(HERE, "runs.jsonl"), lines)
    with open(os.path.join(HERE, "table.md"), "w") as f:
        f.write(table(lines, "omniglot_small (equal tuning budget)"))
        f.write(
            "\n## Each method against its baseline\n\nPaired over the fold models trained on "
            "the same seed and fold (same training classes and data order): mean difference "
            "and its 95 % t interval, in points of %.\n\n" + "\n".join(paired_lines(lines)) + "\n"
        )
    with open(os.path.join(HERE, "tuning.md"), "w") as f:
        f.write(
            "# The searches behind table.md\n\n12 trials per row (python -m dml.tune, TPE, "
            "seed 0), validation fold 0 of the training classes, 4 epochs at 32 px; spaces in "
            "../tune/spaces/, every trial in ../tune/<row>.trials.csv.\n\n"
            + "\n".join(tuning_lines())
            + "\n"
        )
    print(open(os.path.join(HERE, "table.md")).read())
    print(open(os.path.join(HERE, "tuning.md")).read())


if __name__ == "__main__":
    main()
