"""Exact k-nearest-neighbour search in squared Euclidean distance, under the tie rule.

Neighbours are ordered by (distance, reference index): what a stable sort of the distance row
gives (``dml.metrics.ordering``). Two back ends return the same lists:
- ``torch``: a chunked distance matmul, then ``topk`` over order keys, which is exact for ties.
- ``faiss`` (``IndexFlatL2``, on the GPU when faiss sees one): faiss orders equal distances as
  its heaps happen to, so each list is asked for a few extra neighbours and re-sorted by
  (distance, index). Where the distance at the k-th place still equals the last one returned
  (a tie that may go on past the list), the row is recomputed by the torch back end. faiss'
  lists are thus never used where they could differ from the rule.

Self-exclusion (query set = reference set) is by index, never by dropping the first column:
with duplicate embeddings the query itself need not come first.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import numpy as np
import torch

from dml.metrics.ordering import key_index, key_value, order_keys, squared_distances

try:  # faiss is an optional extra: `pip install "dml-lightning[cpu]"` or `[gpu]`
    import faiss
except ImportError:  # pragma: no cover - exercised only where faiss is absent
    faiss = None  # type: ignore[assignment]

# faiss' GPU k-selection handles k up to this value; beyond it we search on the CPU.
_FAISS_GPU_MAX_K = 2048
# Extra neighbours asked of faiss, so that a tie at the k-th place is seen to end in the list.
_FAISS_PAD = 8


def faiss_available() -> bool:
    return faiss is not None


@functools.lru_cache(maxsize=None)
def faiss_gpu_works() -> bool:
    """Whether faiss sees a GPU and its GPU code runs on it (a faiss build without kernels for
    this GPU's architecture fails at the first search: then the search stays on the CPU, with
    one warning, instead of the evaluation failing)."""
    if faiss is None or not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0:
        return False
    try:
        index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(4))
        index.add(np.eye(4, dtype=np.float32))
        index.search(np.eye(4, dtype=np.float32), 2)
        return True
    except Exception as error:  # noqa: BLE001 - any failure means: search on the CPU
        warnings.warn(
            f"faiss sees {faiss.get_num_gpus()} GPU(s) but cannot search on them "
            f"({error}); k-NN searches run on the CPU. The faiss-gpu-cu12 wheels cover "
            f"compute capability 7.0-8.9; on newer GPUs install faiss-gpu from "
            f"conda-forge (environment.yml)",
            stacklevel=2,
        )
        return False


def _as_float32_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def _as_float32_tensor(x) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    return x.detach().float()


def _torch_search(
    query: torch.Tensor, reference: torch.Tensor, k: int, chunk_size: int, self_index=None
):
    """The k nearest under the tie rule; ``self_index[i]``: a reference to exclude for query
    i (its own index when query = reference)."""
    reference = reference.to(query.device)
    ref_sq = (reference * reference).sum(1)
    q_sq = (query * query).sum(1)
    ref_index = torch.arange(len(reference), device=query.device)
    all_d, all_i = [], []
    for start in range(0, query.shape[0], chunk_size):
        d = squared_distances(
            query[start : start + chunk_size], reference, q_sq[start : start + chunk_size], ref_sq
        )
        if self_index is not None:
            rows = torch.arange(len(d), device=d.device)
            d[rows, self_index[start : start + chunk_size].to(d.device)] = float("inf")
        keys = torch.topk(order_keys(d, ref_index), k, dim=1, largest=False, sorted=True).values
        all_d.append(key_value(keys).clamp_min_(0).cpu())
        all_i.append(key_index(keys).cpu())
    return torch.cat(all_d), torch.cat(all_i)


def _faiss_search(query: np.ndarray, reference: np.ndarray, k: int, same_source: bool):
    """faiss' lists of the k nearest (k + 1 with self, dropped after), made to follow the tie
    rule; rows it cannot settle come back in ``unsettled``."""
    n_ref = len(reference)
    search_k = min(k + int(same_source) + _FAISS_PAD, n_ref)
    index: Any = faiss.IndexFlatL2(reference.shape[1])
    if search_k <= _FAISS_GPU_MAX_K and faiss_gpu_works():
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(reference)
    found_d, found_i = index.search(query, search_k)
    found = order_keys(torch.from_numpy(found_d), torch.from_numpy(found_i).long())
    keys = torch.sort(found, dim=1).values
    distances, indices = key_value(keys), key_index(keys)
    if same_source:
        distances, indices = _drop_self(distances, indices)
    # the k-th distance equal to the last returned: the tie may continue past the list
    unsettled = (
        (distances[:, k - 1] == distances[:, -1])
        if search_k - int(same_source) > k
        else torch.zeros(len(query), dtype=torch.bool, device=distances.device)
    )
    if search_k == n_ref:  # every reference was returned: nothing lies past the list
        unsettled[:] = False
    return distances[:, :k].clamp_min(0), indices[:, :k], unsettled


def knn(query, reference=None, k: int = 1, backend: str = "auto", chunk_size: int = 4096):
    """The k nearest references of each query: ``(squared distances, indices)``, each (n_q, k),
    ordered by (distance, reference index).

    With ``reference=None`` the queries search among themselves and each query's own index is
    left out (the usual DML protocol for CUB, Cars and SOP).

    backend: "auto" (faiss when installed), "faiss" or "torch".
    """
    same_source = reference is None
    n_ref = (query if same_source else reference).shape[0]
    max_k = n_ref - 1 if same_source else n_ref
    if k < 1 or k > max_k:
        raise ValueError(f"knn: k={k} must be in [1, {max_k}] for {n_ref} reference embeddings")
    if backend == "auto":
        backend = "faiss" if faiss_available() else "torch"
    if backend not in ("faiss", "torch"):
        raise ValueError(f"knn: unknown backend {backend!r}; expected 'auto', 'faiss' or 'torch'")
    q = _as_float32_tensor(query)
    r = q if same_source else _as_float32_tensor(reference)
    self_index = torch.arange(len(q), device=q.device) if same_source else None
    if backend == "torch":
        return _torch_search(q, r, k, chunk_size, self_index)
    if not faiss_available():
        raise RuntimeError(
            "knn: backend='faiss' but faiss is not installed (pip install faiss-cpu, or dml[cpu])"
        )
    qn = _as_float32_numpy(q)
    distances, indices, unsettled = _faiss_search(
        qn, qn if same_source else _as_float32_numpy(r), k, same_source
    )
    if bool(unsettled.any()):
        rows = unsettled.nonzero()[:, 0]
        distances[rows], indices[rows] = _torch_search(
            q[rows.to(q.device)],
            r,
            k,
            chunk_size,
            self_index[rows.to(q.device)] if self_index is not None else None,
        )
    return distances, indices


def _drop_self(distances: torch.Tensor, indices: torch.Tensor):
    """Remove each row's own index from a (n, k+1) neighbour list, leaving (n, k).

    If the query is not in its list (more than k references precede it), the farthest column
    is dropped instead."""
    n, k1 = indices.shape
    rows = torch.arange(n, device=indices.device)
    drop = indices == rows[:, None]
    # Keep exactly one dropped entry per row: the first self hit, or the last column.
    first = torch.where(
        drop.any(1), drop.float().argmax(1), torch.full((n,), k1 - 1, device=indices.device)
    )
    keep = torch.ones_like(drop)
    keep[rows, first] = False
    return distances[keep].view(n, k1 - 1), indices[keep].view(n, k1 - 1)


def k_reciprocal_neighbors(query, k: int, reference=None, backend: str = "auto"):
    """k-reciprocal neighbours: j in N(i, k) and i in N(j, k).

    N(x, k) is x's k nearest neighbours by Euclidean distance, x itself excluded. With
    ``reference=None`` the queries are the reference set; otherwise reference j's N(j, k) is
    taken over the other references plus the query (so i in N(j, k) iff d(i, j) is at most
    j's k-th neighbour distance among the references). Returns ``(indices, mask)``, both
    (n_q, k): the k nearest references of each query and True where the pair is reciprocal.
    """
    distances, indices = knn(query, reference, k, backend=backend)
    if reference is None:
        kth = distances[:, -1]
    else:
        kth = knn(reference, None, k, backend=backend)[0][:, -1]
    bound = kth[indices]
    mask = distances <= bound + 1e-6 * bound.abs().clamp_min(1.0)
    return indices, mask
