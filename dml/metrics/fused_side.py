"""The CPU passes over one side of a distance block, compiled (numba).

``band_values`` serves the first pass over the band blocks: each query's relevant distances,
nothing else. The rest of this module is the main pass.

``dml.metrics.ranking.BlockRanks`` visits each block of distances B once and serves, per
query q of a side (B's rows, or its columns when the side is the transposed one), two
updates. Write ref(j) for the reference index of B's column j (its row, transposed), f[q] for
the distance of q's nearest relevant reference, first[q] for that reference's index (the
smallest such index) and tau[q] for an upper bound on its R-th nearest distance (at the start,
its farthest relevant distance: R distances bound the R-th smallest from above):

    rank[q] += #{j : (B[q, j], ref(j)) < (f[q], first[q])}   (lexicographic: the tie rule)

so rank[q] ends as the exact rank of the first relevant reference, ties included (no row is
recomputed); and every (B[q, j], ref(j)) below (tau[q], b[q]) enters q's list of its R[q]
nearest, kept sorted under the tie rule, where b[q] is the list's last index when the list is
full at tau[q] and +inf otherwise (a tie at tau enters only before the list's last entry).
Once the list holds R[q] entries, tau[q] shrinks to its last distance; when tau[q] falls below
f[q] the first relevant reference cannot be among the R nearest: the list is emptied and
tau[q] = -inf. The list is exact whatever order its entries arrive in; the order only decides
how many enter and leave again.

Cost. The counts are one vectorised pass (LLVM, through numba) that compares distances only;
the reference indices are read in a second pass only where the block holds an entry at exactly
f. A query with an entry <= tau in the block reads its row again. Along a row, that read counts
the entries below tau and takes the minimum of each of 64 lanes (the references j with the same
j mod 64); the scan then visits only the lanes whose minimum can still enter the list. In the
transposed side, a group of 32 references is scanned only for the queries that can take one of
its entries. Where more than a few entries tie at tau (a collapsed model: every distance equal)
the row scan instead visits the references in ascending index and stops as soon as no entry
below tau is left unvisited and the next index is past b[q]: at most R[q] ties enter per block,
instead of a scalar pass over the whole block; the transposed side walks its references in
ascending index in groups of 32 rows, and a query takes part in a group's scan only if the
group holds an entry below its tau or a tie at tau with an index below b[q]. The list work grows
with R: a class of a thousand identical rows costs about R^2 per query. The CUDA path keeps the
torch operations.
"""

from __future__ import annotations

import threading

import numba
import numpy as np
import torch

_LOCK = threading.Lock()  # numba's default thread pool runs one parallel call at a time
_CHUNK = 256  # queries per task of the transposed pass (their accumulators stay in cache)
_GROUP = 32  # rows per group of the transposed pass (in ascending reference index)
_LANES = 64  # row side: the references j with the same j mod _LANES form one lane
_FEW_TIES = 4  # row side: up to this many entries at exactly tau, the lanes in any order
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


@numba.njit(inline="always")
def _bound_index(top_v, top_i, q, r, tq):  # pragma: no cover - compiled
    """The index that goes with the bound tq: a reference at exactly tq enters q's list only
    below it (the list's last index when the list is full at tq, else any index)."""
    if r > 0 and top_v[q, r - 1] <= tq:
        return top_i[q, r - 1]
    return EMPTY_INDEX


@numba.njit(parallel=True, nogil=True, cache=True)
def _rows(
    block, a, c, order, f, tau, num_relevant, ref_index, first_index, rank, top_v, top_i, visits
):  # pragma: no cover - compiled
    n, width = block.shape
    index = ref_index[c : c + width]
    for local in numba.prange(n):
        q = a + local
        row = block[local]
        fq, fi, t0 = f[q], first_index[q], tau[q]
        lt = np.int32(0)
        le = np.int32(0)
        under = np.int32(0)
        for j in range(width):
            v = row[j]
            lt += np.int32(v < fq)
            le += np.int32(v <= fq)
            under += np.int32(v <= t0)
        if le > lt:  # entries at exactly f: those with a smaller index rank before
            for j in range(width):
                lt += np.int32((row[j] == fq) & (index[j] < fi))
        rank[q] += lt
        r = num_relevant[q]
        if under == 0 or r <= 0:
            continue
        # a second read: the entries below tau and the minimum of each lane (element-wise
        # minima over lanes vectorise; a float min-reduction does not)
        strict = np.int32(0)
        low = np.full(_LANES, np.inf, block.dtype)
        full = width - width % _LANES
        for s in range(0, full, _LANES):
            for lane in range(_LANES):
                v = row[s + lane]
                strict += np.int32(v < t0)
                low[lane] = min(low[lane], v)
        for j in range(full, width):
            strict += np.int32(row[j] < t0)
            low[j - full] = min(low[j - full], row[j])
        tq = t0
        bound = _bound_index(top_v, top_i, q, r, tq)
        if under - strict <= _FEW_TIES:  # the lanes whose minimum can enter, in any order
            for lane in range(_LANES):
                if low[lane] > tq:
                    continue
                for j in range(lane, width, _LANES):
                    visits[q] += 1
                    v = row[j]
                    if v <= tq and (v < tq or index[j] < bound):
                        _insert(top_v, top_i, q, r, v, index[j])
                        tq = min(tq, top_v[q, r - 1])
                        bound = _bound_index(top_v, top_i, q, r, tq)
        else:
            # ties at tau: visit in ascending reference index; once no entry below tau is
            # left, a later entry can only be a tie at tau with a larger index: stop there
            for k in range(width):
                visits[q] += 1
                j = order[k]
                v, idx = row[j], index[j]
                if v < t0:
                    strict -= 1
                if v < tq or (v == tq and idx < bound):
                    _insert(top_v, top_i, q, r, v, idx)
                    tq = min(tq, top_v[q, r - 1])
                    bound = _bound_index(top_v, top_i, q, r, tq)
                elif strict == 0 and (tq < t0 or idx >= bound):
                    break
        _settle(top_v, top_i, f, tau, q, r, tq)


