"""Re-ranking after retrieval: k-reciprocal re-ranking and alpha-query expansion with
database-side augmentation (docs/evaluation.md, "Re-ranking").

Both give, for each query, a distance to every reference, from which the exact evaluator takes
the metrics under its tie rule (``dml.metrics.retrieval.results_from_distances``). Distances
are the squared Euclidean distances d(i, j) of the L2-normalised embeddings; neighbour lists
are ordered by (d, index), an item's own row first.

**k-reciprocal** (Zhong et al., CVPR 2017), over all items (queries and gallery; one set when
the split is searched against itself), as the authors' released ``re_ranking``:
- R(i, k): the j among i's k + 1 nearest whose k + 1 nearest hold i;
- the expansion R*(i): R(i, k1) joined with each R(c, round(k1 / 2)), c in R(i, k1), that shares
  more than 2/3 of its items with R(i, k1);
- V_i: weights exp(-d'(i, j)) on R*(i), summing to 1, with d' = d / max_j d(i, j);
- local query expansion: V_i <- the mean of V_j over i's k2 nearest (itself included);
- Jaccard distance J(i, j) = 1 - m / (2 - m), m = sum_k min(V_i,k, V_j,k);
- final distance (1 - lambda) J(i, j) + lambda d'(i, j).
V is kept sparse (about k1 nonzeros a row), so the cost is the neighbour search plus about
(items x nonzeros^2) pair terms, in query blocks: no items x items matrix is stored beyond one
block of rows.

**alpha-QE with DBA** (Radenovic, Tolias & Chum, TPAMI 2018): every reference is replaced by
x'_j = normalise(sum_{i in N_k(j)} max(0, x_j . x_i)^alpha x_i) over its k + 1 nearest references
(itself included, weight 1), then every query by q' = normalise(q + sum_{i in N_k(q)}
max(0, q . x'_i)^alpha x'_i) over its k nearest augmented references (itself left out when the
split is searched against itself); distances are then d(q', x').
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from dml.metrics.ordering import key_index, squared_distances, stable_smallest

RERANKERS = ("k_reciprocal", "alpha_qe")
DEFAULTS = {"k_reciprocal": {"k1": 20, "k2": 6, "lam": 0.3}, "alpha_qe": {"k": 2, "alpha": 3.0}}
Blocks = Callable[[int, int], torch.Tensor]  # (first row, end row) -> (rows, references)


@dataclass
class Reranked:
    """Re-ranked distances of ``num_queries`` queries to ``num_references`` references, made
    a block of query rows at a time (``rows(start, end)``)."""

    rows: Blocks
    num_queries: int
    num_references: int

    def dense(self) -> torch.Tensor:
        return self.rows(0, self.num_queries)


def nearest(
    items: torch.Tensor, k: int, block: int = 1024, others: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(indices, squared distances), each (n, k): the k nearest of ``others`` (default: the
    items themselves, each its own first) under the tie rule."""
    others = items if others is None else others
    k = min(k, len(others))
    sq, osq = (items * items).sum(1), (others * others).sum(1)
    index = torch.arange(len(others))
    idx, dist = [], []
    for s in range(0, len(items), block):
        d = squared_distances(items[s : s + block], others, sq[s : s + block], osq).clamp_min_(0)
        if others is items:  # itself first, even before an exact duplicate
            rows = torch.arange(s, min(s + block, len(items)))
            d[rows - s, rows] = -1.0
        top = key_index(stable_smallest(d, k, index))
        idx.append(top)
        dist.append(d.gather(1, top).clamp_min_(0))
    return torch.cat(idx), torch.cat(dist)


def _row_max(items: torch.Tensor, block: int = 1024) -> torch.Tensor:
    sq = (items * items).sum(1)
    return torch.cat(
        [
            squared_distances(items[s : s + block], items, sq[s : s + block], sq)
            .clamp_min_(0)
            .max(1)
            .values
            for s in range(0, len(items), block)
        ]
    )


def _reciprocal(rank: torch.Tensor, k: int) -> torch.Tensor:
    """(n, k + 1): i's k + 1 nearest where i is among theirs, -1 elsewhere."""
    forward = rank[:, : k + 1]
    me = torch.arange(len(rank))[:, None, None]
    back = (forward[forward] == me).any(-1)
    return torch.where(back, forward, torch.full_like(forward, -1))


