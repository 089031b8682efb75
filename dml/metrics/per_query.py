"""Per-query retrieval results, and the per-class view of them.

Every retrieval metric of ``dml.metrics.retrieval_metrics`` is a mean over queries of a
per-query value (docs/evaluation.md, "Definitions"): for query q with R_q relevant references,

- Recall@K: [first_rank_q < K];
- MAP@R: ap_q = (1/R_q) sum_{i<=R_q} P(i) rel(i);
- R-Precision: rp_q = (relevant among the R_q nearest) / R_q.

``QueryResults`` keeps those values for each scored query (those with R_q >= 1), so that one
evaluation gives the metrics, their per-class means (the mean over the queries of each class,
and the "average of averages" over classes), the worst queries, and the paired comparison of two
models on the same queries (``dml.metrics.significance``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Sequence

import numpy as np


@dataclass
class QueryResults:
    """Per scored query (R >= 1), in query order: its row in the query set (``query_index``),
    its class, its number of relevant references R, the 0-based rank of its first relevant
    reference, its MAP@R and R-Precision terms. ``max_k``: the most neighbours a query has (a
    Recall@K with K beyond it is Recall@max_k). ``first_rank`` is exact below the largest K
    asked for; beyond it the torch pass (GPU, small CPU inputs) may give the count of the
    references strictly closer, not those tied with it at a smaller index (every Recall@K is
    exact either way); the compiled CPU pass gives it exactly."""

    query_index: np.ndarray
    labels: np.ndarray
    num_relevant: np.ndarray
    first_rank: np.ndarray
    ap: np.ndarray
    rp: np.ndarray
    max_k: int

    def __len__(self) -> int:
        return len(self.query_index)

    def hit(self, k: int) -> np.ndarray:
        """Recall@k of each query: 1.0 where a relevant reference is among its k nearest."""
        return (self.first_rank < min(int(k), self.max_k)).astype(np.float64)

    def values(self, ks: Sequence[int]) -> Dict[str, np.ndarray]:
        """Each metric's per-query values, keyed as ``retrieval_metrics`` keys its means."""
        out = {f"R@{int(k)}": self.hit(k) for k in sorted(set(int(k) for k in ks))}
        out["MAP@R"] = self.ap.astype(np.float64)
        out["R-Precision"] = self.rp.astype(np.float64)
        return out

    def metrics(self, ks: Sequence[int]) -> Dict[str, float]:
        """The means over queries: ``retrieval_metrics``' numbers."""
        return {name: float(v.sum() / len(v)) for name, v in self.values(ks).items()}

    def per_class(self, ks: Sequence[int]) -> List[Dict]:
        """One row per class, ascending label: {"class", "queries", <metric>: the mean over
        the class's queries}."""
        classes, inverse, counts = np.unique(self.labels, return_inverse=True, return_counts=True)
        rows: List[Dict[str, Any]] = [
            {"class": int(c), "queries": int(n)} for c, n in zip(classes, counts)
        ]
        for name, v in self.values(ks).items():
            means = np.bincount(inverse, weights=v, minlength=len(classes)) / counts
            for row, m in zip(rows, means):
                row[name] = float(m)
        return rows

    def class_mean(self, ks: Sequence[int]) -> Dict[str, float]:
        """Each metric averaged per class, then over classes (every class weighs the same;
        pytorch-metric-learning's ``avg_of_avgs``), keyed ``<metric> class-mean``."""
        rows = self.per_class(ks)
        names = list(self.values(ks))
        return {f"{n} class-mean": float(np.mean([r[n] for r in rows])) for n in names}

    def worst(self, count: int) -> np.ndarray:
        """Positions (into these results) of the ``count`` worst queries: the latest first
        relevant reference, then the lowest MAP@R, then the query index."""
        order = np.lexsort((self.query_index, self.ap, -self.first_rank))
        return order[:count]
