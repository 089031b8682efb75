"""``make table``: the method-vs-baseline grid, several seeds, one Markdown table.

    python -m dml.reproduce --dataset omniglot_small --seeds 0 1 2
    python -m dml.reproduce --dataset cub --seeds 0 1 2 --devices 4      # on GPUs

Every (variant, seed) run is the CLI's ``fit`` on the shipped configs (trainer + data set +
method + the method's per-data-set file) plus the variant's switches, with the seed, the
budget and no loggers or checkpoints. Each finished run appends one JSON line (variant, seed,
arguments, their fingerprint, final validation metrics, seconds) to
``<out>/<dataset>/runs.jsonl``; a run there with the same fingerprint (arguments, config files,
data: ``dml.jobs``) is not repeated, so an interrupted grid resumes, and the table holds the
runs of the settings asked for only. A run that fails is recorded with its error, the grid goes
on, the table marks it and the command exits non-zero at the end. The table (mean +- standard
deviation over seeds, in %) goes to ``<out>/<dataset>/table.md`` with the command that made it,
and the same numbers as LaTeX (booktabs, best of each column in bold, the git commit and the
command in a comment; ``dml.latex_table``) to ``<out>/<dataset>/table.tex``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from dml import jobs, latex_table
from dml.child_runs import fit_args

# The XBM paper's memory term (summed loss, weight 1), whatever the data set's memory family
# sets (experiments/family/memory/omniglot.yaml defaults to the tuned, averaged term).
PAPER_MEMORY = ["--model.memory.loss", "null", "--model.memory.weight", "1.0"]
# row -> (method config, extra CLI arguments). Rows come in baseline / method pairs.
GRID: Dict[str, tuple] = {
    "GAP (contrastive)": ("contrastive", []),
    "GSP + zero-shot (contrastive)": ("gsp_contrastive", []),
    "no memory (contrastive, 4 x 4 batches)": ("none_memory", []),
    "XBM": ("xbm", PAPER_MEMORY),
    "XBN": ("xbn", PAPER_MEMORY),
    "C2, no CCP": ("ccp_c2", ["--model.loss.proxies_per_class", "0", "--ccp.enabled", "false"]),
    "C2-CCP": ("ccp_c2", []),
    "IBC, no message passing": ("ibc", ["--model.ibc.mpn_weight", "0"]),
    "IBC": ("ibc", []),
}
# Budgets that fit a 2-core CPU: epochs and image size per data set (None: the config's).
BUDGETS = {"omniglot_small": {"epochs": 4, "size": 32}, "synthetic": {"epochs": 3, "size": None}}
METRICS = ("R@1", "MAP@R", "NMI")


def run_args(
    dataset: str,
    method: str,
    extra: Sequence[str],
    seed: int,
    epochs: Optional[int] = None,
    size: Optional[int] = None,
    val_every: Optional[int] = None,
    devices: int = 1,
    root: Optional[str] = None,
) -> List[str]:
    """The CLI arguments of one run (``dml.child_runs.fit_args``): no loggers, callbacks or
    checkpoints, validation every ``val_every`` epochs (default: at the end); ``extra`` last."""
    quiet = [
        "--trainer.logger",
        "false",
        "--trainer.callbacks",
        "[]",
        "--trainer.enable_checkpointing",
        "false",
        "--trainer.num_sanity_val_steps",
        "0",
    ]
    if epochs:
        quiet += ["--trainer.check_val_every_n_epoch", str(val_every or epochs)]
    return fit_args(
        dataset,
        method,
        seed=seed,
        devices=devices,
        epochs=epochs,
        size=size,
        root=root,
        extra=quiet + list(extra),
    )


def run_once(args: List[str]):
    """Runs the CLI in this process; returns (final validation metrics, the trainer)."""
    from dml.cli import DMLCLI
    from dml.data import DMLDataModule
    from dml.module import DMLModule

    cli = DMLCLI(
        DMLModule,
        DMLDataModule,
        subclass_mode_data=True,
        args=args,
        save_config_callback=None,
        auto_configure_optimizers=False,
    )
    return cli.model.last_metrics, cli.trainer


def load_runs(path: str) -> List[dict]:
    """The JSON lines of a runs file; a line that is not valid JSON is an error naming it."""
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not a JSON line ({error})") from None
            if "variant" not in row or "seed" not in row or "metrics" not in row:
                raise ValueError(f"{path}:{number}: expected keys variant, seed, metrics")
            rows.append(row)
    return rows


def aggregate(rows: List[dict], order: Sequence[str]) -> Dict[str, Dict[str, tuple]]:
    """variant -> metric -> (mean, standard deviation, number of seeds), in % (the last run of
    a repeated (variant, seed) counts), and "failed" -> the seeds whose last run failed.
    Variants outside ``order`` follow in file order."""
    latest: Dict[tuple, dict] = {}
    for row in rows:
        latest[(row["variant"], row["seed"])] = row
    names = [v for v in order if any(k[0] == v for k in latest)]
    names += [v for v in dict.fromkeys(k[0] for k in latest) if v not in names]
    table = {}
    for name in names:
        runs = [r for (v, _), r in latest.items() if v == name and not r.get("failed")]
        table[name] = {}
        failed = sorted(s for (v, s), r in latest.items() if v == name and r.get("failed"))
        if failed:
            table[name]["failed"] = tuple(failed)
        for metric in METRICS:
            values = [100 * r["metrics"][metric] for r in runs if metric in r["metrics"]]
            if values:  # one seed: no spread (not a spread of 0)
                spread = statistics.stdev(values) if len(values) > 1 else None
                table[name][metric] = (statistics.mean(values), spread, len(values))
    return table


def measured_on(rows: List[dict]) -> str:
    """What every number of the table is: the split its runs validated on, last epoch."""
    splits = sorted({str(r["split"]) for r in rows if r.get("split")})
    where = " and ".join(f"the {s}" for s in splits) or "the data set's validation split"
    return (
        f"Each number: the metrics of the last epoch's validation, on {where}, in %; mean and "
        f"standard deviation over seeds (the mean alone where one seed ran)."
    )


def cells(table: Dict[str, Dict[str, tuple]]) -> Tuple[List[str], List[list]]:
    """(header, rows) of the table, once for both renderers: a metric is (mean, standard
    deviation) in % or "-", the last cell the number of seeds (and the failed ones)."""
    header = ["variant", *METRICS, "seeds"]
    rows = []
    for name, values in table.items():
        seeds = max((values[m][2] for m in METRICS if m in values), default=0)
        failed = values.get("failed")
        note = f" (seed {', '.join(map(str, failed))} failed)" if failed else ""
        rows.append(
            [
                name,
                *(values[m][:2] if m in values else latex_table.MISSING for m in METRICS),
                f"{seeds}{note}",
            ]
        )
    return header, rows


def markdown(
    table: Dict[str, Dict[str, tuple]], title: str, command: str, measured: str = ""
) -> str:
    header, rows = cells(table)
    lines = [
        f"# {title}",
        "",
        f"Made by: `{command}`",
        "",
        *([measured, ""] if measured else []),
        "| " + " | ".join(header) + " |",
        "|---|" + "---|" * (len(header) - 1),
    ]
    lines += ["| " + " | ".join(latex_table.plain(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def latex(
    table: Dict[str, Dict[str, tuple]],
    title: str,
    command: str,
    commit: Optional[str] = None,
    measured: str = "",
) -> str:
    """The table of ``markdown`` as LaTeX (``dml.latex_table``)."""
    header, rows = cells(table)
    caption = f"{title}. " + (measured or "Mean and standard deviation over seeds, in %.")
    return latex_table.tabular(header, rows, caption, command, commit)


def main(argv: Optional[Sequence[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--dataset", default="omniglot_small")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="default: the CPU budget for omniglot_small / synthetic, else the configs' epochs",
    )
    parser.add_argument("--size", type=int, default=None, help="image size override")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=None, choices=list(GRID))
    parser.add_argument("--out", default="experiments/results")
    parser.add_argument(
        "--root", default=None, help="the data set's folder (default: the data config's root)"
    )
    args = parser.parse_args(argv)
    commit = latex_table.git_commit()  # before this job writes anything
    if not os.path.exists(f"experiments/data/{args.dataset}.yaml"):
        parser.error(f"no experiments/data/{args.dataset}.yaml")
    budget = BUDGETS.get(args.dataset, {})
    epochs = args.epochs or budget.get("epochs")
    size = args.size or budget.get("size")
    folder = os.path.join(args.out, args.dataset)
    os.makedirs(folder, exist_ok=True)
    runs_path = os.path.join(folder, "runs.jsonl")
    done = {
        (r["variant"], r["seed"], r.get("fingerprint"))
        for r in load_runs(runs_path)
        if not r.get("failed")
    }
    wanted, failures = [], []
    for name, (method, extra) in GRID.items():
        if args.variants and name not in args.variants:
            continue
        for seed in args.seeds:
            cli_args = run_args(
                args.dataset,
                method,
                extra,
                seed,
                epochs,
                size,
                devices=args.devices,
                root=args.root,
            )
            key = jobs.fingerprint(cli_args)
            wanted.append((name, seed, key))
            if (name, seed, key) in done:  # the same settings, config files and data
                continue
            print(f"{name} seed {seed}: training", flush=True)
            start = time.perf_counter()
            row = {"variant": name, "seed": seed, "fingerprint": key, "args": cli_args}
            try:
                metrics, trainer = run_once(cli_args)
                row["metrics"] = metrics
                if trainer is not None:  # what the numbers measure, e.g. "test split"
                    row["split"] = trainer.lightning_module.split_name("val")
            except (Exception, SystemExit) as error:  # noqa: BLE001 - recorded; the grid goes on
                row.update(metrics={}, failed=f"{type(error).__name__}: {error}"[:500])
                failures.append(f"{name} seed {seed}")
            row["seconds"] = round(time.perf_counter() - start, 1)
            with open(runs_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(
                json.dumps(
                    {
                        k: row[k]
                        for k in ("variant", "seed", "metrics", "seconds", "failed")
                        if k in row
                    }
                ),
                flush=True,
            )
    budget_text = f"{epochs} epochs" if epochs else "the configs' epochs"
    budget_text += f", {size} px" if size else ""
    command = "python -m dml.reproduce " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    title = f"{args.dataset}: methods vs baselines ({budget_text}, seeds {args.seeds})"
    # the table holds the runs of these settings only (the last of a repeated one)
    keys = set(wanted)
    rows = [
        r for r in load_runs(runs_path) if (r["variant"], r["seed"], r.get("fingerprint")) in keys
    ]
    table = aggregate(rows, list(GRID))
    measured = measured_on(rows)
    text = markdown(table, title, command, measured)
    latex_table.write_atomic(os.path.join(folder, "table.md"), text)
    tex = os.path.join(folder, "table.tex")
    latex_table.write_atomic(tex, latex(table, title, command, commit, measured))
    print(text)
    print(f"LaTeX table: {tex}", flush=True)
    if failures:
        raise SystemExit(
            f"error: {len(failures)} run(s) failed ({', '.join(failures)}); "
            f"the table marks them, runs.jsonl holds the reasons"
        )
    return text


if __name__ == "__main__":  # pragma: no cover
    main()
