"""Recall@K, MAP@R and R-Precision, exact, from one pass over the query-reference distances.

Definitions (METHODS.md, "Common ground"):
- Recall@K is the DML hit rate: 1 if any of the K nearest references shares the query's class.
- For a query with R relevant references, MAP@R = (1/R) sum_{i<=R} P(i) rel(i) and
  R-Precision = (relevant among the R nearest) / R (Musgrave et al., 2020).

Two exact back ends give the same numbers:
- ``rank`` (default): per chunk of queries, the squared distances to every reference (one
  matmul, on the embeddings' device), then
  Recall@K = [rank of the first relevant reference < K], the rank being the number of references
  strictly closer than it, and MAP@R / R-Precision from the R nearest (a top-k of the largest R
  in the chunk). No sorted list of K = 1000 neighbours is ever built; this is what makes the
  evaluator cost about one bare distance pass (benchmarks/README.md).
- ``faiss`` / ``torch``: one k-NN search with k = max(max K, largest R) (``dml.metrics.knn``),
  then the metrics from the neighbour lists.

Queries are excluded from their own search by index. Queries with no relevant reference (a
class seen once) are left out of every metric, as pytorch-metric-learning's AccuracyCalculator
does; the standard benchmarks have none. References at exactly the query's distance to a
relevant one are ordered arbitrarily by any k-NN search; the rank back end counts such ties in
the query's favour.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch

from dml.metrics.knn import knn


def _as_tensor(x, dtype=None) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    x = torch.as_tensor(x).detach()
    return x if dtype is None else x.to(dtype)


def relevant_counts(query_labels: torch.Tensor, reference_labels: torch.Tensor,
                    same_source: bool) -> torch.Tensor:
    """R for each query: references sharing its label (itself excluded when same_source)."""
    classes, ref_counts = torch.unique(reference_labels, return_counts=True)
    pos = torch.searchsorted(classes, query_labels).clamp_max(len(classes) - 1)
    counts = torch.where(classes[pos] == query_labels, ref_counts[pos], torch.zeros_like(pos))
    return counts - 1 if same_source else counts


def precision_metrics(hits: torch.Tensor, num_relevant: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-query MAP@R and R-Precision from (n, k) relevance flags of the k >= R nearest."""
    k = hits.shape[1]
    rank = torch.arange(1, k + 1, device=hits.device)
    rel = hits & (rank[None] <= num_relevant[:, None])
    precision_at_i = rel.cumsum(1, dtype=torch.float64) / rank[None]
    r = num_relevant.double()
    return {"MAP@R": (precision_at_i * rel).sum(1) / r,
            "R-Precision": rel.sum(1, dtype=torch.float64) / r}


def _rank_chunk(q, q_lab, q_index, reference, ref_sq, r_labels, sorted_order, class_start,
                num_relevant, ks, same_source):
    """Per-query metrics of one chunk of queries by the rank back end."""
    n = len(q)
    # ||q - r||^2 minus the per-query constant ||q||^2: the same order, one fused op.
    scores = torch.addmm(ref_sq[None], q, reference.T, beta=1.0, alpha=-2.0)
    rows = torch.arange(n, device=q.device)
    if same_source:
        scores[rows, q_index] = float("inf")
    # Distances to this query's relevant references, gathered by index (R is small).
    width = int(num_relevant.max()) + int(same_source)
    offsets = torch.arange(width, device=q.device)
    slots = class_start[:, None] + offsets[None]
    valid = offsets[None] < (num_relevant + int(same_source))[:, None]
    rel_idx = sorted_order[slots.clamp_max(len(sorted_order) - 1)]
    rel_d = scores.gather(1, rel_idx).masked_fill(~valid, float("inf"))
    first = rel_d.min(1).values
    rank_first = (scores < first[:, None]).sum(1)  # relevant neighbour's 0-based rank
    out = {f"R@{K}": (rank_first < K).double() for K in ks}
    nearest = torch.topk(scores, int(num_relevant.max()), dim=1, largest=False, sorted=True)[1]
    out.update(precision_metrics(r_labels[nearest] == q_lab[:, None], num_relevant))
    return out


def _knn_hits(query, reference, q_labels, r_labels, k, backend, chunk_size, same_source):
    _, indices = knn(query, None if same_source else reference, k=k, backend=backend,
                     chunk_size=chunk_size)
    return r_labels.cpu()[indices] == q_labels.cpu()[:, None]


