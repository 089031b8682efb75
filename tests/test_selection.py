"""Greedy k-center (farthest-first) selection against brute force (GSP's prototypes, CCP's
proxies)."""

import numpy as np
import torch

from dml.selection import greedy_k_center


def test_greedy_k_center_maximises_the_minimum_distance_at_each_pick():
    rng = np.random.default_rng(0)
    points = torch.from_numpy(rng.normal(size=(25, 3)))
    seeds = torch.from_numpy(rng.normal(size=(2, 3)))
    picks = greedy_k_center(points, 6, seeds=seeds).tolist()
    chosen = [s.numpy() for s in seeds]
    for pick in picks:  # brute force: the farthest point from everything chosen so far
        d = [min(((p - c) ** 2).sum() for c in chosen) for p in points.numpy()]
        assert pick == int(np.argmax(d))
        chosen.append(points[pick].numpy())
    assert len(set(picks)) == 6
    assert greedy_k_center(points, 6, seeds=seeds).tolist() == picks  # deterministic


def test_greedy_k_center_more_picks_than_points():
    points = torch.eye(3)
    picks = greedy_k_center(points, 7)
    assert len(picks) == 7 and set(picks.tolist()) == {0, 1, 2}
