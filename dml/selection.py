"""Greedy k-center (farthest-first traversal), used to initialise GSP prototypes and CCP proxies.

Each pick is the point whose squared Euclidean distance to the nearest already chosen point
(seeds included) is largest: it maximises the minimum distance at every step, the classic
2-approximation of the k-center problem. Ties go to the lowest index, so the result is
deterministic.
"""

from __future__ import annotations

from typing import Optional

import torch


def greedy_k_center(
    points: torch.Tensor, k: int, seeds: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Indices into ``points`` (N, d) of k farthest-first picks.

    ``seeds`` (S, d) are already-chosen centres that the picks must be far from (CCP seeds with
    the converged proxies); without seeds the first pick is the point farthest from the mean.
    If k > N, every point is picked once and the remaining picks repeat the farthest-first
    order from the start (the caller gets k indices either way).
    """
    if points.ndim != 2 or len(points) == 0:
        raise ValueError(
            f"greedy_k_center: points must be a non-empty (N, d) tensor, got {tuple(points.shape)}"
        )
    if k < 1:
        raise ValueError(f"greedy_k_center: k must be >= 1, got {k}")
    x = points.detach().double()
    n = len(x)
    seeded = seeds is not None and len(seeds) > 0
    if seeded:
        min_d = torch.cdist(x, seeds.detach().double().to(x.device)).pow(2).min(1).values
    else:  # the mean only chooses the first pick; it is not a centre
        min_d = (x - x.mean(0, keepdim=True)).pow(2).sum(1)
    picks = []
    for _ in range(min(k, n)):
        i = int(torch.argmax(min_d))  # argmax returns the first maximal index
        d_new = (x - x[i]).pow(2).sum(1)
        min_d = torch.minimum(min_d, d_new) if (seeded or picks) else d_new
        picks.append(i)
        min_d[i] = -1.0  # never pick the same point twice
    order = torch.tensor(picks, dtype=torch.long, device=points.device)
    if k > n:
        order = order.repeat((k + n - 1) // n)[:k]
    return order


def greedy_k_center_batched(points: torch.Tensor, k: int, seeds: torch.Tensor) -> torch.Tensor:
    """``greedy_k_center`` for G independent groups at once (CCP: one group per class).

    points (G, N, d), seeds (G, S, d) with S >= 1 -> indices (G, k) into each group's points,
    each row the picks ``greedy_k_center(points[g], k, seeds[g])`` would make.
    """
    if points.ndim != 3 or points.shape[1] == 0:
        raise ValueError(
            f"greedy_k_center_batched: points must be (G, N, d) with N >= 1, got "
            f"{tuple(points.shape)}"
        )
    if seeds.ndim != 3 or seeds.shape[1] == 0 or seeds.shape[0] != points.shape[0]:
        raise ValueError(
            f"greedy_k_center_batched: seeds must be (G, S, d) with S >= 1 and the "
            f"points' G, got {tuple(seeds.shape)}"
        )
    if k < 1:
        raise ValueError(f"greedy_k_center_batched: k must be >= 1, got {k}")
    x = points.detach().double()
    groups, n = x.shape[:2]
    min_d = torch.cdist(x, seeds.detach().double().to(x.device)).pow(2).min(2).values  # (G, N)
    rows = torch.arange(groups, device=x.device)
    picks = []
    for _ in range(min(k, n)):
        i = torch.argmax(min_d, dim=1)  # first maximal index per group
        picks.append(i)
        min_d = torch.minimum(min_d, (x - x[rows, i].unsqueeze(1)).pow(2).sum(2))
        min_d[rows, i] = -1.0
    order = torch.stack(picks, dim=1).to(points.device)
    if k > n:
        order = order.repeat(1, (k + n - 1) // n)[:, :k]
    return order