def retrieval_metrics(embeddings, labels, ks=(1, 2, 4, 8), gallery_embeddings=None,
                      gallery_labels=None, backend: str = "auto", chunk_size: int = 2048,
                      device: Optional[torch.device] = None) -> Dict[str, float]:
    """Recall@K for each K in ``ks``, MAP@R and R-Precision, exact, in float32.

    Without a gallery the queries are the references and each query is excluded by index; with
    one (In-Shop), queries search the gallery only. Torch tensors or numpy arrays in; floats in
    [0, 1] out, keyed ``R@<k>``, ``MAP@R``, ``R-Precision``.

    backend: "auto" = "rank" (one chunked distance pass, see the module docstring), or "faiss"
    / "torch" (a k-NN search with k = max(max K, largest R)). device: where the rank back end
    computes (default: the embeddings' device).
    """
    if (gallery_embeddings is None) != (gallery_labels is None):
        raise ValueError("retrieval_metrics: give both gallery_embeddings and gallery_labels, "
                         "or neither")
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"retrieval_metrics: ks must be positive integers, got {ks}")
    if backend not in ("auto", "rank", "faiss", "torch"):
        raise ValueError(f"retrieval_metrics: unknown backend {backend!r}; expected auto, rank, "
                         "faiss or torch")
    query = _as_tensor(embeddings, torch.float32)
    device = torch.device(device) if device is not None else query.device
    same_source = gallery_embeddings is None
    reference = query if same_source else _as_tensor(gallery_embeddings, torch.float32)
    q_labels = _as_tensor(labels, torch.long).reshape(-1).to(device)
    r_labels = q_labels if same_source else _as_tensor(gallery_labels, torch.long).reshape(-1)
    r_labels = r_labels.to(device)
    if query.ndim != 2 or reference.ndim != 2 or query.shape[1] != reference.shape[1]:
        raise ValueError(f"retrieval_metrics: embeddings must be 2-D with equal widths, got "
                         f"{tuple(query.shape)} and {tuple(reference.shape)}")
    if len(q_labels) != len(query) or len(r_labels) != len(reference):
        raise ValueError("retrieval_metrics: one label per embedding is required")

    num_relevant = relevant_counts(q_labels, r_labels, same_source)
    keep = (num_relevant > 0).nonzero().reshape(-1)
    if len(keep) == 0:
        raise ValueError("retrieval_metrics: no query has a relevant reference")
    max_k = len(reference) - int(same_source)
    ks_eff = [min(K, max_k) for K in ks]

    totals: Dict[str, float] = {}

    def accumulate(part: Dict[str, torch.Tensor]):
        for name, value in part.items():
            totals[name] = totals.get(name, 0.0) + float(value.sum())

    if backend in ("auto", "rank"):
        query, reference = query.to(device), reference.to(device)
        ref_sq = (reference * reference).sum(1)
        sorted_order = torch.argsort(r_labels, stable=True)
        sorted_labels = r_labels[sorted_order]
        for start in range(0, len(keep), chunk_size):
            rows = keep[start:start + chunk_size].to(device)
            class_start = torch.searchsorted(sorted_labels, q_labels[rows])
            part = _rank_chunk(query[rows], q_labels[rows], rows, reference, ref_sq, r_labels,
                               sorted_order, class_start, num_relevant[rows], ks_eff,
                               same_source)
            accumulate(part)
    else:
        k = min(max(ks[-1], int(num_relevant.max())), max_k)
        hits_all = _knn_hits(query, reference, q_labels, r_labels, k, backend, chunk_size,
                             same_source)
        keep_cpu, nrel = keep.cpu(), num_relevant.cpu()
        for start in range(0, len(keep_cpu), chunk_size):
            rows = keep_cpu[start:start + chunk_size]
            hits = hits_all[rows]
            part = {f"R@{K}": hits[:, :K].any(1).double() for K in ks_eff}
            part.update(precision_metrics(hits, nrel[rows]))
            accumulate(part)
    out = {f"R@{K}": totals[f"R@{Ke}"] / len(keep) for K, Ke in zip(ks, ks_eff)}
    out["MAP@R"] = totals["MAP@R"] / len(keep)
    out["R-Precision"] = totals["R-Precision"] / len(keep)
    return out