@numba.njit(parallel=True, nogil=True, cache=True)
def _columns(
    block, a, c, order, f, tau, num_relevant, ref_index, first_index, rank, top_v, top_i, visits
):  # pragma: no cover - compiled
    width, n = block.shape
    groups = (width + _GROUP - 1) // _GROUP
    index = ref_index[c : c + width]
    for k in numba.prange((n + _CHUNK - 1) // _CHUNK):
        s = k * _CHUNK
        e = min(n, s + _CHUNK)
        m = e - s
        fl, fil, t0 = (
            f[a + s : a + e].copy(),
            first_index[a + s : a + e].copy(),
            tau[a + s : a + e].copy(),
        )
        lt = np.zeros(m, np.int32)
        le = np.zeros(m, np.int32)
        strict = np.zeros((groups, m), np.int32)
        low = np.full((groups, m), np.inf, block.dtype)
        # the block's rows (references) in ascending index, in groups of _GROUP
        for g in range(groups):
            sg, lg = strict[g], low[g]
            for p in range(g * _GROUP, min(width, (g + 1) * _GROUP)):
                row = block[order[p], s:e]
                for t in range(m):
                    v = row[t]
                    lt[t] += np.int32(v < fl[t])
                    le[t] += np.int32(v <= fl[t])
                    sg[t] += np.int32(v < t0[t])
                    lg[t] = min(lg[t], v)
        # entries at exactly f: those with a smaller index rank before (all the chunk's
        # queries at once where most have ties, else only those)
        tied = np.nonzero(le > lt)[0]
        if 4 * len(tied) > m:
            for p in range(width):
                row = block[order[p], s:e]
                idx = index[order[p]]
                for t in range(m):
                    lt[t] += np.int32((row[t] == fl[t]) & (idx < fil[t]))
        elif len(tied) > 0:
            for p in range(width):
                row = block[order[p], s:e]
                idx = index[order[p]]
                for w in tied:
                    lt[w] += np.int32((row[w] == fl[w]) & (idx < fil[w]))
        for t in range(m):
            rank[a + s + t] += lt[t]
        # the list: group by group, the queries that can still take an entry of the group
        tl = t0.copy()
        bound = np.empty(m, np.int64)
        left = np.zeros(m, np.int32)  # entries below tau not yet visited
        live = np.empty(m, np.int64)
        n_live = 0
        for t in range(m):
            q = a + s + t
            r = num_relevant[q]
            bound[t] = _bound_index(top_v, top_i, q, r, tl[t])
            smallest = np.inf
            for g in range(groups):
                left[t] += strict[g, t]
                smallest = min(smallest, low[g, t])
            if r > 0 and smallest <= t0[t]:
                live[n_live] = t
                n_live += 1
        listed = live[:n_live].copy()
        here = np.empty(m, np.int64)
        for g in range(groups):
            if n_live == 0:
                break
            first_row = g * _GROUP
            n_here = 0
            for u in range(n_live):
                t = live[u]
                if strict[g, t] > 0 or (
                    tl[t] == t0[t] and low[g, t] == t0[t] and index[order[first_row]] < bound[t]
                ):
                    here[n_here] = t
                    n_here += 1
            for u in range(n_here):
                visits[a + s + here[u]] += min(width, first_row + _GROUP) - first_row
            for p in range(first_row, min(width, first_row + _GROUP)):
                i = order[p]
                row = block[i, s:e]
                idx = index[i]
                for u in range(n_here):
                    t = here[u]
                    v = row[t]
                    if v < tl[t] or (v == tl[t] and idx < bound[t]):
                        q = a + s + t
                        r = num_relevant[q]
                        _insert(top_v, top_i, q, r, v, idx)
                        tl[t] = min(tl[t], top_v[q, r - 1])
                        bound[t] = _bound_index(top_v, top_i, q, r, tl[t])
            # keep the queries that a later group (larger indices) can still feed
            next_row = min(width - 1, first_row + _GROUP)
            kept = 0
            for u in range(n_live):
                t = live[u]
                left[t] -= strict[g, t]
                if left[t] > 0 or (tl[t] == t0[t] and index[order[next_row]] < bound[t]):
                    live[kept] = t
                    kept += 1
            n_live = kept
        for t in listed:
            q = a + s + t
            _settle(top_v, top_i, f, tau, q, num_relevant[q], tl[t])


# --- the first (band) pass ----------------------------------------------------------------------
@numba.njit(inline="always")
def _relevant_values(
    block, transposed, local, a, c, width, same, cs, ce, rel_vals
):  # pragma: no cover - compiled
    """Query a + local's relevant references that fall in this side: their distances."""
    q = a + local
    for col in range(max(cs[q], c), min(ce[q], c + width)):
        if not (same and col == q):
            v = block[col - c, local] if transposed else block[local, col - c]
            rel_vals[q, col - cs[q]] = v


@numba.njit(parallel=True, nogil=True, cache=True)
def _band_values(block, transposed, a, c, same, cs, ce, rel_vals):  # pragma: no cover - compiled
    n = block.shape[1] if transposed else block.shape[0]
    width = block.shape[0] if transposed else block.shape[1]
    for local in numba.prange(n):
        _relevant_values(block, transposed, local, a, c, width, same, cs, ce, rel_vals)


def _launch(kernel, *args) -> None:
    """Run a parallel kernel on torch's thread count (at most numba's), one call at a time."""
    with _LOCK:
        most = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined] # set at import
        numba.set_num_threads(max(1, min(torch.get_num_threads(), most)))
        kernel(*args)


