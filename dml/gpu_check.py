"""``make gpu-check``: the acceptance run of the GPU path, one command, on a CUDA machine.

    python -m dml.gpu_check [--steps 30] [--methods xbn ccp_c2 ...] [--out runs/gpu-check-...]

1. **methods**: every method config (``experiments/method/*.yaml``) on the CUB settings trains
   ``--steps`` steps over two epochs, each followed by a validation, in the precision a run
   gets by default (bf16-mixed on a GPU with bfloat16), on generated images in CUB-200-2011's
   layout (no download: random weights, ``pretrained: false``); the memory term from step 3 on;
2. **resume**: the XBN config (memory + moment matching) is killed (SIGKILL) in the middle of its
   second epoch and resumed from ``last.ckpt``; the losses of the resumed steps must equal the
   uninterrupted run's;
3. **evaluation**: Recall@K, MAP@R and R-Precision of the same SOP-sized embeddings (60,502 x
   512, 11,316 classes) on the GPU and on the CPU: the difference and the GPU's time;
4. **ddp**: two processes on the one GPU (gloo: NCCL refuses two ranks on one device), one epoch
   and a validation;
5. a table: check | steps/s | images/s | peak GPU memory | ok; exit status 1 if any failed.

Without CUDA it says so and exits 0. ``--accelerator cpu`` runs the same checks on the CPU (with
``--small``: small CNN, 32 px, small batches), which is how the test suite checks this script.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional

import numpy as np
import pytorch_lightning as pl
import torch

from dml import child_runs
from dml.child_runs import last_metric, run_folder, step_losses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- callbacks the checked runs load by class path --------------------------------------------
class Throughput(pl.Callback):
    """Writes {steps, seconds, images, peak_bytes} of the training steps after ``warmup`` (and
    the peak allocated GPU memory of the whole run) to ``path`` when training ends."""

    def __init__(self, path: str, warmup: int = 3):
        self.path, self.warmup = path, warmup
        self.start: Optional[float] = None
        self.steps = self.images = 0

    def _sync(self, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= self.warmup and self.start is None:
            self._sync(pl_module)
            self.start = time.perf_counter()
        if self.start is not None:
            self.steps += 1
            self.images += len(batch[0])

    def on_train_epoch_end(self, trainer, pl_module):
        self._write(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self._write(trainer, pl_module)

    def _write(self, trainer, pl_module) -> None:
        """Written at every epoch end too, so that validation time does not count and a later
        failure leaves the figures so far."""
        if self.start is None or not trainer.is_global_zero:
            return
        self._sync(pl_module)
        seconds = time.perf_counter() - self.start
        peak = (
            torch.cuda.max_memory_allocated(pl_module.device)
            if pl_module.device.type == "cuda"
            else None
        )
        record = {
            "steps": self.steps,
            "seconds": seconds,
            "images": self.images,
            "peak_bytes": peak,
        }
        with open(self.path, "w") as f:
            json.dump(record, f)

    def on_validation_start(self, trainer, pl_module):  # timing pauses during validation
        if self.start is not None:
            self._sync(pl_module)
            self.paused = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        if self.start is not None and getattr(self, "paused", None) is not None:
            self._sync(pl_module)
            self.start += time.perf_counter() - self.paused
            self.paused = None


class KillAt(pl.Callback):
    """SIGKILL this process when training reaches ``step`` (no cleanup, no hooks: a crashed or
    pre-empted job). ``marker`` records that it happened, so that the resumed run, whose config
    still lists this callback, is not killed again."""

    def __init__(self, step: int, marker: str):
        self.step, self.marker = step, marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)


# --- data ------------------------------------------------------------------------------------
def make_cub_layout(
    root: str,
    train_classes: int = 64,
    test_classes: int = 8,
    per_class: int = 8,
    size: int = 256,
    seed: int = 0,
) -> str:
    """Images in CUB_200_2011's layout under ``root`` (classes 1.. train, 101.. test): noise
    tinted by a class colour, JPEG, ``size`` px. Returns ``root``."""
    from PIL import Image

    base = os.path.join(root, "CUB_200_2011")
    if os.path.isfile(os.path.join(base, "classes.txt")):
        return root
    rng = np.random.default_rng(seed)
    images, labels, names = [], [], []
    classes = list(range(1, train_classes + 1)) + list(range(101, 101 + test_classes))
    image_id = 0
    for c in classes:
        folder = f"{c:03d}.Bird_{c}"
        names.append(f"{c} {folder}")
        os.makedirs(os.path.join(base, "images", folder), exist_ok=True)
        tint = rng.uniform(0, 255, 3)
        for j in range(per_class):
            image_id += 1
            rel = f"{folder}/Bird_{c}_{j:04d}.jpg"
            pixels = 0.5 * rng.uniform(0, 255, (size, size, 3)) + 0.5 * tint
            Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(base, "images", rel))
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c}")
    for name, lines in (
        ("images.txt", images),
        ("image_class_labels.txt", labels),
        ("classes.txt", names),
    ):
        with open(os.path.join(base, name), "w") as f:
            f.write("\n".join(lines) + "\n")
    return root


# --- running ``python -m dml fit`` -----------------------------------------------------------
def fit_args(
    method: str, root: str, out: str, opts, steps: Optional[int] = None, epochs: int = 2
) -> List[str]:
    """One checked run: ``method`` on the generated CUB layout, ``steps`` steps over ``epochs``
    epochs, a loss logged at every step, the memory from step 3 on."""
    steps = steps or opts.steps
    extra = [
        "--data.init_args.verify",
        "false",
        "--data.init_args.batches_per_epoch",
        str(max(1, steps // epochs)),
        "--trainer.accelerator",
        opts.accelerator,
        "--trainer.log_every_n_steps",
        "1",
        "--model.backbone.pretrained",
        "false",
        "--model.memory.start_iteration",
        "3",
        "--model.memory.size",
        "1024",
    ]
    if opts.small:
        extra += [
            "--model.backbone.name",
            "small_cnn",
            "--model.backbone.width",
            "8",
            "--data.init_args.classes_per_batch",
            "4",
            "--model.evaluation.nmi",
            "false",
        ]
    return child_runs.fit_args(
        "cub",
        method,
        backbone=opts.backbone,
        folder=out,
        run_name=method,
        epochs=epochs,
        size=opts.size,
        resize=opts.size * 8 // 7,
        root=root,
        extra=extra,
    )


def run_fit(args: List[str], timeout: int = 1800, log: Optional[str] = None) -> child_runs.Launched:
    """``python -m dml <args>`` from the repository, its standard error appended to ``log``."""
    return child_runs.launch(
        args,
        log=log,
        timeout=timeout,
        cwd=REPO,
        env={"WANDB_MODE": "disabled", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"},
    )


def with_callback(args: List[str], class_path: str, **init_args) -> List[str]:
    return args + [
        "--trainer.callbacks+=" + json.dumps({"class_path": class_path, "init_args": init_args})
    ]


# --- the checks --------------------------------------------------------------------------------
def check_method(method: str, root: str, out: str, opts) -> dict:
    folder = os.path.join(out, method)
    record = os.path.join(out, f"{method}.throughput.json")
    proc = run_fit(
        with_callback(
            fit_args(method, root, folder, opts), "dml.gpu_check.Throughput", path=record
        ),
        timeout=opts.timeout,
        log=os.path.join(out, f"{method}.log"),
    )
    row = {"check": method, "ok": proc.ok}
    if not proc.ok:
        row["error"] = proc.reason
    if os.path.isfile(record):
        with open(record) as f:
            t = json.load(f)
        row.update(
            steps_per_s=t["steps"] / t["seconds"],
            images_per_s=t["images"] / t["seconds"],
            peak_bytes=t["peak_bytes"],
        )
    run = run_folder(folder)
    if row["ok"] and run:
        losses = step_losses(run)
        r1 = last_metric(run, "val/R@1")
        if not losses or not all(np.isfinite(list(losses.values()))) or r1 is None:
            row.update(ok=False, error=f"losses {len(losses)}, validation R@1 {r1}")
    return row


def check_resume(root: str, out: str, opts) -> dict:
    """XBN (memory + moment matching): kill -9 in epoch 2, resume, compare the losses."""
    steps, epochs = 18, 3  # 6 steps an epoch; killed at step 9, last.ckpt holds step 6
    for stale in ("resume-a", "resume-b", "resume-killed", "resume.log"):  # an earlier --out
        path = os.path.join(out, stale)
        shutil.rmtree(path) if os.path.isdir(path) else os.path.exists(path) and os.remove(path)
    straight = run_fit(
        fit_args("xbn", root, os.path.join(out, "resume-a"), opts, steps, epochs)
        + ["--trainer.deterministic", "warn"],
        timeout=opts.timeout,
        log=os.path.join(out, "resume.log"),
    )
    if not straight.ok:
        return {"check": "resume", "ok": False, "error": "uninterrupted run: " + straight.reason}
    marker = os.path.join(out, "resume-killed")
    args = with_callback(
        fit_args("xbn", root, os.path.join(out, "resume-b"), opts, steps, epochs)
        + ["--trainer.deterministic", "warn"],
        "dml.gpu_check.KillAt",
        step=9,
        marker=marker,
    )
    killed = run_fit(args, timeout=opts.timeout, log=os.path.join(out, "resume.log"))
    run = run_folder(os.path.join(out, "resume-b"))
    if killed.returncode != -signal.SIGKILL or run is None:
        return {"check": "resume", "ok": False, "error": "the run to kill: " + killed.reason}
    resumed = run_fit(
        [
            "fit",
            "--config",
            os.path.join(run, "config.yaml"),
            "--ckpt_path",
            os.path.join(run, "checkpoints", "last.ckpt"),
        ],
        timeout=opts.timeout,
        log=os.path.join(out, "resume.log"),
    )
    if not resumed.ok:
        return {"check": "resume", "ok": False, "error": "resume: " + resumed.reason}
    expected = step_losses(run_folder(os.path.join(out, "resume-a")))
    got = step_losses(run)
    after = [s for s in sorted(expected) if s >= 6]
    if not after or any(s not in got for s in after):
        return {
            "check": "resume",
            "ok": False,
            "error": f"steps after the resume missing: {sorted(set(after) - set(got))}",
        }
    worst = max(abs(got[s] - expected[s]) / max(abs(expected[s]), 1e-8) for s in after)
    ok = worst <= opts.resume_tolerance
    return {
        "check": "resume",
        "ok": ok,
        "detail": f"max relative loss difference over steps {after[0]}-{after[-1]}: {worst:.2e}",
        **({} if ok else {"error": f"losses differ by {worst:.2e} > {opts.resume_tolerance:g}"}),
    }


def sop_like(n: int, dim: int = 512, classes: Optional[int] = None, seed: int = 0):
    """Clustered, L2-normalised embeddings in SOP's class sizes (mean 5.35 per class); the
    spread makes neighbours of other classes common (R@1 about 0.7 at 6,000 rows)."""
    classes = classes or round(n / 5.35)
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.arange(classes), rng.integers(0, classes, n - classes)])
    centers = rng.standard_normal((classes, dim)).astype(np.float32)
    x = centers[labels] + 2.5 * rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return torch.from_numpy(x), torch.from_numpy(labels)


def check_evaluation(opts) -> dict:
    from dml.metrics import retrieval_metrics

    device = torch.device("cuda" if opts.accelerator in ("cuda", "gpu") else "cpu")
    x, y = sop_like(opts.eval_rows)
    ks = [1, 10, 100, 1000]
    cpu = retrieval_metrics(x, y, ks)
    xd, yd = x.to(device), y.to(device)
    # warm-up (kernels, cuBLAS handle); the first rows hold each class once: relabel them
    retrieval_metrics(xd[:2000], yd[:2000] % 100, [1])
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    on_device = retrieval_metrics(xd, yd, ks, device=device)
    seconds = time.perf_counter() - start
    diff = max(abs(cpu[k] - on_device[k]) for k in cpu)
    # distances from a GPU GEMM and a CPU GEMM round differently: a near-tie may flip
    ok = diff <= 2.0 / len(x)
    return {
        "check": "evaluation",
        "ok": ok,
        "detail": f"{len(x)} x {x.shape[1]}: {device} {seconds:.2f} s, R@1 "
        f"{on_device['R@1']:.4f}, MAP@R {on_device['MAP@R']:.4f}, max |{device} - "
        f"cpu| {diff:.1e}",
        **({} if ok else {"error": f"metrics differ from the CPU's by {diff:.2e}"}),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_ddp(root: str, out: str, opts) -> dict:
    """Two processes launched here (as torchrun would), each a one-device 'node' on the same
    device, gloo between them."""
    folder = os.path.join(out, "ddp")
    os.makedirs(folder, exist_ok=True)
    strategy = json.dumps(
        {
            "class_path": "pytorch_lightning.strategies.DDPStrategy",
            "init_args": {"process_group_backend": "gloo"},
        }
    )
    args = fit_args("baseline", root, folder, opts, steps=8, epochs=1) + [
        "--trainer.devices",
        "1",
        "--trainer.num_nodes",
        "2",
        "--trainer.strategy",
        strategy,
    ]
    if not opts.small:  # each process draws its own classes: 2 x 8 of the 64 generated
        args += ["--data.init_args.classes_per_batch", "8"]
    port = str(free_port())
    env = dict(
        WANDB_MODE="disabled",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=port,
        WORLD_SIZE="2",
        LOCAL_RANK="0",
        DML_RUN_DIR=os.path.join(folder, "run"),
    )
    logs = [os.path.join(out, f"ddp-rank{r}.log") for r in range(2)]
    procs = []
    for r in range(2):
        with open(logs[r], "w") as errors:
            procs.append(
                child_runs.start(
                    args,
                    errors,
                    dict(env, NODE_RANK=str(r), RANK=str(r), GROUP_RANK=str(r)),
                    cwd=REPO,
                )
            )
    for p in procs:
        try:
            p.communicate(timeout=opts.timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
    codes = [p.returncode for p in procs]
    if codes != [0, 0]:
        bad = next(i for i, c in enumerate(codes) if c != 0)
        with open(logs[bad], errors="replace") as f:
            lines = [x.strip() for x in f if x.strip()]
        return {
            "check": "ddp (2 processes, gloo)",
            "ok": False,
            "error": f"rank {bad} exit {codes[bad]}: {lines[-1][:300] if lines else ''} "
            f"({logs[bad]})",
        }
    r1 = last_metric(os.path.join(folder, "run"), "val/R@1")
    return {
        "check": "ddp (2 processes, gloo)",
        "ok": r1 is not None,
        "detail": f"validation R@1 {r1}",
    }


def table(rows: List[dict]) -> str:
    lines = ["| check | steps/s | images/s | peak GPU memory | ok |", "|---|---|---|---|---|"]
    for r in rows:
        peak = f"{r['peak_bytes'] / 2**30:.2f} GiB" if r.get("peak_bytes") else ""
        note = r.get("error") or r.get("detail") or ""
        lines.append(
            f"| {r['check']} | {r.get('steps_per_s', 0):.2f} | "
            f"{r.get('images_per_s', 0):.1f} | {peak} | "
            f"{'ok' if r['ok'] else 'FAILED'}{': ' + note if note else ''} |"
            if "steps_per_s" in r
            else f"| {r['check']} | | | | {'ok' if r['ok'] else 'FAILED'}"
            f"{': ' + note if note else ''} |"
        )
    return "\n".join(lines)


def write_rows(path: Optional[str], device: str, rows: List[dict]) -> None:
    if path:  # atomically: a reader never sees half a file
        from dml.atomic_files import write_text_atomic

        write_text_atomic(
            path, json.dumps({"device": device, "torch": torch.__version__, "rows": rows}, indent=1)
        )


def main(argv: Optional[List[str]] = None) -> int:
    methods = sorted(
        os.path.basename(p)[:-5]
        for p in glob.glob(os.path.join(REPO, "experiments", "method", "*.yaml"))
    )
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--accelerator", default="cuda", choices=("cuda", "gpu", "cpu"))
    parser.add_argument("--methods", nargs="*", default=methods)
    parser.add_argument("--checks", nargs="*", default=["methods", "resume", "evaluation", "ddp"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=224, help="crop size of the images")
    parser.add_argument(
        "--small",
        action="store_true",
        help="small CNN and batches (a quick run of the script itself)",
    )
    parser.add_argument("--eval-rows", type=int, default=60502)
    parser.add_argument("--resume-tolerance", type=float, default=1e-3)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per training run")
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--json", default=None, help="also write the rows to this file (rewritten after each check)"
    )
    parser.add_argument(
        "--backbone",
        default=None,
        help="a backbone layer (experiments/backbone/<name>.yaml, e.g. "
        "vit_s16_dino) over the CUB settings",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="method runs at a time (above 1 they share the device: their "
        "steps/s are then not a throughput figure)",
    )
    opts = parser.parse_args(argv)
    if opts.accelerator in ("cuda", "gpu") and not torch.cuda.is_available():
        print(
            "gpu-check: no CUDA device on this machine; nothing to check (the CPU paths are "
            "tested by `make test`; `python -m dml.gpu_check --accelerator cpu --small` runs "
            "these checks on the CPU)"
        )
        return 0
    unknown = sorted(set(opts.methods) - set(methods))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; the methods are {methods}")
    out = os.path.abspath(
        opts.out or os.path.join(REPO, "runs", time.strftime("gpu-check-%Y%m%d-%H%M%S"))
    )
    os.makedirs(out, exist_ok=True)
    root = make_cub_layout(os.path.join(out, "data"), size=max(64, opts.size * 8 // 7))
    device = torch.cuda.get_device_name(0) if opts.accelerator != "cpu" else "cpu"
    print(f"gpu-check on {device}, torch {torch.__version__}, outputs in {out}", flush=True)
    rows = []
    for name in opts.checks:
        if name == "methods":
            with ThreadPoolExecutor(max(1, opts.jobs)) as pool:
                runs = [
                    pool.submit(check_method, method, root, out, opts) for method in opts.methods
                ]
                for run in runs:  # in the methods' order, each as soon as it and those before end
                    rows.append(run.result())
                    print(table(rows[-1:]).splitlines()[-1], flush=True)
                    write_rows(opts.json, device, rows)
            continue
        check = {
            "resume": lambda: check_resume(root, out, opts),
            "evaluation": lambda: check_evaluation(opts),
            "ddp": lambda: check_ddp(root, out, opts),
        }[name]
        rows.append(check())
        print(table(rows[-1:]).splitlines()[-1], flush=True)
        write_rows(opts.json, device, rows)
    shared = (
        f" ({opts.jobs} method runs at a time: steps/s and images/s are shared, not throughput)"
        if opts.jobs > 1 and "methods" in opts.checks
        else ""
    )
    print("\n" + table(rows) + ("\n" + shared.strip() if shared else ""))
    with open(os.path.join(out, "gpu-check.md"), "w") as f:
        f.write(f"gpu-check on {device}, torch {torch.__version__}{shared}\n\n{table(rows)}\n")
    failed = [r["check"] for r in rows if not r["ok"]]
    print(
        f"\n{len(rows) - len(failed)} of {len(rows)} checks passed"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
