"""Per-query ranking statistics, exact under the tie rule of ``dml.metrics.ordering``.

For every query with R >= 1 relevant references, three numbers are all the retrieval metrics
need (docs/evaluation.md, "Definitions"):
- ``first_rank``: the 0-based position of the first relevant reference (Recall@K = [first_rank
  < K]);
- ``ap``: MAP@R's per-query term (1/R) sum_{i<=R} P(i) rel(i);
- ``rp``: R-Precision's, (relevant among the R nearest) / R.

Two computations give them:
- ``exact_query_stats``: per chunk of queries, the whole distance row as order keys, the first
  relevant key, a count of the keys below it, and the R smallest keys. Simple and exact; the
  block pass falls back to it for rows it cannot settle.
- ``BlockRanks``: the fast pass. Queries and references are sorted by label so that each query's
  relevant references sit in a few "band" blocks near the diagonal. A first pass over the band
  blocks gives each query the distance f of its nearest relevant reference and tau, the R-th
  smallest distance it saw there (any R distances bound the R-th nearest from above; on the CPU's
  compiled path, from ``fused_min_pairs`` pairs, the farthest relevant distance, which costs no
  read beyond the relevant entries: the main pass there visits the band blocks first, so each
  list fills from its own class's block and tau shrinks early); the band blocks are kept for the
  main pass while they fit ``kept_bytes``. The main pass then visits every block once (with
  query = reference only the blocks on and above the diagonal: each serves its rows and,
  transposed, its columns) and per query adds two counts, of distances < f and <= f, and merges
  the few references with distance <= tau into its list of the R nearest under the tie rule (tau
  only shrinks: the smaller of itself and the list's R-th distance once the list holds R). A
  min-reduction of each block first finds the queries whose smallest distance there is at most
  max(f, tau): only they can have anything to count or list, and when they are few only their
  rows are compared. On the CPU a side is instead served by ``dml.metrics.fused_side`` (the same
  list, compiled, and the rank counted exactly under ties). The first relevant reference is then
  read from the list when it is among the R nearest, else its rank is the count below f. Rows the
  torch pass cannot settle exactly (a non-relevant reference at exactly f whose order decides a
  Recall@K, or a band block whose distances differ between the two passes) are recomputed by
  ``exact_query_stats``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from dml.metrics.ordering import (
    INT64_MAX,
    key_index,
    key_value,
    order_keys,
    squared_distances,
    stable_smallest,
)

Stats = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # first_rank, ap, rp


def precision_from_hits(hits: torch.Tensor, num_relevant: torch.Tensor):
    """Per-query MAP@R and R-Precision terms from (n, L) relevance flags of the L >= R nearest,
    in order."""
    k = hits.shape[1]
    rank = torch.arange(1, k + 1, device=hits.device)
    rel = hits & (rank[None] <= num_relevant[:, None])
    precision_at_i = rel.cumsum(1, dtype=torch.float64) / rank[None]
    r = num_relevant.double()
    return (precision_at_i * rel).sum(1) / r, rel.sum(1, dtype=torch.float64) / r


def exact_query_stats(
    query: torch.Tensor,
    q_labels: torch.Tensor,
    reference: torch.Tensor,
    r_labels: torch.Tensor,
    num_relevant: torch.Tensor,
    self_index: Optional[torch.Tensor] = None,
    max_elements: int = 1 << 24,
) -> Stats:
    """first_rank, ap, rp of each query (all with num_relevant >= 1) from its whole distance row.

    self_index: each query's own index in ``reference`` (excluded), or None."""
    device = query.device
    n_q, n_r = len(query), len(reference)
    ref_sq = (reference * reference).sum(1)
    q_sq = (query * query).sum(1)
    ref_index = torch.arange(n_r, device=device)
    first = torch.empty(n_q, dtype=torch.long, device=device)
    ap = torch.empty(n_q, dtype=torch.float64, device=device)
    rp = torch.empty(n_q, dtype=torch.float64, device=device)
    step = max(1, max_elements // max(n_r, 1))
    for s in range(0, n_q, step):
        sl = slice(s, s + step)
        d = squared_distances(query[sl], reference, q_sq[sl], ref_sq)
        first[sl], ap[sl], rp[sl] = row_stats(
            d,
            q_labels[sl],
            r_labels,
            num_relevant[sl],
            None if self_index is None else self_index[sl],
            ref_index,
        )
    return first, ap, rp


def row_stats(
    d: torch.Tensor,
    q_labels: torch.Tensor,
    r_labels: torch.Tensor,
    num_relevant: torch.Tensor,
    self_index: Optional[torch.Tensor] = None,
    ref_index: Optional[torch.Tensor] = None,
) -> Stats:
    """first_rank, ap, rp from whole rows of distances (n, n_r), any non-negative dissimilarity
    (a re-ranked distance too), under the tie rule. ``d`` is changed in place where
    ``self_index`` excludes a query's own entry."""
    if ref_index is None:
        ref_index = torch.arange(d.shape[1], device=d.device)
    relevant = r_labels[None, :] == q_labels[:, None]
    if self_index is not None:
        rows = torch.arange(len(d), device=d.device)
        d[rows, self_index] = float("inf")
        relevant[rows, self_index] = False
    keys = order_keys(d, ref_index)
    first_key = keys.masked_fill(~relevant, INT64_MAX).min(1).values
    first = (keys < first_key[:, None]).sum(1)
    top = keys.topk(int(num_relevant.max()), dim=1, largest=False, sorted=True).values
    hits = r_labels[key_index(top)] == q_labels[:, None]
    ap, rp = precision_from_hits(hits, num_relevant)
    return first, ap, rp


class BlockRanks:
    """The blocked exact pass (module docstring). ``run(max_k)`` returns (first_rank, ap, rp)
    for the queries with R >= 1, in their original order, and how many rows fell back to the
    exact row computation (``fallback_rows``)."""

    dense_share = 0.25  # above this share of a side's queries: the whole side, no gather
    fused_on_cpu = True  # CPU blocks: the main pass in one read (dml.metrics.fused_side)
    # ... from this many (query, reference) pairs: below, loading the compiled loop (about 1 s
    # per process) costs more than it saves
    fused_min_pairs = 1 << 22
    kept_bytes = 128 << 20  # band blocks kept from the first pass for the main one (no GEMM)

    def __init__(
        self,
        query: torch.Tensor,
        q_labels: torch.Tensor,
        reference: torch.Tensor,
        r_labels: torch.Tensor,
        same_source: bool,
        block_size: int = 1024,
    ):
        self.device = query.device
        self.same, self.T = same_source, int(block_size)
        self.query, self.q_labels_orig = query, q_labels
        self.reference, self.r_labels_orig = reference, r_labels
        q_order = torch.argsort(q_labels, stable=True)
        r_order = q_order if same_source else torch.argsort(r_labels, stable=True)
        self.q_order, self.r_orig = q_order, r_order
        self.Q, self.ql = query[q_order], q_labels[q_order]
        self.X = self.Q if same_source else reference[r_order]
        rl = self.ql if same_source else r_labels[r_order]
        self.q_sq = (self.Q * self.Q).sum(1)
        self.x_sq = self.q_sq if same_source else (self.X * self.X).sum(1)
        # each query's relevant references: permuted columns [cs, ce), itself excluded
        self.cs = torch.searchsorted(rl, self.ql)
        self.ce = torch.searchsorted(rl, self.ql, right=True)
        self.R = self.ce - self.cs - int(same_source)
        self.active = self.R > 0
        n_q = len(self.Q)
        self.L = max(int(self.R.max()), 1) if n_q else 1
        self.W = max(int((self.ce - self.cs).max()), 1) if n_q else 1
        self.slots = torch.arange(self.W, device=self.device)
        self.rel_vals = torch.full((n_q, self.W), float("inf"), device=self.device)
        self.top = torch.full((n_q, self.L), INT64_MAX, dtype=torch.long, device=self.device)
        self.s_lt = torch.zeros(n_q, dtype=torch.long, device=self.device)
        self.s_le = torch.zeros(n_q, dtype=torch.long, device=self.device)
        self.flag = torch.zeros(n_q, dtype=torch.bool, device=self.device)
        self.f = torch.full((n_q,), -float("inf"), device=self.device)
        self.tau = torch.full((n_q,), -float("inf"), device=self.device)
        self.near = torch.full((n_q, self.L), float("inf"), device=self.device)
        self.fallback_rows = 0
        self.fused = (
            self.fused_on_cpu
            and self.device.type == "cpu"
            and len(query) * len(reference) >= self.fused_min_pairs
        )
        self._mask = torch.empty(self.T * self.T, dtype=torch.bool, device=self.device)

    # --- blocks ---------------------------------------------------------------------------
    def _rows(self, i: int):
        return i * self.T, min((i + 1) * self.T, len(self.Q))

    def _cols(self, j: int):
        return j * self.T, min((j + 1) * self.T, len(self.X))

    def _block(self, i: int, j: int) -> torch.Tensor:
        a, b = self._rows(i)
        c, d = self._cols(j)
        B = squared_distances(self.Q[a:b], self.X[c:d], self.q_sq[a:b], self.x_sq[c:d])
        if self.same and i == j:
            B.diagonal().fill_(float("inf"))
        return B

    def _blocks(self):
        """(i, j) of every block visited: all of them, or those on and above the diagonal."""
        n_i = -(-len(self.Q) // self.T)
        n_j = -(-len(self.X) // self.T)
        for i in range(n_i):
            for j in range(i if self.same else 0, n_j):
                yield i, j

    def _band(self):
        """The blocks holding relevant pairs (the class ranges of each row block)."""
        band = set()
        for i in range(-(-len(self.Q) // self.T)):
            a, b = self._rows(i)
            act = self.active[a:b]
            if not bool(act.any()):
                continue
            lo = int(self.cs[a:b][act].min())
            hi = int(self.ce[a:b][act].max())
            first_j = lo // self.T
            for j in range(max(first_j, i) if self.same else first_j, (hi - 1) // self.T + 1):
                band.add((i, j))
        return band

    def _sides(self, i: int, j: int, B: torch.Tensor):
        """(block, transposed, query rows, reference columns) served by block (i, j): rows i x
        columns j, and with query = reference, transposed, rows j x columns i."""
        yield B, False, self._rows(i), self._cols(j)
        if self.same and i != j:
            yield B, True, self._rows(j), self._cols(i)

    # --- per side ---------------------------------------------------------------------------
    def _relevant(self, M, rows, cols):
        """Where each query's relevant references fall in this side, and their distances."""
        (a, b), (c, d) = rows, cols
        col = self.cs[a:b, None] + self.slots[None, :]
        valid = (col < self.ce[a:b, None]) & (col >= c) & (col < d)
        if self.same:
            valid &= col != torch.arange(a, b, device=self.device)[:, None]
        return valid, M.gather(1, (col - c).clamp(0, d - c - 1))

    def _merge(self, rows: torch.Tensor, keys: torch.Tensor) -> None:
        merged = torch.cat([self.top[rows], keys], 1)
        self.top[rows] = merged.topk(self.L, dim=1, largest=False, sorted=True).values

    def _update_tau(self, rows: torch.Tensor) -> None:
        """tau = min(tau, the list's R-th distance): both bound the R-th nearest from above
        (a list with fewer than R entries bounds nothing, and tau stays). Where tau falls
        below f, the first relevant reference is not among the R nearest: the query's list
        is emptied (AP = RP = 0, its rank is the count below f) and no longer filled."""
        kth = self.top[rows].gather(1, (self.R[rows] - 1).clamp_min(0)[:, None])[:, 0]
        tau = torch.minimum(self.tau[rows], key_value(kth))  # key_value(empty) = +inf
        keep = self.active[rows] & (self.f[rows] <= tau)
        self.tau[rows] = torch.where(keep, tau, torch.full_like(tau, -float("inf")))
        self.top[rows[~keep]] = INT64_MAX

    def _count(self, B, transposed: bool, thresholds: torch.Tensor, op) -> torch.Tensor:
        """Per query of this side: entries ``op`` (le / lt) its threshold, as int32."""
        mask = self._mask[: B.numel()].view(B.shape)
        if transposed:  # queries are B's columns
            op(B, thresholds[None, :], out=mask)
            return mask.view(torch.uint8).sum(0, dtype=torch.int32)
        op(B, thresholds[:, None], out=mask)
        return mask.view(torch.uint8).sum(1, dtype=torch.int32)

    def _first_side(self, B, transposed, rows, cols) -> None:
        """Band block: the relevant distances, and (torch pass) the block's smallest distances
        of each row into ``near`` (any R of them bound the R-th nearest from above)."""
        (a, b), (c, d) = rows, cols
        if self.fused:  # the relevant distances only: tau starts at the farthest of them
            from dml.metrics.fused_side import band_values

            band_values(B, transposed, a, c, self.same, self.cs, self.ce, self.rel_vals)
            return
        M = B.T if transposed else B
        valid, vals = self._relevant(M, rows, cols)
        self.rel_vals[a:b] = torch.where(valid, vals, self.rel_vals[a:b])
        smallest = torch.topk(M, min(self.L, d - c), dim=1, largest=False, sorted=False).values
        merged = torch.cat([self.near[a:b], smallest], 1)
        self.near[a:b] = merged.topk(self.L, dim=1, largest=False, sorted=True).values

    def _main_side(self, B, transposed, rows, cols, check: bool) -> None:
        (a, b), (c, d) = rows, cols
        M = B.T if transposed else B
        if check:  # a band block computed again: the same distances, or the row is redone
            valid, vals = self._relevant(M, rows, cols)
            self.flag[a:b] |= (valid & (vals != self.rel_vals[a:b])).any(1)
        if self.fused:
            self._fused.side(B, transposed, a, c)
            return
        # A query whose smallest distance here is above both f and tau has nothing to count or
        # list in this side: one min-reduction screens the block (exact, not a heuristic)
        low = B.amin(0) if transposed else B.amin(1)
        need = (low <= torch.maximum(self.f[a:b], self.tau[a:b])).nonzero()[:, 0]
        if len(need) == 0:
            return
        if len(need) > self.dense_share * (b - a):  # most queries: the whole side at once
            self.s_le[a:b] += self._count(B, transposed, self.f[a:b], torch.le)
            self.s_lt[a:b] += self._count(B, transposed, self.f[a:b], torch.lt)
            count = self._count(B, transposed, self.tau[a:b], torch.le)
            hit = (count > 0).nonzero()[:, 0]
            if len(hit) == 0:
                return
            mask = self._mask[: B.numel()].view(B.shape)  # still holds B <= tau
            mask = mask.T if transposed else mask
            self._merge(a + hit, self._candidates(M, mask, hit, count[hit], self.r_orig[c:d]))
            self._update_tau(a + hit)
            return
        # a few queries: their rows (columns, transposed) only
        sub = (B.index_select(1, need).T if transposed else B.index_select(0, need)).contiguous()
        q = a + need
        f, tau = self.f[q][:, None], self.tau[q][:, None]
        self.s_le[q] += (sub <= f).sum(1, dtype=torch.int32)
        self.s_lt[q] += (sub < f).sum(1, dtype=torch.int32)
        mask = sub <= tau
        count = mask.sum(1, dtype=torch.int32)
        hit = (count > 0).nonzero()[:, 0]
        if len(hit) == 0:
            return
        self._merge(q[hit], self._candidates(sub, mask, hit, count[hit], self.r_orig[c:d]))
        self._update_tau(q[hit])

    def _candidates(self, M, mask, hit, count, index) -> torch.Tensor:
        """Keys of every entry <= tau in rows ``hit`` of this side, one padded row each (or,
        where a row has many, its exact L smallest)."""
        width = int(count.max())
        if width > 4 * self.L + 16:
            return stable_smallest(M[hit], min(self.L, M.shape[1]), index)
        pos = mask[hit].nonzero()
        row, col = pos[:, 0], pos[:, 1]
        keys = order_keys(M[hit[row], col], index[col])
        start = torch.cumsum(count, 0) - count
        slot = torch.arange(len(row), device=self.device) - start[row]
        out = torch.full((len(hit), width), INT64_MAX, dtype=torch.long, device=self.device)
        out[row, slot] = keys
        return out

    # --- the passes -------------------------------------------------------------------------
    def run(self, max_k: int) -> Stats:
        if not bool(self.active.any()):  # no query has a relevant reference (or no reference)
            none = torch.empty(0, dtype=torch.float64, device=self.device)
            return none.long(), none, none.clone()
        band = self._band()
        kept = {}  # band blocks the main pass reads again, while they fit kept_bytes
        room = self.kept_bytes
        for i, j in sorted(band):
            B = self._block(i, j)
            for side in self._sides(i, j, B):
                self._first_side(*side)
            if B.numel() * B.element_size() <= room:
                kept[i, j] = B
                room -= B.numel() * B.element_size()
        f = self.rel_vals.min(1).values
        self.f = torch.where(self.active, f, torch.full_like(f, -float("inf")))
        e = (self.rel_vals == self.f[:, None]).sum(1)
        if self.fused:  # the R relevant distances: the largest bounds the R-th nearest
            tau = self.rel_vals.masked_fill(torch.isinf(self.rel_vals), -float("inf")).amax(1)
        else:
            tau = self.near.gather(1, (self.R - 1).clamp_min(0)[:, None])[:, 0]
        self.tau = torch.where(
            self.active & (self.f <= tau), tau, torch.full_like(tau, -float("inf"))
        )
        del self.near
        if self.fused:
            from dml.metrics.fused_side import FusedSides  # numba: imported when used

            at_f = self.rel_vals == self.f[:, None]
            ref = self.r_orig[(self.cs[:, None] + self.slots[None]).clamp_max(len(self.X) - 1)]
            first_index = torch.where(at_f, ref, torch.full_like(ref, INT64_MAX)).min(1).values
            self._fused = FusedSides(self.f, self.tau, self.R, self.r_orig, first_index, self.L)
        blocks = list(self._blocks())
        if self.fused:  # the band first, diagonal blocks first: a list fills from its own
            # class's block, and tau shrinks from the farthest relevant distance early
            blocks.sort(key=lambda ij: (ij not in band, ij[0] != ij[1]))
        for i, j in blocks:
            reread = (i, j) in kept  # the first pass's own floats: nothing to compare
            B = kept.pop((i, j)) if reread else self._block(i, j)
            for M, transposed, rows, cols in self._sides(i, j, B):
                self._main_side(M, transposed, rows, cols, (i, j) in band and not reread)
        if self.fused:
            self.s_lt = self._fused.rank()  # exact, ties included
            return self._finish(e, max_k, self._fused.indices())
        listed = torch.where(self.top == INT64_MAX, self.top, key_index(self.top))
        return self._finish(e, max_k, listed)

    def _finish(self, e: torch.Tensor, max_k: int, listed: torch.Tensor) -> Stats:
        """listed: (n_q, L) the reference indices of each query's list, INT64_MAX where empty."""
        pos = torch.arange(self.L, device=self.device)
        in_list = (pos[None] < self.R[:, None]) & (listed != INT64_MAX)
        idx = torch.where(in_list, listed, torch.zeros_like(listed))
        hits = (self.r_labels_orig[idx] == self.ql[:, None]) & in_list
        any_hit = hits.any(1)
        first = torch.where(any_hit, hits.int().argmax(1), self.s_lt)
        # a non-relevant reference at exactly f: its index decides its side of the first
        # relevant one; recompute where that could change a Recall@K (the fused pass counts
        # the ties before the first relevant reference: its rank is exact)
        ties = self.s_le - self.s_lt - e
        undecided = ~any_hit & (ties != 0) & (self.s_lt < max_k) & (not self.fused)
        redo = self.active & (self.flag | undecided)
        ap, rp = precision_from_hits(hits, self.R.clamp_min(1))
        if bool(redo.any()):
            rows = redo.nonzero()[:, 0]
            self.fallback_rows = len(rows)
            orig = self.q_order[rows]
            first[rows], ap[rows], rp[rows] = exact_query_stats(
                self.query[orig],
                self.q_labels_orig[orig],
                self.reference,
                self.r_labels_orig,
                self.R[rows],
                orig if self.same else None,
            )
        keep = self.active.nonzero()[:, 0]
        order = torch.argsort(self.q_order[keep])  # back to the original query order
        rows = keep[order]
        return first[rows], ap[rows], rp[rows]


def query_stats(
    query: torch.Tensor,
    q_labels: torch.Tensor,
    reference: torch.Tensor,
    r_labels: torch.Tensor,
    same_source: bool,
    max_k: int,
    block_size: int = 1024,
) -> Stats:
    """(first_rank, ap, rp) of the queries with R >= 1, in query order, by the block pass."""
    return BlockRanks(query, q_labels, reference, r_labels, same_source, block_size).run(max_k)
