"""A learning-rate schedule with a linear warm-up, stepped every optimizer step.

factor(s) = s / W for s < W (from 0, as DINO's and HIER's schedules), then the schedule of
``model.optimizer.scheduler`` over the remaining steps:
- cosine: 0.5 (1 + cos(pi (s - W) / (T - W))), T the run's total steps;
- step:   gamma^(number of milestones (in epochs) passed), an epoch being T / max_epochs steps;
- none:   1.
Used only when ``model.optimizer.warmup_epochs > 0``; without a warm-up the epoch-wise
torch schedulers stay (their checkpoint state is unchanged).
"""
from __future__ import annotations

import math
from typing import List


class WarmupSchedule:
    """The factor of ``torch.optim.lr_scheduler.LambdaLR``. Rebuilt from the config at every
    start: a checkpoint holds the step count only, so a resumed run with more epochs follows
    the longer schedule from that step."""

    def __init__(self, warmup_steps: int, total_steps: int, kind: str = "cosine",
                 steps_per_epoch: float = 1.0, milestones: List[int] = (), gamma: float = 0.1):
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
            epoch = step / self.steps_per_epoch
            return self.gamma ** sum(1 for m in self.milestones if epoch >= m)
        return 1.0
