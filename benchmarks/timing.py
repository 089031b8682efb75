"""Timing helpers shared by the benchmark scripts (run from the repository root:
``python benchmarks/<script>.py``; this folder is then on sys.path).

``compare`` is the one way the scripts time variants against each other: each variant is warmed
up, then the variants are run in alternating rounds (A B, B A, A B, ...), so that a machine that
speeds up or slows down during the run (turbo, another process, a cold cache) moves every
variant alike; the result per variant is the median of its rounds with the lowest and highest,
and a ratio is the median of the per-round ratios.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Seconds per call in each round; ``median``, ``low``, ``high`` of them."""

    rounds: List[float]

    @property
    def median(self) -> float:
        return statistics.median(self.rounds)

    @property
    def low(self) -> float:
        return min(self.rounds)

    @property
    def high(self) -> float:
        return max(self.rounds)

    def __str__(self) -> str:
        return f"{1000 * self.median:.1f} ms [{1000 * self.low:.1f}, {1000 * self.high:.1f}]"


def compare(
    variants: Dict[str, Callable[[], object]],
    device: torch.device,
    rounds: int = 5,
    calls: int = 1,
    warmup: int = 2,
) -> Dict[str, Timing]:
    """Seconds per call of each variant: ``warmup`` calls each, then ``rounds`` rounds of
    ``calls`` calls of every variant, the order reversed every other round."""
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    sync(device)
    out = {name: Timing([]) for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            for _ in range(calls):
                variants[name]()
            sync(device)
            out[name].rounds.append((time.perf_counter() - t0) / calls)
    return out


def ratio(timings: Dict[str, Timing], numerator: str, denominator: str) -> Timing:
    """Per-round ratios numerator / denominator (the rounds ran side by side)."""
    return Timing([a / b for a, b in zip(timings[numerator].rounds, timings[denominator].rounds)])


def format_ratio(r: Timing) -> str:
    return f"{r.median:.3f} [{r.low:.3f}, {r.high:.3f}]"


def seconds_per_call(
    fn: Callable[[], object], repeats: int, device: torch.device, warmup: int = 2
) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls: for a single
    figure that is not compared with another variant (use ``compare`` for those)."""
    return compare({"fn": fn}, device, rounds=repeats, warmup=warmup)["fn"].median
