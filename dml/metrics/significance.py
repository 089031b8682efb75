"""Is model B better than model A on the same queries, or is the difference chance?

Both models are scored on the same queries (``QueryResults``), so each metric's difference is
the mean of per-query differences d_q = m_B(q) - m_A(q) (docs/evaluation.md, "Comparing two
models"):

- **Paired bootstrap** (Efron & Tibshirani 1993; Koehn 2004): resample the queries with
  replacement B times, recompute the mean difference d*_b each time. The interval is the
  percentile interval [d*_(a/2), d*_(1-a/2)]; the two-sided p-value tests "no difference" on
  the resampled differences shifted to mean zero: p = (1 + #{|d*_b - d| >= |d|}) / (B + 1).
  ``unit="class"`` resamples whole classes instead (a cluster bootstrap: the queries of a class
  share their references and are not independent), the statistic still the mean over the
  resampled queries.
- **McNemar's test** for Recall@1, a yes/no per query: with n_10 queries right under A only and
  n_01 under B only, the exact two-sided p = min(1, 2 P[X <= min(n_10, n_01)]) for
  X ~ Binomial(n_10 + n_01, 1/2); also the continuity-corrected statistic
  (|n_10 - n_01| - 1)^2 / (n_10 + n_01).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np


@dataclass
class Difference:
    """B - A for one metric: the observed difference, its bootstrap interval and p-value."""

    a: float
    b: float
    difference: float
    low: float
    high: float
    p_value: float


def paired_bootstrap(
    a: Dict[str, np.ndarray],
    b: Dict[str, np.ndarray],
    groups: Optional[np.ndarray] = None,
    resamples: int = 10000,
    level: float = 0.95,
    seed: int = 0,
) -> Dict[str, Difference]:
    """Per metric (the keys of ``a``), B's mean minus A's with a percentile interval at
    ``level`` and a two-sided p-value, from ``resamples`` paired resamples of the queries
    (``groups=None``) or of the groups (one id per query, e.g. its class)."""
    names = list(a)
    if set(b) != set(names):
        raise ValueError(f"paired_bootstrap: metrics {sorted(a)} and {sorted(b)} differ")
    if not 0 < level < 1 or resamples < minimum_resamples(level):
        raise ValueError(
            f"paired_bootstrap: level {level} must be in (0, 1), and its interval "
            f"needs at least {minimum_resamples(level) if 0 < level < 1 else 1} "
            f"resamples (got {resamples})"
        )
    va = np.stack([np.asarray(a[n], dtype=np.float64) for n in names], 1)
    vb = np.stack([np.asarray(b[n], dtype=np.float64) for n in names], 1)
    if va.shape != vb.shape or len(va) == 0:
        raise ValueError(
            f"paired_bootstrap: {len(va)} and {len(vb)} queries; the two models "
            "must be scored on the same, non-empty set of queries"
        )
    if not (np.isfinite(va).all() and np.isfinite(vb).all()):
        raise ValueError("paired_bootstrap: per-query values hold NaN or inf")
    d = vb - va
    if groups is None:
        sums, counts = d, np.ones(len(d))
    else:
        groups = np.asarray(groups).reshape(-1)
        if len(groups) != len(d):
            raise ValueError(f"paired_bootstrap: {len(groups)} group ids for {len(d)} queries")
        _, inverse = np.unique(groups, return_inverse=True)
        sums = np.stack([np.bincount(inverse, weights=d[:, j]) for j in range(d.shape[1])], 1)
        counts = np.bincount(inverse).astype(np.float64)
    stats = _resampled_means(sums, counts, resamples, seed)
    observed = d.mean(0)
    tail = (1 - level) / 2
    low, high = np.quantile(stats, [tail, 1 - tail], axis=0)
    extreme = (np.abs(stats - observed) >= np.abs(observed) - 1e-12).sum(0)
    p = (1 + extreme) / (resamples + 1)
    return {
        n: Difference(
            float(va[:, j].mean()),
            float(vb[:, j].mean()),
            float(observed[j]),
            float(low[j]),
            float(high[j]),
            float(min(1.0, p[j])),
        )
        for j, n in enumerate(names)
    }


def minimum_resamples(level: float) -> int:
    """The fewest resamples whose percentile interval at ``level`` has a resample in each tail:
    B (1 - level) / 2 >= 1 (40 at 95 %)."""
    return int(np.ceil(2.0 / (1.0 - level) - 1e-9))


def _resampled_means(sums: np.ndarray, counts: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(resamples, metrics): the mean over units drawn with replacement, sum(sums) /
    sum(counts) of each draw; in chunks of about 2**24 draws."""
    rng = np.random.default_rng(seed)
    n = len(sums)
    out = np.empty((resamples, sums.shape[1]))
    step = max(1, (1 << 24) // n)
    for s in range(0, resamples, step):
        idx = rng.integers(0, n, size=(min(step, resamples - s), n))
        weights = np.stack([np.bincount(row, minlength=n) for row in idx]).astype(np.float64)
        out[s : s + len(idx)] = (weights @ sums) / (weights @ counts)[:, None]
    return out


@dataclass
class McNemar:
    only_a: int  # right under A, wrong under B
    only_b: int
    statistic: float  # continuity-corrected chi-square, 1 degree of freedom
    p_value: float  # exact (binomial)


def mcnemar(hit_a: np.ndarray, hit_b: np.ndarray) -> McNemar:
    """McNemar's test of two paired yes/no outcomes (module docstring)."""
    from scipy.stats import binom

    hit_a, hit_b = np.asarray(hit_a).astype(bool), np.asarray(hit_b).astype(bool)
    if hit_a.shape != hit_b.shape:
        raise ValueError(f"mcnemar: {hit_a.shape} and {hit_b.shape} outcomes")
    n10, n01 = int((hit_a & ~hit_b).sum()), int((~hit_a & hit_b).sum())
    n = n10 + n01
    if n == 0:
        return McNemar(0, 0, 0.0, 1.0)
    statistic = (abs(n10 - n01) - 1) ** 2 / n
    p = min(1.0, 2 * float(binom.cdf(min(n10, n01), n, 0.5)))
    return McNemar(n10, n01, float(statistic), p)
