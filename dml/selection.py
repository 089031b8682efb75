"""Greedy k-center (farthest-first traversal), used to initialise GSP prototypes and CCP proxies.

Each pick is the point whose squared Euclidean distance to the nearest already chosen point
(seeds included) is largest: it maximises the minimum distance at every step, the classic
2-approximation of the k-center problem. Ties go to the lowest index, so the result is
deterministic.
"""
from __future__ import annotations

from typing import Optional

import torch


def greedy_k_center(points: torch.Tensor, k: int, seeds: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Indices into ``points`` (N, d) of k farthest-first picks.

    ``seeds`` (S, d) are already-chosen centres that the picks must be far from (CCP seeds with
    the converged proxies); without seeds the first pick is the point farthest from the mean.
    If k > N, every point is picked once and the remaining picks repeat the farthest-first
    order from the start (the caller gets k indices either way).
    """
    if points.ndim != 2 or len(points) == 0:
        raise ValueError(f"greedy_k_center: points must be a non-empty (N, d) tensor, got "
                         f"{tuple(points.shape)}")
    if k < 1:
        raise ValueError(f"greedy_k_center: k must be >= 1, got {k}")
    x = points.detach().double()
    n = len(x)
    if seeds is not None and len(seeds) > 0:
        min_d = torch.cdist(x, seeds.detach().double().to(x.device)).pow(2).min(1).values
    else:
        min_d = (x - x.mean(0, keepdim=True)).pow(2).sum(1)
    picks = []
    for _ in range(min(k, n)):
        i = int(torch.argmax(min_d))  # argmax returns the first maximal index
        picks.append(i)
        min_d = torch.minimum(min_d, (x - x[i]).pow(2).sum(1))
        min_d[i] = -1.0  # never pick the same point twice
    order = torch.tensor(picks, dtype=torch.long, device=points.device)
    if k > n:
        order = order.repeat((k + n - 1) // n)[:k]
    return order
