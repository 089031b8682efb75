"""Exact k-nearest-neighbour search in squared Euclidean distance.

One function, two back ends that return the same neighbours: faiss (``IndexFlatL2``, on the GPU
when faiss sees one) when it is installed, a chunked torch matmul + ``topk`` otherwise. Both are
brute force: nothing here is approximate.

Self-exclusion (query set = reference set) is done by index, never by dropping the first column:
with duplicate embeddings the query itself need not come first.
"""
from __future__ import annotations

import numpy as np
import torch

try:  # faiss is an optional extra: `pip install dml[cpu]` or `dml[gpu]`
    import faiss
except ImportError:  # pragma: no cover - exercised only where faiss is absent
    faiss = None

# faiss' GPU k-selection handles k up to this value; beyond it we search on the CPU.
_FAISS_GPU_MAX_K = 2048


def faiss_available() -> bool:
    return faiss is not None


def _as_float32_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def _as_float32_tensor(x) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    return x.detach().float()


def _faiss_search(query: np.ndarray, reference: np.ndarray, k: int):
    index = faiss.IndexFlatL2(reference.shape[1])
    if k <= _FAISS_GPU_MAX_K and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(reference)
    distances, indices = index.search(query, k)
    return torch.from_numpy(distances), torch.from_numpy(indices)


def _torch_search(query: torch.Tensor, reference: torch.Tensor, k: int, chunk_size: int):
    reference = reference.to(query.device)
    ref_sq = (reference * reference).sum(1)
    all_d, all_i = [], []
    for start in range(0, query.shape[0], chunk_size):
        q = query[start:start + chunk_size]
        # ||q - r||^2 = ||q||^2 - 2 q.r + ||r||^2, the same expansion faiss uses.
        d = (q * q).sum(1, keepdim=True) - 2.0 * (q @ reference.T) + ref_sq[None]
        dist, idx = torch.topk(d, k, dim=1, largest=False, sorted=True)
        all_d.append(dist.clamp_min_(0).cpu())
        all_i.append(idx.cpu())
    return torch.cat(all_d), torch.cat(all_i)


def knn(query, reference=None, k: int = 1, backend: str = "auto", chunk_size: int = 4096):
    """The k nearest references of each query: ``(squared distances, indices)``, each (n_q, k).

    With ``reference=None`` the queries search among themselves and each query's own index is
    removed from its list (the usual DML protocol for CUB, Cars and SOP).

    backend: "auto" (faiss when installed), "faiss" or "torch".
    """
    same_source = reference is None
    n_ref = (query if same_source else reference).shape[0]
    max_k = n_ref - 1 if same_source else n_ref
    if k < 1 or k > max_k:
        raise ValueError(f"knn: k={k} must be in [1, {max_k}] for {n_ref} reference embeddings")
    search_k = k + 1 if same_source else k

    if backend == "auto":
        backend = "faiss" if faiss_available() else "torch"
    if backend == "faiss":
        if not faiss_available():
            raise RuntimeError("knn: backend='faiss' but faiss is not installed "
                               "(pip install faiss-cpu, or dml[cpu])")
        q = _as_float32_numpy(query)
        r = q if same_source else _as_float32_numpy(reference)
        distances, indices = _faiss_search(q, r, search_k)
    elif backend == "torch":
        q = _as_float32_tensor(query)
        r = q if same_source else _as_float32_tensor(reference)
        distances, indices = _torch_search(q, r, search_k, chunk_size)
    else:
        raise ValueError(f"knn: unknown backend {backend!r}; expected 'auto', 'faiss' or 'torch'")

    indices = indices.long()
    if same_source:
        distances, indices = _drop_self(distances, indices)
    return distances, indices


def _drop_self(distances: torch.Tensor, indices: torch.Tensor):
    """Remove each row's own index from a (n, k+1) neighbour list, leaving (n, k).

    If the query is not among its k+1 neighbours (more than k exact duplicates), the farthest
    column is dropped instead.
    """
    n, k1 = indices.shape
    drop = indices == torch.arange(n)[:, None]
    # Keep exactly one dropped entry per row: the first self hit, or the last column.
    first = torch.where(drop.any(1), drop.float().argmax(1), torch.full((n,), k1 - 1))
    keep = torch.ones_like(drop)
    keep[torch.arange(n), first] = False
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
