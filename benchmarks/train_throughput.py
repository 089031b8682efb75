"""Training throughput: a ``make train``-equivalent Lightning run against a bare loop.

The bare PyTorch loop has the same model, batch, optimizer and data, in one process.

Both sides train the same ``DMLModule`` (backbone -> pooling -> head -> objective) with the
optimizer its ``configure_optimizers`` returns, on the same in-memory synthetic images through
the same class-balanced loader, so the loop is measured, not the disk:

- lightning: ``pl.Trainer`` as ``experiments/trainer.yaml`` sets it up (CSV logger every 10
  steps, the progress bar `make train` shows, the run's precision), validation off;
- bare: ``for images, labels in loader: autocast -> embed -> objective -> backward -> step``.

Images/s over the steps after ``--warmup``; the two alternate in rounds (L B, B L, ...), each
round a fresh copy of the same initial model; the ratio lightning / bare is taken per round
and reported as median [range]. Cases (``--case``, repeatable; default: the device's):
- CPU: ``small_cnn`` (32 px, batch 32: ``make train``'s) and ``resnet18`` at 112 px, batch 32;
- CUDA: ResNet-50 at 224 px, batch 128, bf16-mixed and channels-last, eager and compiled, GAP
  and GSP.

    python benchmarks/train_throughput.py [--rounds 3] [--steps 20] [--warmup 5]
        [--case resnet18:112:32:gap:eager] ...   (backbone:size:batch:pooling:eager|compile;
                                                  backbone vit_s16: timm's ViT-S/16)
        [--deadline SECONDS] [--json results.json]

``--deadline``: seconds per case; no round of a case starts once the case's time so far plus
its longest round so far would pass it (the first round always runs); ``--json``: the images/s
of every side and round, rewritten after each round, so that a run stopped from outside keeps
the rounds it finished.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import pytorch_lightning as pl
import torch

from dml.callbacks import ProgressBar
from dml.config import BackboneConfig, LossConfig, OptimizerConfig, PoolingConfig
from dml.data import SyntheticDataModule
from dml.module import DMLModule

CPU_CASES = ["small_cnn:32:32:gap:eager", "resnet18:112:32:gap:eager"]
CUDA_CASES = [
    "resnet50:224:128:gap:eager",
    "resnet50:224:128:gap:compile",
    "resnet50:224:128:gsp:eager",
    "resnet50:224:128:gsp:compile",
]


ALIASES = {"vit_s16": "timm:vit_small_patch16_224"}  # case fields are split at ':'


def build(case: str, device: torch.device, batches_per_epoch: int = 100):
    backbone, size, batch, pooling, mode = case.split(":")
    backbone = ALIASES.get(backbone, backbone)
    size, batch = int(size), int(batch)
    params = {"num_prototypes": 64, "mu": 0.3, "gamma": 5.0} if pooling == "gsp" else {}
    classes = 64
    torch.manual_seed(0)
    timm_args = {"img_size": size} if backbone.startswith("timm:vit") else {}
    module = DMLModule(
        backbone=BackboneConfig(backbone, pretrained=False, timm_args=timm_args),
        pooling=PoolingConfig(pooling, params),
        embedding_dim=512,
        loss=LossConfig("multi_similarity"),
        optimizer=OptimizerConfig(name="adamw", lr=1e-4),
        num_classes=classes,
        compile=mode == "compile",
    )
    data = SyntheticDataModule(
        train_classes=classes,
        test_classes=8,
        images_per_class=8,
        image_size=size,
        classes_per_batch=batch // 4,
        samples_per_class=4,
        batches_per_epoch=batches_per_epoch,
    )
    return module, data, batch


class StepClock(pl.Callback):
    """Wall time from the start of step ``warmup`` to the end of the last step."""

    def __init__(self, warmup: int, device: torch.device):
        self.warmup, self.device, self.start, self.end = warmup, device, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup and self.start is None:
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.end = time.perf_counter()


def lightning_run(
    module,
    data,
    steps,
    warmup,
    device,
    precision,
    progress_bar=True,
    finite_check=True,
    extra_callbacks=(),
    log_every_step=False,
) -> float:
    """Seconds of steps warmup..steps-1 in a Lightning fit. ``progress_bar`` / ``finite_check``
    off: the breakdown's variants (the bar reads the logged loss on the host every step; the
    non-finite-loss guard records each step's loss on the device and reads it every 50 steps)."""
    clock = StepClock(warmup, device)
    if log_every_step:  # as before the losses were logged on the logger's steps only
        module.logs_this_step = lambda: True
    if not finite_check:
        module.loss_watch.record = lambda *args: None
        module.loss_is_finite = lambda total: True
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            accelerator=device.type,
            devices=1,
            max_steps=steps,
            precision=precision,
            logger=pl.loggers.CSVLogger(tmp, name="csv"),
            log_every_n_steps=10,
            enable_checkpointing=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            enable_model_summary=False,
            use_distributed_sampler=False,
            callbacks=[clock] + ([ProgressBar()] if progress_bar else []) + list(extra_callbacks),
            enable_progress_bar=progress_bar,
            default_root_dir=tmp,
        )
        trainer.fit(module, data)
    return clock.end - clock.start


