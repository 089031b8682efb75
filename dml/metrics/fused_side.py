"""The CPU main pass of one block side, fused: one read of the block per query.

``dml.metrics.ranking.BlockRanks`` visits each block of distances B once and serves, per
query q of a side (B's rows, or its columns when the side is the transposed one), three
updates. With f[q] the distance of q's nearest relevant reference and tau[q] an upper bound on
its R-th nearest distance:

    s_lt[q] += #{j : B[q, j] < f[q]},   s_before[q] += #{j : B[q, j] = f[q], index j < first[q]},

where first[q] is the index of q's first relevant reference (so the two sum to its exact rank,
ties included: no row needs recomputing), and every (B[q, j], index j) with B[q, j] <= tau[q]
enters q's list of its R[q] nearest, kept
sorted under the tie rule (distance, then reference index); once the list holds R[q] entries,
tau[q] shrinks to its last distance, and when tau[q] falls below f[q] the first relevant
reference cannot be among the R nearest: the list is emptied and tau[q] = -inf.

Eager torch needs a compare that writes a mask and a sum that reads it for each count (about
ten times the cost of reading the block once), and a dozen small operations per side for the
list; on the CPU these, not the GEMM, were the evaluation's cost on low-dimensional data. Here
the counts are one vectorised loop per query (LLVM, through numba), the few entries under tau
are inserted as they are found, and the queries are split over torch's number of threads. The
CUDA path keeps the torch operations.
"""

from __future__ import annotations

import threading

import numba
import numpy as np
import torch

_LOCK = threading.Lock()  # numba's default thread pool runs one parallel call at a time
_CHUNK = 256  # queries per task of the transposed pass (their accumulators stay in cache)
_GROUP = 32  # rows per group of the transposed pass: group minima locate entries <= tau
EMPTY_INDEX = np.iinfo(np.int64).max  # index of an empty list slot (its distance is +inf)


@numba.njit(inline="always")
def _insert(top_v, top_i, q, r, v, idx):  # pragma: no cover - compiled
    """Insert (v, idx) into q's sorted list of length r if it precedes the last entry."""
    last = r - 1
    if v > top_v[q, last] or (v == top_v[q, last] and idx >= top_i[q, last]):
        return
    p = last
    while p > 0 and (top_v[q, p - 1] > v or (top_v[q, p - 1] == v and top_i[q, p - 1] > idx)):
        top_v[q, p] = top_v[q, p - 1]
        top_i[q, p] = top_i[q, p - 1]
        p -= 1
    top_v[q, p] = v
    top_i[q, p] = idx


@numba.njit(inline="always")
def _settle(top_v, top_i, f, tau, q, r, tq):  # pragma: no cover - compiled
    """tau = tq (already the min with the list's R-th); a tau below f empties the list."""
    if f[q] > tq:
        for p in range(r):
            top_v[q, p] = np.inf
            top_i[q, p] = EMPTY_INDEX
        tau[q] = -np.inf
    else:
        tau[q] = tq


@numba.njit(parallel=True, nogil=True, cache=True)
def _rows(
    block, a, c, f, tau, num_relevant, ref_index, first_index, s_lt, s_before, top_v, top_i
):  # pragma: no cover - compiled
    n, width = block.shape
    for local in numba.prange(n):
        q = a + local
        fq, tq = f[q], tau[q]
        lt = np.int32(0)
        le = np.int32(0)
        under = np.int32(0)
        for j in range(width):
            v = block[local, j]
            lt += np.int32(v < fq)
            le += np.int32(v <= fq)
            under += np.int32(v <= tq)
        s_lt[q] += lt
        if le > lt:  # entries at exactly f: those with a smaller index rank before
            fi = first_index[q]
            tied = np.int32(0)
            for j in range(width):
                tied += np.int32((block[local, j] == fq) & (ref_index[c + j] < fi))
            s_before[q] += tied
        r = num_relevant[q]
        if under == 0 or r <= 0:
            continue
        last_v, last_i = top_v[q, r - 1], top_i[q, r - 1]
        for j in range(width):  # the row is still in cache
            v = block[local, j]
            # only an entry before the list's last can enter (a bound that only tightens)
            if v <= tq and (v < last_v or (v == last_v and ref_index[c + j] < last_i)):
                _insert(top_v, top_i, q, r, v, ref_index[c + j])
                last_v, last_i = top_v[q, r - 1], top_i[q, r - 1]
                tq = min(tq, last_v)
        _settle(top_v, top_i, f, tau, q, r, tq)