def band_values(block, transposed, a, c, same, cs, ce, rel_vals) -> None:
    """The first pass over one side of a band block on the CPU: each query's relevant distances
    into ``rel_vals`` (slot = reference - cs; its own slot never written). Arguments as
    ``FusedSides.side``; ``cs``, ``ce`` and ``rel_vals`` are BlockRanks' tensors."""
    args = (block.numpy(), transposed, a, c, same, cs.numpy(), ce.numpy(), rel_vals.numpy())
    _launch(_band_values, *args)


class FusedSides:
    """The per-query state of the CPU main pass: numpy views of BlockRanks' f, tau (updated in
    place), R and reference indices, each query's count, and its list as (distance, index)
    arrays (``indices()`` gives its reference indices).

    ``first_index[q]``: the reference index of q's first relevant reference (the smallest index
    among its relevant ones at distance f). ``rank()`` = #{(d, index) < (f, first_index)}: the
    exact 0-based rank of that reference under the tie rule, ties included."""

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
        self.count = np.zeros(len(self.f), np.int64)
        self.visits = np.zeros(len(self.f), np.int64)  # entries each query's list scans read
        self.top_v = np.full((len(self.f), length), np.inf, dtype=self.f.dtype)
        self.top_i = np.full((len(self.f), length), EMPTY_INDEX, dtype=np.int64)
        self._orders: dict = {}

    def _order(self, c: int, width: int) -> np.ndarray:
        """Positions of references c .. c + width - 1 in ascending reference index."""
        key = (c, width)
        if key not in self._orders:
            self._orders[key] = np.argsort(self.ref_index[c : c + width], kind="stable")
        return self._orders[key]

    def side(self, block: torch.Tensor, transposed: bool, a: int, c: int) -> None:
        """Serve queries a, a+1, ... (B's rows, or columns when ``transposed``) from the
        contiguous CPU block ``block`` whose references are c, c+1, ..."""
        kernel = _columns if transposed else _rows
        width = block.shape[0] if transposed else block.shape[1]
        _launch(
            kernel,
            block.numpy(),
            a,
            c,
            self._order(c, width),
            self.f,
            self.tau,
            self.r,
            self.ref_index,
            self.first_index,
            self.count,
            self.top_v,
            self.top_i,
            self.visits,
        )

    def rank(self) -> torch.Tensor:
        """Per query, the exact rank of its first relevant reference (class docstring)."""
        return torch.from_numpy(self.count)

    def indices(self) -> torch.Tensor:
        """Each query's list as reference indices in order, INT64_MAX (``EMPTY_INDEX``) where
        empty."""
        return torch.from_numpy(self.top_i)
