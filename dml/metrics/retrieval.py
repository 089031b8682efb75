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

from typing import Optional, Tuple

import numpy as np
import torch

from dml.metrics.knn import knn
from dml.metrics.per_query import QueryResults
from dml.metrics.ranking import precision_from_hits, query_stats, row_stats


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
            raise ValueError(
                f"{caller}: {what} must be integer class ids; got "
                f"{int((~whole).sum())} that are not (e.g. {bad})"
            )
    return x.to(torch.long)


def check_finite(embeddings: torch.Tensor, what: str, caller: str) -> None:
    """A clear error when rows hold NaN or inf, or are too large for float32 distances."""
    # one float32 pass settles the common case (NaN or inf in a row makes its sum NaN or inf);
    # its margin of 2 covers the float32 rounding of the sum, and float64 decides the rest
    if bool(((embeddings * embeddings).sum(1) <= 5e36).all()):
        return
    bad = ~torch.isfinite(embeddings).all(1)
    if bool(bad.any()):
        rows = bad.nonzero()[:, 0]
        raise ValueError(
            f"{caller}: {len(rows)} of {len(embeddings)} {what} are not finite (NaN or inf; first "
            f"rows {rows[:5].tolist()}). The model diverged or the checkpoint is broken; a "
            f"metric of these would mean nothing."
        )
    norms = (embeddings.double() ** 2).sum(1)
    if bool((norms <= 1e37).all()):
        return
    raise ValueError(
        f"{caller}: {what} have squared norms up to {float(norms.max()):.3g}, "
        f"beyond float32 distances; normalise them first"
    )


def relevant_counts(
    query_labels: torch.Tensor, reference_labels: torch.Tensor, same_source: bool
) -> torch.Tensor:
    """R for each query: references sharing its label (itself excluded when same_source)."""
    classes, ref_counts = torch.unique(reference_labels, return_counts=True)
    if len(classes) == 0:  # no reference at all: no query has a relevant one
        return torch.zeros_like(query_labels)
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


def retrieval_metrics(
    embeddings,
    labels,
    ks=(1, 2, 4, 8),
    gallery_embeddings=None,
    gallery_labels=None,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    device: Optional[torch.device] = None,
    per_class: bool = False,
):
    """Recall@K for each K in ``ks``, MAP@R and R-Precision, exact, in float32.

    Without a gallery the queries are the references and each query is excluded by index; with
    one (In-Shop), queries search the gallery only. Torch tensors or numpy arrays in; floats in
    [0, 1] out, keyed ``R@<k>``, ``MAP@R``, ``R-Precision``. Neighbours are ordered by
    (distance, reference index) in every back end (module docstring). NaN or inf in the
    embeddings raises ValueError.

    backend: "auto" = "rank" (one blocked distance pass), or "faiss" / "torch" (a k-NN search
    with k = max(max K, largest R)). chunk_size: the rank back end's block size (default
    ``default_block_size``: 1024 on a CPU, up to 8192 on a GPU by its free memory). device:
    where the rank back end computes (default: the embeddings').

    per_class: return ``(metrics, rows)`` instead: the metrics gain each one's mean over classes
    (``<metric> class-mean``, every class weighing the same), and ``rows`` holds one dict per
    class (``QueryResults.per_class``).
    """
    results = query_results(
        embeddings, labels, ks, gallery_embeddings, gallery_labels, backend, chunk_size, device
    )
    metrics = results.metrics(ks)
    if not per_class:
        return metrics
    return dict(metrics, **results.class_mean(ks)), results.per_class(ks)


def _inputs(embeddings, labels, ks, gallery_embeddings, gallery_labels, caller: str):
    """Validated (ks, query, q_labels, reference, r_labels, same_source)."""
    if (gallery_embeddings is None) != (gallery_labels is None):
        raise ValueError(f"{caller}: give both gallery_embeddings and gallery_labels, or neither")
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"{caller}: ks must be positive integers, got {ks}")
    query = _as_tensor(embeddings, torch.float32)
    same_source = gallery_embeddings is None
    reference = query if same_source else _as_tensor(gallery_embeddings, torch.float32)
    q_labels = as_labels(labels, "labels", caller).reshape(-1)
    r_labels = (
        q_labels if same_source else as_labels(gallery_labels, "gallery_labels", caller).reshape(-1)
    )
    if query.ndim != 2 or reference.ndim != 2 or query.shape[1] != reference.shape[1]:
        raise ValueError(
            f"{caller}: embeddings must be 2-D with equal widths, got "
            f"{tuple(query.shape)} and {tuple(reference.shape)}"
        )
    if len(q_labels) != len(query) or len(r_labels) != len(reference):
        raise ValueError(f"{caller}: one label per embedding is required")
    check_finite(query, "embeddings", caller)
    if not same_source:
        check_finite(reference, "gallery embeddings", caller)
    return ks, query, q_labels, reference, r_labels, same_source


