"""Recall@K, MAP@R and R-Precision from one exact k-nearest-neighbour pass.

Definitions (METHODS.md, "Common ground"):
- Recall@K is the DML hit rate: 1 if any of the K nearest references shares the query's class.
- For a query with R relevant references, MAP@R = (1/R) sum_{i<=R} P(i) rel(i) and
  R-Precision = (relevant among the R nearest) / R (Musgrave et al., 2020).

Queries with no relevant reference (a class seen once) are left out of every metric, as
pytorch-metric-learning's AccuracyCalculator does; the standard benchmarks have none.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional

import numpy as np
import torch

from dml.metrics.knn import knn


def _as_tensor(x, dtype=None) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    x = torch.as_tensor(x).detach().cpu()
    return x if dtype is None else x.to(dtype)


def relevant_counts(query_labels: torch.Tensor, reference_labels: torch.Tensor,
                    same_source: bool) -> torch.Tensor:
    """R for each query: references sharing its label (itself excluded when same_source)."""
    classes, ref_counts = torch.unique(reference_labels, return_counts=True)
    pos = torch.searchsorted(classes, query_labels).clamp_max(len(classes) - 1)
    counts = torch.where(classes[pos] == query_labels, ref_counts[pos], torch.zeros_like(pos))
    return counts - 1 if same_source else counts


def metrics_from_hits(hits: torch.Tensor, num_relevant: torch.Tensor,
                      ks: Iterable[int]) -> Dict[str, float]:
    """Metrics from a (n, k) boolean matrix of neighbour-is-relevant flags, sorted by distance.

    ``num_relevant`` (n,) holds R per query; every R must be >= 1 and <= k.
    """
    n, k = hits.shape
    out: Dict[str, float] = {}
    for K in ks:
        out[f"R@{K}"] = hits[:, :min(K, k)].any(1).double().mean().item()
    rank = torch.arange(1, k + 1)
    within_r = rank[None] <= num_relevant[:, None]
    rel = hits & within_r
    precision_at_i = rel.cumsum(1, dtype=torch.float64) / rank[None]
    r = num_relevant.double()
    out["MAP@R"] = ((precision_at_i * rel).sum(1) / r).mean().item()
    out["R-Precision"] = (rel.sum(1, dtype=torch.float64) / r).mean().item()
    return out


def retrieval_metrics(embeddings, labels, ks=(1, 2, 4, 8), gallery_embeddings=None,
                      gallery_labels=None, backend: str = "auto",
                      chunk_size: int = 8192) -> Dict[str, float]:
    """Recall@K for each K in ``ks``, MAP@R and R-Precision, from one k-NN pass.

    Without a gallery the queries are the references and each query is excluded by index; with
    one (In-Shop), queries search the gallery only. ``k = max(max K, largest R)`` neighbours are
    searched once, in float32. Returns floats in [0, 1] keyed ``R@<k>``, ``MAP@R``,
    ``R-Precision``. Torch tensors or numpy arrays in.
    """
    if (gallery_embeddings is None) != (gallery_labels is None):
        raise ValueError("retrieval_metrics: give both gallery_embeddings and gallery_labels, "
                         "or neither")
    ks = sorted(int(k) for k in ks)
    if not ks or ks[0] < 1:
        raise ValueError(f"retrieval_metrics: ks must be positive integers, got {ks}")
    query = _as_tensor(embeddings, torch.float32)
    q_labels = _as_tensor(labels, torch.long).view(-1)
    same_source = gallery_embeddings is None
    reference = query if same_source else _as_tensor(gallery_embeddings, torch.float32)
    r_labels = q_labels if same_source else _as_tensor(gallery_labels, torch.long).view(-1)
    if query.ndim != 2 or reference.ndim != 2 or query.shape[1] != reference.shape[1]:
        raise ValueError(f"retrieval_metrics: embeddings must be 2-D with equal widths, got "
                         f"{tuple(query.shape)} and {tuple(reference.shape)}")
    if len(q_labels) != len(query) or len(r_labels) != len(reference):
        raise ValueError("retrieval_metrics: one label per embedding is required")

    num_relevant = relevant_counts(q_labels, r_labels, same_source)
    has_relevant = num_relevant > 0
    if not has_relevant.any():
        raise ValueError("retrieval_metrics: no query has a relevant reference")

    max_k = len(reference) - (1 if same_source else 0)
    k = min(max(ks[-1], int(num_relevant.max())), max_k)
    _, indices = knn(query, None if same_source else reference, k=k, backend=backend,
                     chunk_size=chunk_size)

    keep = has_relevant.nonzero().view(-1)
    totals: Dict[str, float] = {}
    # Metrics are means over queries: accumulate per chunk to bound memory at SOP scale.
    for start in range(0, len(keep), chunk_size):
        rows = keep[start:start + chunk_size]
        hits = r_labels[indices[rows]] == q_labels[rows, None]
        part = metrics_from_hits(hits, num_relevant[rows], ks)
        for name, value in part.items():
            totals[name] = totals.get(name, 0.0) + value * len(rows)
    return {name: value / len(keep) for name, value in totals.items()}
