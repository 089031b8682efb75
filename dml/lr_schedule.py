"""The learning-rate schedule, stepped every optimizer step and sized from the run's real length.

With W warm-up steps and T the optimizer steps the trainer will take (``run_length``: max_epochs,
max_steps, limit_train_batches, accumulate_grad_batches and the number of processes, as Lightning
counts them), the rate is lr * factor(s) at step s:

    factor(s) = s / W                                          for s < W (from 0, as DINO, HIER)
    cosine:     0.5 (1 + cos(pi min(1, (s - W) / (T - W))))    after, reaching 0 at step T
    step:       gamma ^ (number of milestones m with s >= m E), E the optimizer steps per epoch
    none:       1

``model.optimizer.scheduler`` picks the shape, ``model.optimizer.warmup_epochs`` gives W = round(
warmup_epochs * E). The schedule is a function of the step only and is rebuilt from the config
at every start: a checkpoint holds the step count, so a resumed run with more epochs follows the
longer schedule from the step it stopped at.
"""

from __future__ import annotations

import math
from typing import List, Tuple

from dml.errors import ConfigError


class WarmupSchedule:
    """factor(step) of ``torch.optim.lr_scheduler.LambdaLR`` (the formula above)."""

    def __init__(
        self,
        warmup_steps: int,
        total_steps: int,
        kind: str = "cosine",
        steps_per_epoch: float = 1.0,
        milestones: List[int] = (),
        gamma: float = 0.1,
    ):
        self.warmup_steps, self.total_steps = int(warmup_steps), int(total_steps)
        self.kind, self.steps_per_epoch = kind, float(steps_per_epoch)
        self.milestones, self.gamma = list(milestones), float(gamma)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        if self.kind == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - self.warmup_steps) / span)))
        if self.kind == "step":
            return self.gamma ** sum(1 for m in self.milestones if step >= m * self.steps_per_epoch)
        return 1.0


def run_length(trainer) -> Tuple[float, int]:
    """(T, E): the optimizer steps the trainer will take in the whole run (``inf`` when neither
    max_epochs nor max_steps bounds it) and in one epoch (the training batches of one process
    after ``limit_train_batches``, over ``accumulate_grad_batches``, rounded up as Lightning
    steps the last partial accumulation)."""
    total = trainer.estimated_stepping_batches  # loads the training data if it must
    batches = trainer.num_training_batches
    if not batches or batches == float("inf"):
        trainer.fit_loop.setup_data()
        batches = trainer.num_training_batches
    per_epoch = max(1, math.ceil(batches / max(1, trainer.accumulate_grad_batches)))
    return total, per_epoch


def build_schedule(optimizer_cfg, trainer) -> WarmupSchedule:
    """The factor for ``model.optimizer`` in this trainer's run; a ConfigError where a schedule
    needs a length the run does not have."""
    total, per_epoch = run_length(trainer)
    if math.isinf(total) and (optimizer_cfg.scheduler == "cosine"):
        raise ConfigError(
            "model.optimizer.scheduler: cosine needs the run's length; set "
            "trainer.max_epochs or trainer.max_steps"
        )
    warmup = round(optimizer_cfg.warmup_epochs * per_epoch)
    return WarmupSchedule(
        warmup,
        0 if math.isinf(total) else int(total),
        optimizer_cfg.scheduler,
        per_epoch,
        optimizer_cfg.milestones,
        optimizer_cfg.gamma,
    )