class SyncCounter(pl.Callback):
    """Host-device synchronisations of the steps from ``warmup`` on, by the Python line that
    caused them (``torch.cuda.set_sync_debug_mode("warn")``: a warning per synchronising op)."""

    def __init__(self, warmup: int):
        self.warmup, self.counts, self.steps, self._catcher = warmup, {}, 0, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup and self._catcher is None:
            import warnings

            self._catcher = warnings.catch_warnings(record=True)
            self._records = self._catcher.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        if self._catcher is not None:
            self.steps += 1

    def on_train_end(self, trainer, pl_module):
        if self._catcher is None:
            return
        torch.cuda.set_sync_debug_mode(0)
        self._catcher.__exit__(None, None, None)
        for w in self._records:
            if "synchroniz" in str(w.message):
                key = f"{w.filename.split('site-packages/')[-1]}:{w.lineno}"
                self.counts[key] = self.counts.get(key, 0) + 1

    def per_step(self) -> dict:
        """Synchronisations per step by source line, most first."""
        return {
            key: n / max(1, self.steps)
            for key, n in sorted(self.counts.items(), key=lambda kv: -kv[1])
        }

    def report(self) -> str:
        lines = [f"synchronisations per step over {self.steps} steps:"]
        for key, n in sorted(self.counts.items(), key=lambda kv: -kv[1])[:12]:
            lines.append(f"  {n / max(1, self.steps):6.2f}  {key}")
        return "\n".join(lines)


