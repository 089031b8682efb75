"""``make gpu-bench``: every GPU figure of benchmarks/README.md in one call of <= 8 minutes.

For a machine lent for a few minutes.

    python benchmarks/gpu_bench.py --out DIR [--accelerator cuda|cpu] [--small]
                                   [--parts check syncs eval loader throughput compile]

Parts, in this order, each a child process killed at its budget (seconds on a GPU, printed as
it starts):

=========== ====== ==========================================================================
part        budget what
=========== ====== ==========================================================================
check       140    ``python -m dml.gpu_check`` short form: GSP, IBC, CCP and XBN train 10
                   steps each (4 at a time, 128 px), kill-and-resume of XBN, SOP-sized
                   evaluation on the GPU against the CPU, 2-process DDP
syncs       30     host-device synchronisations per training step of ResNet-50 + GSP, by
                   source line (``train_throughput.py --count-syncs``): how many are GSP's
eval        45     ``eval_speed.py`` at SOP size on the GPU: ours / the bare distance GEMM on
                   the hard and the worst (isotropic-2) regimes, 5 rounds, and on collapsed
                   embeddings (every distance tied), 2 rounds; whether faiss has a GPU build
loader      35     ``loader_speed.py``: images/s reaching the GPU with JPEG decoding on the GPU
                   (``decode: device``, nvJPEG) against decoding in the loader's workers
throughput  110    ``train_throughput.py``: Lightning / bare loop, ResNet-50 at 224 px, batch
                   128, bf16, GAP and GSP, up to 7 alternating rounds each
compile     100    the same for the compiled GAP model, as many rounds as fit
=========== ====== ==========================================================================

Writes ``DIR/gpu-bench.md`` (the environment and one table: part | measure | value | target |
verdict), ``DIR/gpu-bench.json`` (the same, plus each part's raw figures) and
``DIR/gpu-bench.log`` (every part's output); scratch files go to ``--work`` (a temporary folder
by default). A verdict is ``ok`` / ``FAILED`` for a check, ``met`` / ``not met`` / ``not
settled`` (the rounds' range spans the target) for a speed target. The exit status is 1 when a
check failed, a part failed or ran past its budget, else 0; a target not met is reported, not
an error. Without CUDA (and without ``--accelerator cpu``) it says so and exits 0.

``--accelerator cpu --small`` rehearses the whole script on the CPU in about a minute (small
CNN, small sizes, two rounds, no speed targets; the CUDA-only parts, syncs and compile, report
that they did not run), which is how the test suite checks it; on a GPU ``--small`` runs every
part at those sizes. Ctrl-C or SIGTERM stops the running part with it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PARTS = ("check", "syncs", "eval", "loader", "throughput", "compile")
GSP_SOURCE = "dml/models/gsp.py"


@dataclass
class Row:
    """One line of the table."""

    part: str
    measure: str
    value: str
    target: str = ""
    verdict: str = ""


@dataclass
class Context:
    opts: argparse.Namespace
    work: str
    log: str

    @property
    def cuda(self) -> bool:
        return self.opts.accelerator == "cuda"

    @property
    def device(self) -> str:
        return "cuda" if self.cuda else "cpu"

    def json_path(self, name: str) -> str:
        """Where a child writes its figures; an earlier run's file there is removed first."""
        path = os.path.join(self.work, f"{name}.json")
        if os.path.exists(path):
            os.remove(path)
        return path


@dataclass
class Outcome:
    """How a child process ended."""

    ok: bool
    reason: str = ""


def run_child(ctx: Context, title: str, args: List[str], budget: float) -> Outcome:
    """``python <args>`` from the repository root, output appended to the log, killed at
    ``budget`` seconds."""
    env = dict(
        os.environ,
        WANDB_MODE="disabled",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join([REPO, HERE, os.environ.get("PYTHONPATH", "")]),
    )
    with open(ctx.log, "a") as log:
        log.write(f"\n===== {title}: {' '.join(args)}\n")
        log.flush()
        proc = subprocess.Popen(
            [sys.executable] + args,
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=max(1.0, budget))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            log.write(f"===== {title}: killed at its budget of {budget:.0f} s\n")
            return Outcome(False, f"ran past its budget of {budget:.0f} s")
        except BaseException:  # Ctrl-C, SIGTERM: the part must not go on using the device
            os.killpg(proc.pid, 9)
            proc.wait()
            raise
    if code != 0:
        return Outcome(False, f"exit status {code} (see gpu-bench.log)")
    return Outcome(True)