@numba.njit(parallel=True, nogil=True, cache=True)
def _columns(
    block, a, c, f, tau, num_relevant, ref_index, first_index, s_lt, s_before, top_v, top_i
):  # pragma: no cover - compiled
    width, n = block.shape
    groups = (width + _GROUP - 1) // _GROUP
    for k in numba.prange((n + _CHUNK - 1) // _CHUNK):
        s = k * _CHUNK
        e = min(n, s + _CHUNK)
        fl, tl = f[a + s : a + e].copy(), tau[a + s : a + e].copy()
        lt = np.zeros(e - s, np.int32)
        le = np.zeros(e - s, np.int32)
        under = np.zeros(e - s, np.int32)
        group_min = np.empty((groups, e - s), block.dtype)
        for g in range(groups):
            low = np.full(e - s, np.inf, block.dtype)
            for i in range(g * _GROUP, min(width, (g + 1) * _GROUP)):
                row = block[i, s:e]
                for t in range(e - s):
                    v = row[t]
                    lt[t] += np.int32(v < fl[t])
                    le[t] += np.int32(v <= fl[t])
                    under[t] += np.int32(v <= tl[t])
                    low[t] = min(low[t], v)
            group_min[g] = low
        # entries at exactly f (ties) and entries <= tau, row by row over the queries that
        # have any in the group: rows stay contiguous in memory (a column walk would not)
        ties = np.nonzero(le > lt)[0]
        listing = np.nonzero((under > 0) & (num_relevant[a + s : a + e] > 0))[0]
        first = first_index[a + s : a + e]
        before = np.zeros(e - s, np.int64)
        last_v = np.empty(e - s, top_v.dtype)
        last_i = np.empty(e - s, np.int64)
        for u in listing:
            last_v[u], last_i[u] = (
                top_v[a + s + u, num_relevant[a + s + u] - 1],
                top_i[a + s + u, num_relevant[a + s + u] - 1],
            )
        for g in range(groups):
            tied_here = np.array([u for u in ties if group_min[g, u] <= fl[u]], np.int64)
            listed_here = np.array([u for u in listing if group_min[g, u] <= tl[u]], np.int64)
            if len(tied_here) == 0 and len(listed_here) == 0:
                continue
            for i in range(g * _GROUP, min(width, (g + 1) * _GROUP)):
                row = block[i, s:e]
                idx = ref_index[c + i]
                for u in tied_here:
                    before[u] += (row[u] == fl[u]) & (idx < first[u])
                for u in listed_here:
                    v = row[u]
                    # only an entry before the list's last can enter (a bound that tightens)
                    if v <= tl[u] and (v < last_v[u] or (v == last_v[u] and idx < last_i[u])):
                        q = a + s + u
                        r = num_relevant[q]
                        _insert(top_v, top_i, q, r, v, idx)
                        last_v[u], last_i[u] = top_v[q, r - 1], top_i[q, r - 1]
                        tl[u] = min(tl[u], last_v[u])
        for t in range(e - s):
            s_lt[a + s + t] += lt[t]
            s_before[a + s + t] += before[t]
        for u in listing:
            _settle(top_v, top_i, f, tau, a + s + u, num_relevant[a + s + u], tl[u])


class FusedSides:
    """The per-query state of the CPU main pass: numpy views of BlockRanks' f, tau (updated in
    place), R and reference indices, the counts, and each query's list as (distance, index)
    arrays (``keys()`` gives it as order keys).

    ``first_index[q]``: the reference index of q's first relevant reference (the smallest index
    among its relevant ones at distance f). ``rank()`` = #{d < f} + #{d = f, index <
    first_index}: the exact 0-based rank of that reference under the tie rule, ties included."""

    def __init__(
        self,
        f: torch.Tensor,
        tau: torch.Tensor,
        num_relevant: torch.Tensor,
        ref_index: torch.Tensor,
        first_index: torch.Tensor,
        length: int,
    ):
        self.f, self.tau = f.numpy(), tau.numpy()
        self.r = num_relevant.numpy()
        self.ref_index = ref_index.numpy()
        self.first_index = first_index.numpy()
        self.s_lt = np.zeros(len(self.f), np.int64)
        self.s_before = np.zeros(len(self.f), np.int64)
        self.top_v = np.full((len(self.f), length), np.inf, dtype=self.f.dtype)
        self.top_i = np.full((len(self.f), length), EMPTY_INDEX, dtype=np.int64)

    def side(self, block: torch.Tensor, transposed: bool, a: int, c: int) -> None:
        """Serve queries a, a+1, ... (B's rows, or columns when ``transposed``) from the
        contiguous CPU block ``block`` whose references are c, c+1, ..."""
        kernel = _columns if transposed else _rows
        with _LOCK:
            most = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined] # set at import
            numba.set_num_threads(max(1, min(torch.get_num_threads(), most)))
            kernel(
                block.numpy(),
                a,
                c,
                self.f,
                self.tau,
                self.r,
                self.ref_index,
                self.first_index,
                self.s_lt,
                self.s_before,
                self.top_v,
                self.top_i,
            )

    def rank(self) -> torch.Tensor:
        """Per query, the exact rank of its first relevant reference (class docstring)."""
        return torch.from_numpy(self.s_lt + self.s_before)

    def keys(self) -> torch.Tensor:
        """Each query's list as int64 order keys, INT64_MAX where empty."""
        from dml.metrics.ordering import INT64_MAX, order_keys

        v, i = torch.from_numpy(self.top_v), torch.from_numpy(self.top_i)
        empty = i == EMPTY_INDEX
        return order_keys(v, i.masked_fill(empty, 0)).masked_fill(empty, INT64_MAX)