def bare_run(module, data, steps, warmup, device, precision) -> float:
    """The same steps in a plain loop."""
    module.to(device).train()
    module.apply_device_settings(device)
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    data.setup("fit")
    bf16 = precision == "bf16-mixed"
    if module.pooling.wants_initialization():  # GSP's prototypes (Lightning: from GAP rows)
        module.pooling.initialize(torch.randn(256, 512, device=device))
    step, start = 0, None
    while step < steps:
        for images, labels, _ in data.train_dataloader():
            if step == warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = sum(module.objective(module.embed(images), labels).values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step == steps:
                break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", action="append", default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--batches-per-epoch",
        type=int,
        default=100,
        help="steps per epoch (a real epoch has hundreds; Lightning's epoch end "
        "costs more than a loader restart)",
    )
    parser.add_argument(
        "--count-syncs",
        action="store_true",
        help="CUDA: list the host-device synchronisations of a Lightning step "
        "by source line, then exit",
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also Lightning logging the losses every step (not only on the "
        "logger's steps), without its progress bar, and without the bar "
        "and the non-finite-loss guard (where the gap goes)",
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="seconds per case: start no round that would end after it",
    )
    parser.add_argument("--json", default=None, help="write the figures to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.count_syncs and device.type != "cuda":
        parser.error("--count-syncs: CUDA only (a CPU has no host-device synchronisation)")
    precision = "bf16-mixed" if device.type == "cuda" else "32-true"
    cases = args.case or (CUDA_CASES if device.type == "cuda" else CPU_CASES)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu, {torch.get_num_threads()} threads"
    )
    print(
        f"device {name}, torch {torch.__version__}, {precision}, steps {args.warmup}.."
        f"{args.steps - 1} timed, {args.rounds} alternating rounds",
        flush=True,
    )
    pl._logger.setLevel("ERROR")
    record = {
        "device": name,
        "torch": torch.__version__,
        "precision": precision,
        "steps": args.steps,
        "warmup": args.warmup,
        "cases": {},
    }
    if args.count_syncs:
        for case in cases:
            module, data, _ = build(case, device, args.batches_per_epoch)
            counter = SyncCounter(args.warmup)
            lightning_run(
                module, data, args.steps, args.warmup, device, precision, extra_callbacks=[counter]
            )
            print(f"{case}: {counter.report()}", flush=True)
            record["cases"][case] = {"steps": counter.steps, "per_step": counter.per_step()}
            write_json(args.json, record)
        return
    sides = {"lightning": lightning_run, "bare": bare_run}
    if args.breakdown:
        sides["self.log every step"] = lambda *a: lightning_run(*a, log_every_step=True)
        sides["no bar"] = lambda *a: lightning_run(*a, progress_bar=False)
        sides["no bar, no guard"] = lambda *a: lightning_run(
            *a, progress_bar=False, finite_check=False
        )
    extra = list(sides)[2:]
    print(
        "| case | lightning images/s | bare images/s | lightning / bare |"
        + "".join(f" {name} / bare |" for name in extra)
    )
    print("|---|---|---|---|" + "---|" * len(extra))
    results = {}
    for case in cases:
        module, data, batch = build(case, device, args.batches_per_epoch)
        initial = copy.deepcopy(module.state_dict())
        images = batch * (args.steps - args.warmup)
        rates = {side: [] for side in sides}
        record["cases"][case] = {"images_per_s": rates}
        longest, started = 0.0, time.perf_counter()
        for r in range(args.rounds):
            elapsed = time.perf_counter() - started
            if r > 0 and args.deadline is not None and elapsed + longest > args.deadline:
                print(
                    f"{case}: stopped after {r} rounds (deadline {args.deadline:.0f} s)", flush=True
                )
                break
            round_start = time.perf_counter()
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for side in order:
                fresh, data, _ = build(case, device, args.batches_per_epoch)
                fresh.load_state_dict(initial)
                rates[side].append(
                    images / sides[side](fresh, data, args.steps, args.warmup, device, precision)
                )
            longest = max(longest, time.perf_counter() - round_start)
            write_json(args.json, record)

        def per_round(side):
            ratios = [a / b for a, b in zip(rates[side], rates["bare"])]
            return ratios, f"{statistics.median(ratios):.3f} [{min(ratios):.3f}, {max(ratios):.3f}]"

        results[case] = per_round("lightning")[0]
        print(
            f"| {case} | {statistics.median(rates['lightning']):.1f} | "
            f"{statistics.median(rates['bare']):.1f} | {per_round('lightning')[1]} |"
            + "".join(f" {per_round(side)[1]} |" for side in extra),
            flush=True,
        )
    target = 0.90 if device.type == "cuda" else 0.95
    worst = min(statistics.median(r) for r in results.values())
    print(
        f"target lightning / bare >= {target}: {'met' if worst >= target else 'NOT met'} "
        f"(lowest median {worst:.3f})"
    )


def write_json(path, record) -> None:
    if path:  # atomically: a reader never sees half a file
        import json

        from dml.atomic_files import write_text_atomic

        write_text_atomic(path, json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