def read_json(path: str) -> Optional[dict]:
    """A child's figures; None when it wrote none, or was killed while writing them."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def spread(values: List[float], digits: int = 3) -> str:
    """median [lowest, highest] (n)."""
    return (
        f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}, "
        f"{max(values):.{digits}f}] (n={len(values)})"
    )


def at_least(values: List[float], target: float) -> str:
    """A target on a figure over rounds: met when every round reaches it, not met when none
    does, else (the rounds' range spans it) not settled."""
    if min(values) >= target:
        return "met"
    if max(values) < target:
        return "not met"
    return "not settled"


def at_most(values: List[float], target: float) -> str:
    return at_least([-v for v in values], -target)


# --- the parts ---------------------------------------------------------------------------------
def part_check(ctx: Context, budget: float) -> List[Row]:
    out = ctx.json_path("check")
    args = [
        "-m",
        "dml.gpu_check",
        "--accelerator",
        ctx.opts.accelerator,
        "--json",
        out,
        "--out",
        os.path.join(ctx.work, "gpu-check"),
    ]
    if ctx.opts.small:
        args += [
            "--small",
            "--methods",
            "xbn",
            "--checks",
            "methods",
            "evaluation",
            "--steps",
            "4",
            "--eval-rows",
            "3000",
        ]
    else:
        args += [
            "--methods",
            "gsp_contrastive",
            "ibc",
            "ccp_c2",
            "xbn",
            "--jobs",
            "4",
            "--steps",
            "10",
            "--size",
            "128",
            "--timeout",
            str(int(budget)),
        ]
    outcome = run_child(ctx, "check", args, budget)
    record = read_json(out) or {"rows": []}
    rows = []
    shared = "" if ctx.opts.small else " (4 runs at a time: shared, not throughput)"
    expected = {
        "resume": "same losses as the uninterrupted run",
        "evaluation": "metrics as the CPU's",
    }
    for r in record["rows"]:
        value = r.get("detail", "")
        if "steps_per_s" in r:
            value = f"{r['steps_per_s']:.2f} steps/s, {r['images_per_s']:.0f} images/s" + (
                f", peak {r['peak_bytes'] / 2**30:.2f} GiB" if r.get("peak_bytes") else ""
            )
        name = r["check"] + (shared if "steps_per_s" in r else "")
        rows.append(
            Row(
                "check",
                name,
                value + (f"; {r['error']}" if r.get("error") else ""),
                expected.get(r["check"], "trains and validates, finite losses"),
                "ok" if r["ok"] else "FAILED",
            )
        )
    if not outcome.ok:
        rows.append(Row("check", "gpu_check", outcome.reason, "", "FAILED"))
    return rows


def part_syncs(ctx: Context, budget: float) -> List[Row]:
    if not ctx.cuda:
        return [Row("syncs", "host-device synchronisations per step", "CUDA only: not run")]
    out = ctx.json_path("syncs")
    case = "small_cnn:32:16:gsp:eager" if ctx.opts.small else "resnet50:224:128:gsp:eager"
    outcome = run_child(
        ctx,
        "syncs",
        [
            "benchmarks/train_throughput.py",
            "--count-syncs",
            "--case",
            case,
            "--steps",
            "25",
            "--warmup",
            "5",
            "--json",
            out,
        ],
        budget,
    )
    rows = []
    record = read_json(out)
    if record and case in record["cases"]:
        per_step = record["cases"][case]["per_step"]
        gsp = sum(n for key, n in per_step.items() if GSP_SOURCE in key)
        rows.append(
            Row("syncs", f"all, {case} (Lightning step)", f"{sum(per_step.values()):.2f} per step")
        )
        rows.append(
            Row(
                "syncs",
                f"in {GSP_SOURCE} (the solver's convergence test)",
                f"{gsp:.2f} per step",
                "<= 1",
                "met" if gsp <= 1 else "not met",
            )
        )
        top = ", ".join(f"{key.split('/')[-1]} {n:.2f}" for key, n in list(per_step.items())[:4])
        rows.append(Row("syncs", "largest sources", top))
    if not outcome.ok:
        rows.append(Row("syncs", "count-syncs", outcome.reason, "", "FAILED"))
    return rows


def part_eval(ctx: Context, budget: float) -> List[Row]:
    rows = []
    try:
        import faiss

        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        rows.append(
            Row(
                "eval",
                "faiss",
                f"{faiss.__version__}, "
                + (
                    f"GPU build, {gpus} GPU(s)"
                    if gpus
                    else "no GPU build: k-NN searches (index, search, NMI's k-means) run on the CPU"
                ),
            )
        )
    except ImportError:
        rows.append(Row("eval", "faiss", "not installed"))
    regimes = ["hard", "isotropic-2", "collapsed"]
    started = time.perf_counter()
    for i, regime in enumerate(regimes):
        out = ctx.json_path(f"eval-{regime}")
        args = [
            "benchmarks/eval_speed.py",
            "--regime",
            regime,
            "--skip-baseline",
            "--device",
            ctx.device,
            "--json",
            out,
        ]
        rounds = "2" if regime == "collapsed" else "5"  # ties: the torch pass recomputes rows
        args += ["--n", "3000", "--rounds", "1"] if ctx.opts.small else ["--rounds", rounds]
        left = budget - (time.perf_counter() - started)
        outcome = run_child(ctx, f"eval {regime}", args, left / (len(regimes) - i))
        record = read_json(out)
        if record:
            ours = record["seconds"]["ours"]
            ratios = record["ours_over_floor"]
            cpu_target = not ctx.cuda and not ctx.opts.small  # the bound, CPU at scale
            gpu_target = ctx.cuda and not ctx.opts.small and regime == "hard"
            rows.append(
                Row(
                    "eval",
                    f"ours / bare GEMM, {regime}, {record['rows']} x {record['dim']}",
                    spread(ratios),
                    "<= 1.3" if cpu_target else "",
                    at_most(ratios, 1.3) if cpu_target else "",
                )
            )
            rows.append(
                Row(
                    "eval",
                    f"ours, seconds, {regime} (R@1 {record['metrics']['R@1']:.3f}"
                    f", MAP@R {record['metrics']['MAP@R']:.3f})",
                    spread(ours),
                    "<= 0.35 s (H100, hard: 0.30 s)" if gpu_target else "",
                    at_most(ours, 0.35) if gpu_target else "",
                )
            )
        if not outcome.ok:
            rows.append(Row("eval", f"eval_speed {regime}", outcome.reason, "", "FAILED"))
    return rows


def part_loader(ctx: Context, budget: float) -> List[Row]:
    out = ctx.json_path("loader")
    workers = ["0"] if ctx.opts.small else ["0", str(min(8, os.cpu_count() or 1))]
    args = [
        "benchmarks/loader_speed.py",
        "--device",
        ctx.device,
        "--json",
        out,
        "--workers",
    ] + workers
    args += (
        ["--images", "40", "--batches", "2"]
        if ctx.opts.small
        else ["--images", "480", "--batches", "20"]
    )
    outcome = run_child(ctx, "loader", args, budget)
    rows = []
    record = read_json(out) or {"workers": {}}
    for w, r in record["workers"].items():
        where = "in the loader" if w == "0" else f"in {w} loader workers"
        rows.append(
            Row(
                "loader",
                f"images/s reaching {record['device']}: JPEGs decoded on the "
                f"device / {where} (torchvision ImageFolder {where})",
                f"{r['decode_on_device']:.0f} / {r['ours']:.0f} = "
                f"{r['decode_on_device'] / r['ours']:.2f} ({r['imagefolder']:.0f})",
            )
        )
    if not outcome.ok:
        rows.append(Row("loader", "loader_speed", outcome.reason, "", "FAILED"))
    return rows


def throughput_rows(ctx: Context, part: str, cases: List[str], budget: float) -> List[Row]:
    out = ctx.json_path(part)
    if ctx.opts.small:
        settings = ["--rounds", "2", "--steps", "4", "--warmup", "1", "--batches-per-epoch", "4"]
    else:
        settings = ["--rounds", "7", "--steps", "30", "--warmup", "5"]
    # each case's rounds stop in time for the next case and the process's start-up
    deadline = (budget - 20) / len(cases)
    args = [
        "benchmarks/train_throughput.py",
        "--device",
        ctx.device,
        "--json",
        out,
        "--deadline",
        f"{deadline:.0f}",
    ] + settings
    for case in cases:
        args += ["--case", case]
    outcome = run_child(ctx, part, args, budget)
    rows = []
    record = read_json(out) or {"cases": {}}
    target = 0.90 if ctx.cuda else 0.95
    for case, r in record["cases"].items():
        rates = r["images_per_s"]
        ratios = [a / b for a, b in zip(rates["lightning"], rates["bare"])]
        if not ratios:
            rows.append(Row(part, f"Lightning / bare, {case}", "no round finished", "", ""))
            continue
        full = not ctx.opts.small  # a rehearsal's 3 timed steps say nothing about the target
        rows.append(
            Row(
                part,
                f"Lightning / bare, {case} (bare {statistics.median(rates['bare']):.0f} images/s)",
                spread(ratios),
                f">= {target}" if full else "",
                at_least(ratios, target) if full else "",
            )
        )
    if not outcome.ok:
        rows.append(Row(part, "train_throughput", outcome.reason, "", "FAILED"))
    return rows


def part_throughput(ctx: Context, budget: float) -> List[Row]:
    cases = (
        ["small_cnn:32:16:gap:eager"]
        if ctx.opts.small
        else ["resnet50:224:128:gap:eager", "resnet50:224:128:gsp:eager"]
    )
    return throughput_rows(ctx, "throughput", cases, budget)


def part_compile(ctx: Context, budget: float) -> List[Row]:
    if not ctx.cuda:
        return [Row("compile", "Lightning / bare, compiled", "CUDA only: not run")]
    case = "small_cnn:32:16:gap:compile" if ctx.opts.small else "resnet50:224:128:gap:compile"
    return throughput_rows(ctx, "compile", [case], budget)


RUNNERS: Dict[str, Callable[[Context, float], List[Row]]] = {
    "check": part_check,
    "syncs": part_syncs,
    "eval": part_eval,
    "loader": part_loader,
    "throughput": part_throughput,
    "compile": part_compile,
}
BUDGETS = {
    "check": 140,
    "syncs": 30,
    "eval": 45,
    "loader": 35,
    "throughput": 110,
    "compile": 100,
}  # seconds on a GPU: 460, plus about 10 s of the script's own start
SMALL_BUDGETS = {
    "check": 240,
    "syncs": 120,
    "eval": 120,
    "loader": 120,
    "throughput": 240,
    "compile": 240,
}  # the rehearsal on a shared 2-core machine (syncs, compile:
# CUDA only, they return at once on a CPU)


# --- the report --------------------------------------------------------------------------------
def environment(ctx: Context) -> Dict[str, str]:
    import torch

    env = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": str(os.cpu_count()),
    }
    if ctx.cuda:
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = str(torch.version.cuda)
        if shutil.which("nvidia-smi"):
            query = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
            )
            env["driver"] = query.stdout.strip()
    for name in ("pytorch_lightning", "pytorch_metric_learning", "faiss", "timm"):
        try:
            env[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - absent, or broken on this machine
            env[name] = "absent"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:  # no git on the machine
        commit = ""
    env["commit"] = commit or "unknown"
    return env


def markdown(
    env: Dict[str, str], rows: List[Row], seconds: Dict[str, float], budgets: Dict[str, float]
) -> str:
    lines = [
        "gpu-bench: " + ", ".join(f"{k} {v}" for k, v in env.items()),
        "",
        "| part | measure | value | target | verdict |",
        "|---|---|---|---|---|",
    ]

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines += [
        f"| {r.part} | {cell(r.measure)} | {cell(r.value)} | {cell(r.target)} | {r.verdict} |"
        for r in rows
    ]
    lines += [
        "",
        "Seconds per part (budget): "
        + ", ".join(f"{p} {seconds[p]:.0f} ({budgets[p]:.0f})" for p in seconds)
        + f"; total {sum(seconds.values()):.0f}",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--out", required=True, help="folder for gpu-bench.md, .json and .log")
    parser.add_argument("--accelerator", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument(
        "--small", action="store_true", help="small sizes and rounds (the CPU rehearsal)"
    )
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument(
        "--work", default=None, help="scratch folder (default: a temporary one, removed at the end)"
    )
    opts = parser.parse_args(argv)
    opts.parts = list(dict.fromkeys(opts.parts))  # each part once, in the order given
    if os.path.exists(opts.out) and not os.path.isdir(opts.out):
        parser.error(f"--out {opts.out}: a file; expected a folder (created if missing)")
    import torch

    if opts.accelerator == "cuda" and not torch.cuda.is_available():
        print(
            "gpu-bench: no CUDA device on this machine; nothing measured (`--accelerator cpu "
            "--small` rehearses the script on the CPU)"
        )
        return 0
    try:
        os.makedirs(opts.out, exist_ok=True)
    except OSError as error:
        parser.error(f"--out {opts.out}: cannot create it ({error.strerror})")
    work = opts.work or tempfile.mkdtemp(prefix="gpu-bench-")
    os.makedirs(work, exist_ok=True)
    log = os.path.join(opts.out, "gpu-bench.log")
    open(log, "w").close()
    ctx = Context(opts, work, log)
    env = environment(ctx)
    budgets = SMALL_BUDGETS if opts.small else BUDGETS
    print("gpu-bench: " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    print(
        f"parts: {', '.join(f'{p} ({budgets[p]} s)' for p in opts.parts)}; output of each in {log}",
        flush=True,
    )
    rows: List[Row] = []
    seconds: Dict[str, float] = {}

    def terminated(signum, frame):
        raise SystemExit(f"gpu-bench: stopped by signal {signum}")

    signal.signal(signal.SIGTERM, terminated)
    try:
        for part in opts.parts:
            print(f"\n[{part}] budget {budgets[part]} s", flush=True)
            start = time.perf_counter()
            try:
                new = RUNNERS[part](ctx, budgets[part])
            except Exception as error:  # a part's own bug must not lose the others' figures
                new = [Row(part, "gpu_bench", f"{type(error).__name__}: {error}", "", "FAILED")]
            seconds[part] = time.perf_counter() - start
            for r in new:
                print(
                    f"  {r.measure}: {r.value}"
                    + (
                        f"  (target {r.target}: {r.verdict})"
                        if r.target
                        else f"  {r.verdict}"
                        if r.verdict
                        else ""
                    ),
                    flush=True,
                )
            rows += new
            report = markdown(env, rows, seconds, budgets)
            with open(os.path.join(opts.out, "gpu-bench.md"), "w") as f:
                f.write(report)
            raw = {
                name[:-5]: read_json(os.path.join(work, name))
                for name in sorted(os.listdir(work))
                if name.endswith(".json")
            }
            with open(os.path.join(opts.out, "gpu-bench.json"), "w") as f:
                json.dump(
                    {
                        "environment": env,
                        "rows": [r.__dict__ for r in rows],
                        "seconds": seconds,
                        "budgets": budgets,
                        "raw": raw,
                    },
                    f,
                    indent=1,
                )
    finally:
        if opts.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print("\n" + markdown(env, rows, seconds, budgets))
    failed = sorted({r.part for r in rows if r.verdict == "FAILED"})
    skipped = sorted({r.part for r in rows if r.value.startswith("CUDA only")})
    ran = [p for p in opts.parts if p not in skipped]
    print(
        f"{len(ran) - len(failed)} of {len(ran)} parts run without a failure"
        + (f"; failed: {', '.join(failed)}" if failed else "")
        + (f"; not run on this machine: {', '.join(skipped)}" if skipped else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