def _expansion_weights(
    items: torch.Tensor, rank: torch.Tensor, k1: int, row_max: torch.Tensor, block: int = 256
):
    """V as (rows, cols, values) of a sparse matrix: exp(-d') on R*(i), normalised per row."""
    n = len(items)
    r1 = _reciprocal(rank, k1)
    rh = _reciprocal(rank, int(np.around(k1 / 2.0)))
    out = []
    for s in range(0, n, block):
        mine = r1[s : s + block]  # (b, k1 + 1)
        cand = rh[mine.clamp_min(0)]  # (b, k1 + 1, h + 1): R(c, k1/2) of each candidate
        valid = cand >= 0
        shared = ((cand[..., None] == mine[:, None, None, :]) & valid[..., None]).any(-1)
        size = valid.sum(-1)
        keep = (mine >= 0) & (shared.sum(-1) > 2.0 / 3.0 * size)
        extra = torch.where(keep[..., None] & valid, cand, torch.full_like(cand, -1))
        cols = torch.cat([mine, extra.flatten(1)], 1)
        rows = torch.arange(s, s + len(mine))[:, None].expand_as(cols)
        ok = cols >= 0
        key = torch.unique(rows[ok] * n + cols[ok])
        r, c = key // n, key % n
        d = ((items[r] - items[c]) ** 2).sum(1) / row_max[r]
        out.append((r, c, torch.exp(-d.double())))
    r, c, w = (torch.cat(x) for x in zip(*out))
    w = w / torch.zeros(n, dtype=torch.float64).index_add_(0, r, w)[r]
    return r.numpy(), c.numpy(), w.numpy()


def k_reciprocal(
    query: torch.Tensor,
    gallery: Optional[torch.Tensor] = None,
    k1: int = 20,
    k2: int = 6,
    lam: float = 0.3,
    block: int = 1024,
) -> Reranked:
    """k-reciprocal re-ranked distances (module docstring) of the queries to the gallery, or to
    each other (``gallery=None``; the evaluator leaves each query's own column out)."""
    from scipy import sparse

    if k1 < 1 or k2 < 1 or not 0 <= lam <= 1:
        raise ValueError(f"k_reciprocal: k1 {k1} and k2 {k2} must be >= 1, lam {lam} in [0, 1]")
    query = query.float().cpu()
    items = query if gallery is None else torch.cat([query, gallery.float().cpu()])
    n, n_q = len(items), len(query)
    rank, _ = nearest(items, k1 + 1, block)
    row_max = _row_max(items, block).clamp_min(1e-12)
    r, c, w = _expansion_weights(items, rank, k1, row_max)
    v = sparse.csr_matrix((w, (r, c)), shape=(n, n))
    if k2 > 1:  # local query expansion: the mean over the k2 nearest (itself included)
        near = rank[:, :k2].numpy()
        average = sparse.csr_matrix(
            (
                np.full(near.size, 1.0 / near.shape[1]),
                (np.repeat(np.arange(n), near.shape[1]), near.ravel()),
            ),
            shape=(n, n),
        )
        v = (average @ v).tocsr()
    v_columns = v.tocsc()
    start = n_q if gallery is not None else 0
    sq = (items * items).sum(1)

    def rows(a: int, b: int) -> torch.Tensor:
        b = min(b, n_q)  # the queries' rows only (items holds the gallery after them)
        shared = _min_sums(v[a:b], v_columns, n)[:, start:]
        jaccard = 1.0 - shared / (2.0 - shared)
        d = squared_distances(items[a:b], items[start:], sq[a:b], sq[start:]).clamp_min_(0)
        d = d / row_max[a:b, None]
        return ((1 - lam) * torch.from_numpy(jaccard).float() + lam * d).clamp_min_(0)

    return Reranked(rows, n_q, n - start)


def _min_sums(block, columns, n: int, step: int = 1 << 22) -> np.ndarray:
    """(rows of ``block``, n): sum_k min(V[i, k], V[j, k]) over the columns k both use; the
    pair terms a chunk of about ``step`` at a time."""
    block = block.tocoo()
    out = np.zeros(block.shape[0] * n)
    starts, col_rows, col_vals = columns.indptr, columns.indices, columns.data
    counts = (starts[1:] - starts[:-1])[block.col]  # pair terms of each entry of the block
    total = np.concatenate([[0], np.cumsum(counts)])
    lo = 0
    while lo < len(counts):
        hi = max(lo + 1, int(np.searchsorted(total, total[lo] + step, side="right")) - 1)
        entry = np.arange(lo, hi)
        m = counts[entry]
        a = np.repeat(entry, m)
        offset = np.arange(len(a)) - np.repeat(np.cumsum(m) - m, m)
        other = starts[block.col[a]] + offset
        value = np.minimum(block.data[a], col_vals[other])
        out += np.bincount(block.row[a] * n + col_rows[other], weights=value, minlength=len(out))
        lo = hi
    return out.reshape(block.shape[0], n)


