"""Recall@K, MAP@R and R-Precision, exact, under one tie rule.

Definitions (docs/evaluation.md, "Definitions"):
- Recall@K is the DML hit rate: 1 if any of the K nearest references shares the query's class.
- For a query with R relevant references, MAP@R = (1/R) sum_{i<=R} P(i) rel(i) and
  R-Precision = (relevant among the R nearest) / R (Musgrave et al., 2020).

Tie rule: a query's references are ordered by (squared distance, reference index), exactly what
a stable sort of its distance row gives. A reference at the same distance as a relevant one
counts before it if its index is smaller, whatever its class. Every back end follows it:
- ``rank`` (default): the blocked pass of ``dml.metrics.ranking``: per query the rank of the
  first relevant reference and its R nearest, from one pass over the distance blocks (half of
  them when query = reference). No sorted list of K = 1000 neighbours is ever built.
- ``faiss`` / ``torch``: one k-NN search with k = max(max K, largest R) (``dml.metrics.knn``),
  then the metrics from the neighbour lists.

Queries are excluded from their own search by index. Queries with no relevant reference (a
class seen once) are left out of every metric, as pytorch-metric-learning's AccuracyCalculator
does; the standard benchmarks have none. Non-finite embeddings are an error, never a score.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch

from dml.metrics.knn import knn
from dml.metrics.ranking import precision_from_hits, query_stats


def _as_tensor(x, dtype=None) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    elif not isinstance(x, torch.Tensor):  # lists: on the CPU; tensors stay where they are
        x = torch.as_tensor(x, device="cpu")
    x = x.detach()
    return x if dtype is None else x.to(dtype)


def as_labels(x, what: str, caller: str) -> torch.Tensor:
    """Class labels as int64; a ValueError for labels that are not whole numbers (0.1 and 0.4
    cast to int would be one class), and for bools."""
    x = _as_tensor(x)
    if x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"{caller}: {what} must be integers, got {x.dtype}")
    if x.is_floating_point():
        whole = torch.isfinite(x) & (x == torch.round(x))
        if not bool(whole.all()):
            bad = x[~whole].reshape(-1)[:3].tolist()
            raise ValueError(f"{caller}: {what} must be integer class ids; got "
                             f"{int((~whole).sum())} that are not (e.g. {bad})")
    return x.to(torch.long)


def check_finite(embeddings: torch.Tensor, what: str, caller: str) -> None:
    """A clear error when rows hold NaN or inf, or are too large for float32 distances."""
    bad = ~torch.isfinite(embeddings).all(1)
    if bool(bad.any()):
        rows = bad.nonzero()[:, 0]
        raise ValueError(
            f"{caller}: {len(rows)} of {len(embeddings)} {what} are not finite (NaN or inf; first "
            f"rows {rows[:5].tolist()}). The model diverged or the checkpoint is broken; a "
            f"metric of these would mean nothing.")
    norms = (embeddings.double() ** 2).sum(1)
    if bool((norms > 1e37).any()):
        raise ValueError(f"{caller}: {what} have squared norms up to {float(norms.max()):.3g}, "
                         f"beyond float32 distances; normalise them first")


def relevant_counts(query_labels: torch.Tensor, reference_labels: torch.Tensor,
                    same_source: bool) -> torch.Tensor:
    """R for each query: references sharing its label (itself excluded when same_source)."""
    classes, ref_counts = torch.unique(reference_labels, return_counts=True)
    pos = torch.searchsorted(classes, query_labels).clamp_max(len(classes) - 1)
    counts = torch.where(classes[pos] == query_labels, ref_counts[pos], torch.zeros_like(pos))
    return counts - 1 if same_source else counts


def default_block_size(device: torch.device) -> int:
    """Rows and columns of one distance block: 1024 on a CPU (4 MiB, in cache); on a GPU the
    power of two whose block fits a quarter of the free memory at about 32 bytes per entry
    (the float32 distances, their int64 order keys, masks and the transposed pass), between
    1024 and 8192."""
    if device.type != "cuda":
        return 1024
    free, _ = torch.cuda.mem_get_info(device)
    side = int((free / 4 / 32) ** 0.5)
    return max(1024, min(8192, 1 << (max(side, 1).bit_length() - 1)))


def retrieval_metrics(embeddings, labels, ks=(1, 2, 4, 8), gallery_embeddings=None,
                      gallery_labels=None, backend: str = "auto",
                      chunk_size: Optional[int] = None,
                      device: Optional[torch.device] = None) -> Dict[str, float]:
    """Recall@K for each K in ``ks``, MAP@R and R-Precision, exact, in float32.

    Without a gallery the queries are the references and each query is excluded by index; with
    one (In-Shop), queries search the gallery only. Torch tensors or numpy arrays in; floats in
    [0, 1] out, keyed ``R@<k>``, ``MAP@R``, ``R-Precision``. Neighbours are ordered by
    (distance, reference index) in every back end (module docstring). NaN or inf in the
    embeddings raises ValueError.

    backend: "auto" = "rank" (one blocked distance pass), or "faiss" / "torch" (a k-NN search
    with k = max(max K, largest R)). chunk_size: the rank back end's block size (default
    ``default_block_size``: 1024 on a CPU, up to 8192 on a GPU by its free memory). device: where the rank back end computes (default: the embeddings').
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
    q_labels = as_labels(labels, "labels", "retrieval_metrics").reshape(-1)
    r_labels = q_labels if same_source else \
        as_labels(gallery_labels, "gallery_labels", "retrieval_metrics").reshape(-1)
    if query.ndim != 2 or reference.ndim != 2 or query.shape[1] != reference.shape[1]:
        raise ValueError(f"retrieval_metrics: embeddings must be 2-D with equal widths, got "
                         f"{tuple(query.shape)} and {tuple(reference.shape)}")
    if len(q_labels) != len(query) or len(r_labels) != len(reference):
        raise ValueError("retrieval_metrics: one label per embedding is required")
    check_finite(query, "embeddings", "retrieval_metrics")
    if not same_source:
        check_finite(reference, "gallery embeddings", "retrieval_metrics")

    num_relevant = relevant_counts(q_labels.cpu(), r_labels.cpu(), same_source)
    keep = (num_relevant > 0).nonzero().reshape(-1)
    if len(keep) == 0:
        raise ValueError("retrieval_metrics: no query has a relevant reference")
    max_k = len(reference) - int(same_source)
    ks_eff = [min(K, max_k) for K in ks]

    if backend in ("auto", "rank"):
        query, q_labels = query.to(device), q_labels.to(device)
        reference = query if same_source else reference.to(device)
        r_labels = q_labels if same_source else r_labels.to(device)
        first, ap, rp = query_stats(query, q_labels, reference, r_labels, same_source,
                                    max(ks_eff), chunk_size or default_block_size(device))
    else:
        k = min(max(ks[-1], int(num_relevant.max())), max_k)
        _, indices = knn(query, None if same_source else reference, k=k, backend=backend,
                         chunk_size=chunk_size or 4096)
        hits = (r_labels.cpu()[indices] == q_labels.cpu()[:, None])[keep]
        first = torch.where(hits.any(1), hits.int().argmax(1), torch.full_like(keep, k))
        ap, rp = precision_from_hits(hits, num_relevant[keep])
    n = len(keep)
    out = {f"R@{K}": float((first < Ke).sum()) / n for K, Ke in zip(ks, ks_eff)}
    out["MAP@R"] = float(ap.sum()) / n
    out["R-Precision"] = float(rp.sum()) / n
    return out
