"""The terminal progress bar, redrawn by time instead of every step."""

from __future__ import annotations

import time

from pytorch_lightning.callbacks import TQDMProgressBar


class ProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, redrawn at most every ``interval`` seconds (and at each bar's end)
    instead of every ``refresh_rate`` batches.

    Each redraw reads the logged metrics (``train/loss``) on the host: on a GPU a
    synchronisation that stops the CPU from queueing the next step, on a CPU a formatting pass.
    Lightning's default bar does that every step; on ``make train``'s small CNN (CPU) it cost
    about a fifth of the throughput (``benchmarks/train_throughput.py --breakdown``).
    """

    def __init__(self, interval: float = 0.5, leave: bool = False):
        super().__init__(refresh_rate=1, leave=leave)
        self.interval = interval
        self._last_draw = float("-inf")

    def _should_update(self, current: int, total) -> bool:
        if not self.is_enabled:
            return False
        now = time.monotonic()
        if current == total or now - self._last_draw >= self.interval:
            self._last_draw = now
            return True
        return False