def alpha_qe(
    query: torch.Tensor,
    gallery: Optional[torch.Tensor] = None,
    k: int = 2,
    alpha: float = 3.0,
    block: int = 1024,
) -> Reranked:
    """Distances after database-side augmentation and alpha-query expansion (module
    docstring)."""
    if k < 1 or alpha < 0:
        raise ValueError(f"alpha_qe: k {k} must be >= 1 and alpha {alpha} >= 0")
    query = F.normalize(query.float().cpu(), dim=1)
    same = gallery is None
    base = query if same else F.normalize(gallery.float().cpu(), dim=1)
    idx, _ = nearest(base, k + 1, block)  # itself first
    augmented = F.normalize(_weighted_sum(base, base, idx, alpha), dim=1)
    if same:
        idx, _ = nearest(query, k + 1, block, others=augmented)
        own = torch.arange(len(query))[:, None]
        # itself left out of its own expansion: the k nearest other augmented items
        order = torch.argsort((idx == own).to(torch.int8), dim=1, stable=True)
        idx = idx.gather(1, order)[:, :k]
    else:
        idx, _ = nearest(query, k, block, others=augmented)
    expanded = F.normalize(query + _weighted_sum(query, augmented, idx, alpha), dim=1)
    qsq, asq = (expanded * expanded).sum(1), (augmented * augmented).sum(1)

    def rows(a: int, b: int) -> torch.Tensor:
        return squared_distances(expanded[a:b], augmented, qsq[a:b], asq).clamp_min_(0)

    return Reranked(rows, len(query), len(augmented))


def _weighted_sum(
    centers: torch.Tensor, items: torch.Tensor, idx: torch.Tensor, alpha: float
) -> torch.Tensor:
    """sum_j max(0, c . x_j)^alpha x_j over each center's listed items."""
    neighbours = items[idx]  # (n, k, D)
    weights = torch.einsum("nd,nkd->nk", centers, neighbours).clamp_min(0) ** alpha
    return torch.einsum("nk,nkd->nd", weights, neighbours)


def settings(name: str, params: Optional[dict] = None) -> dict:
    """A re-ranking's parameters over ``DEFAULTS``, checked: a ValueError for an unknown name or
    parameter, a count that is not a whole number >= 1 (k1, k2, k), lam outside [0, 1] or a
    negative alpha."""
    if name not in RERANKERS:
        raise ValueError(f"re-ranking {name!r}: expected one of {', '.join(RERANKERS)}")
    params = dict(params or {})
    unknown = set(params) - set(DEFAULTS[name])
    if unknown:
        raise ValueError(
            f"re-ranking {name}: unknown parameters {sorted(unknown)}; it takes "
            f"{sorted(DEFAULTS[name])}"
        )
    out = dict(DEFAULTS[name], **params)
    for key, default in DEFAULTS[name].items():
        value = out[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise ValueError(f"re-ranking {name}: {key} {value!r} must be a number")
        if isinstance(default, int):  # counts stay counts (configs give floats)
            if float(value) != int(value) or value < 1:
                raise ValueError(f"re-ranking {name}: {key} {value} must be a whole number >= 1")
            out[key] = int(value)
    if "lam" in out and not 0 <= out["lam"] <= 1:
        raise ValueError(f"re-ranking {name}: lam {out['lam']} must be in [0, 1]")
    if "alpha" in out and out["alpha"] < 0:
        raise ValueError(f"re-ranking {name}: alpha {out['alpha']} must be >= 0")
    return out


def rerank(
    name: str, query: torch.Tensor, gallery: Optional[torch.Tensor] = None, **params
) -> Reranked:
    """A re-ranker by name (``RERANKERS``) with its parameters over ``DEFAULTS``
    (``settings``)."""
    checked = settings(name, params)
    return (k_reciprocal if name == "k_reciprocal" else alpha_qe)(query, gallery, **checked)


def row_blocks(reranked: Reranked, max_elements: int = 1 << 24) -> Iterator[Tuple[int, int]]:
    step = max(1, max_elements // max(reranked.num_references, 1))
    for s in range(0, reranked.num_queries, step):
        yield s, min(s + step, reranked.num_queries)