def _scored(num_relevant: torch.Tensor, caller: str) -> torch.Tensor:
    keep = (num_relevant > 0).nonzero().reshape(-1)
    if len(keep) == 0:
        raise ValueError(f"{caller}: no query has a relevant reference")
    return keep


def query_results(
    embeddings,
    labels,
    ks=(1, 2, 4, 8),
    gallery_embeddings=None,
    gallery_labels=None,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    device: Optional[torch.device] = None,
) -> QueryResults:
    """The per-query values behind ``retrieval_metrics`` (same arguments, same tie rule):
    ``QueryResults`` of the queries with a relevant reference."""
    caller = "retrieval_metrics"
    if backend not in ("auto", "rank", "faiss", "torch"):
        raise ValueError(
            f"{caller}: unknown backend {backend!r}; expected auto, rank, faiss or torch"
        )
    ks, query, q_labels, reference, r_labels, same_source = _inputs(
        embeddings, labels, ks, gallery_embeddings, gallery_labels, caller
    )
    device = torch.device(device) if device is not None else query.device
    num_relevant = relevant_counts(q_labels.cpu(), r_labels.cpu(), same_source)
    keep = _scored(num_relevant, caller)
    max_k = len(reference) - int(same_source)
    if backend in ("auto", "rank"):
        query, q_labels = query.to(device), q_labels.to(device)
        reference = query if same_source else reference.to(device)
        r_labels = q_labels if same_source else r_labels.to(device)
        first, ap, rp = query_stats(
            query,
            q_labels,
            reference,
            r_labels,
            same_source,
            min(ks[-1], max_k),
            chunk_size or default_block_size(device),
        )
    else:
        k = min(max(ks[-1], int(num_relevant.max())), max_k)
        _, indices = knn(
            query,
            None if same_source else reference,
            k=k,
            backend=backend,
            chunk_size=chunk_size or 4096,
        )
        hits = (r_labels.cpu()[indices] == q_labels.cpu()[:, None])[keep]
        first = torch.where(hits.any(1), hits.int().argmax(1), torch.full_like(keep, k))
        ap, rp = precision_from_hits(hits, num_relevant[keep])
    return _results(keep, q_labels, num_relevant, first, ap, rp, max_k)


def results_from_distances(
    distances, labels, gallery_labels=None, max_elements: int = 1 << 24
) -> QueryResults:
    """``QueryResults`` of a given (n_q, n_r) dissimilarity matrix, or of a re-ranking's
    distances (``dml.reranking.Reranked``, made a block of rows at a time), under the same tie
    rule: (value, reference index). Without ``gallery_labels`` the rows and columns are one set
    and each query's own column is excluded."""
    caller = "results_from_distances"
    shape: Tuple[int, ...]
    if hasattr(distances, "rows"):
        rows_of, shape = distances.rows, (distances.num_queries, distances.num_references)
    else:
        d = _as_tensor(distances, torch.float32)
        rows_of, shape = (lambda a, b: d[a:b]), tuple(d.shape)
    q_labels = as_labels(labels, "labels", caller).reshape(-1).cpu()
    same_source = gallery_labels is None
    r_labels = (
        q_labels
        if same_source
        else as_labels(gallery_labels, "gallery_labels", caller).reshape(-1).cpu()
    )
    if len(shape) != 2 or shape != (len(q_labels), len(r_labels)):
        raise ValueError(
            f"{caller}: distances of shape {shape} for {len(q_labels)} queries "
            f"and {len(r_labels)} references"
        )
    num_relevant = relevant_counts(q_labels, r_labels, same_source)
    keep = _scored(num_relevant, caller)
    scored = torch.zeros(len(q_labels), dtype=torch.bool)
    scored[keep] = True
    step = max(1, max_elements // max(shape[1], 1))
    parts = []
    for s in range(0, len(q_labels), step):
        rows = torch.arange(s, min(s + step, len(q_labels)))[scored[s : s + step]]
        if len(rows) == 0:
            continue
        block = rows_of(s, s + step).float().cpu()[rows - s]
        if not bool(torch.isfinite(block).all()) or bool((block < 0).any()):
            raise ValueError(f"{caller}: distances must be finite and non-negative")
        parts.append(
            row_stats(
                block, q_labels[rows], r_labels, num_relevant[rows], rows if same_source else None
            )
        )
    first, ap, rp = (torch.cat(p) for p in zip(*parts))
    return QueryResults(
        keep.numpy(),
        q_labels[keep].numpy(),
        num_relevant[keep].numpy(),
        first.numpy(),
        ap.numpy(),
        rp.numpy(),
        len(r_labels) - int(same_source),
    )


def _results(keep, q_labels, num_relevant, first, ap, rp, max_k) -> QueryResults:
    return QueryResults(
        keep.cpu().numpy(),
        q_labels.cpu()[keep].numpy(),
        num_relevant[keep].cpu().numpy(),
        first.cpu().numpy(),
        ap.cpu().numpy(),
        rp.cpu().numpy(),
        max_k,
    )
