"""Two models on the same queries: their metrics, the paired differences, and where they differ.

``compare_models`` scores both ``ModelSets`` with the exact evaluator (``query_results``: the
tie rule and query exclusion of ``retrieval_metrics``), then tests each metric's difference B - A
with the paired bootstrap (over queries or over classes) and Recall@1's with McNemar's test
(``dml.metrics.significance``; docs/evaluation.md, "Comparing two models").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from dml.compare.inputs import ModelSets, check_same_split
from dml.metrics.ordering import key_index, squared_distances, stable_smallest
from dml.metrics.per_query import QueryResults
from dml.metrics.retrieval import query_results
from dml.metrics.significance import Difference, McNemar, mcnemar, paired_bootstrap


@dataclass
class Comparison:
    a: ModelSets
    b: ModelSets
    results_a: QueryResults
    results_b: QueryResults
    ks: List[int]
    unit: str  # "query" or "class": what the bootstrap resamples
    resamples: int
    level: float
    seed: int
    differences: Dict[str, Difference]
    mcnemar: McNemar

    @property
    def classes(self) -> int:
        return len(np.unique(self.results_a.labels))


def results_of(model: ModelSets, ks: Sequence[int]) -> QueryResults:
    """Per-query results of one model (``query_results``)."""
    gallery = model.gallery
    return query_results(
        model.query.float32(),
        model.query.labels,
        ks,
        None if gallery is None else gallery.float32(),
        None if gallery is None else gallery.labels,
    )


def compare_models(
    a: ModelSets,
    b: ModelSets,
    ks: Optional[Sequence[int]] = None,
    unit: str = "query",
    resamples: int = 10000,
    level: float = 0.95,
    seed: int = 0,
) -> Comparison:
    """Both models' per-query results on the same split and every metric's B - A."""
    if unit not in ("query", "class"):
        raise ValueError(f"unit {unit!r}: expected query or class")
    b = check_same_split(a, b)
    ks = sorted(set(int(k) for k in (ks or a.recall_ks)) | {1})  # R@1: McNemar, class means
    ra, rb = results_of(a, ks), results_of(b, ks)
    groups = ra.labels if unit == "class" else None
    differences = paired_bootstrap(ra.values(ks), rb.values(ks), groups, resamples, level, seed)
    return Comparison(
        a, b, ra, rb, ks, unit, resamples, level, seed, differences, mcnemar(ra.hit(1), rb.hit(1))
    )


def nearest(model: ModelSets, query_rows: Sequence[int], k: int) -> np.ndarray:
    """(len(query_rows), k) reference rows nearest to these queries, under the evaluator's tie
    rule (squared distance, then reference index), each query left out of its own list when the
    split is searched against itself."""
    query = torch.from_numpy(model.query.float32()[np.asarray(query_rows, dtype=np.int64)])
    searched = model.query if model.gallery is None else model.gallery
    reference = torch.from_numpy(searched.float32())
    k = min(k, len(reference) - int(model.gallery is None))
    if len(query) == 0 or k < 1:
        return np.zeros((len(query), 0), dtype=np.int64)
    d = squared_distances(query, reference, (query * query).sum(1), (reference * reference).sum(1))
    if model.gallery is None:
        d[torch.arange(len(query)), torch.as_tensor(np.asarray(query_rows))] = float("inf")
    return key_index(stable_smallest(d, k, torch.arange(len(reference)))).numpy()
