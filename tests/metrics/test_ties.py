"""The tie rule: every back end equals a brute-force stable sort of the distance rows.

Data are small integers, so every squared distance is exact in float32 and float64 alike: the
ties below are exact in every back end, and the reference (numpy, float64, ``kind="stable"``)
sees the same ones. Non-finite embeddings are an error in every metric.
"""

import re

import numpy as np
import pytest
import torch

from dml.metrics import faiss_available, knn, nmi, retrieval_metrics
from dml.metrics.ranking import BlockRanks

BACKENDS = ["rank", "torch"] + (["faiss"] if faiss_available() else [])


def reference_metrics(query, q_labels, ref, r_labels, ks, same_source):
    """Brute force: the stable order of each query's float64 distance row."""
    d = ((query[:, None, :].astype(np.float64) - ref[None].astype(np.float64)) ** 2).sum(-1)
    out = {f"R@{k}": [] for k in ks}
    out.update({"MAP@R": [], "R-Precision": []})
    for i in range(len(query)):
        cols = np.arange(len(ref))
        if same_source:
            cols = cols[cols != i]
        order = cols[np.argsort(d[i, cols], kind="stable")]
        rel = r_labels[order] == q_labels[i]
        r = int(rel.sum())
        if r == 0:
            continue
        for k in ks:
            out[f"R@{k}"].append(float(rel[:k].any()))
        top = rel[:r]
        precision = np.cumsum(top) / np.arange(1, r + 1)
        out["MAP@R"].append(float((precision * top).sum() / r))
        out["R-Precision"].append(float(top.sum() / r))
    return {name: float(np.mean(v)) for name, v in out.items()}


def tied_data(seed, n=150, dim=4, classes=12, levels=3, shuffle=True):
    """Integer vectors from a few levels: many exact duplicates within and across classes."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, levels, size=(n, dim)).astype(np.float32)
    y = rng.integers(0, classes, size=n) if shuffle else np.sort(rng.integers(0, classes, size=n))
    dup = rng.choice(n, size=n // 3)
    x[rng.choice(n, size=n // 3)] = x[dup]  # more exact duplicates, any class
    return x, y


CASES = {
    "tied": lambda: tied_data(0),
    "tied_sorted_labels": lambda: tied_data(1, shuffle=False),
    "tied_wide": lambda: tied_data(2, n=200, dim=8, classes=5, levels=2),
    "one_repeated_vector": lambda: (np.ones((90, 3), np.float32), np.arange(90) % 9),
    "one_class": lambda: (tied_data(3, n=60)[0], np.zeros(60, np.int64)),
    "duplicated_rows": lambda: (
        np.repeat(tied_data(4, n=40, levels=4)[0], 3, axis=0),
        np.repeat(np.arange(40) % 7, 3),
    ),
}


# the rank back end with blocks smaller than the data (band, symmetric and fallback paths) and
# with one block; the k-NN back ends once
RUNS = [("rank", 7), ("rank", 32), ("rank", 1024)] + [(b, None) for b in BACKENDS[1:]]


@pytest.mark.parametrize("backend,block", RUNS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_same_source_ties_equal_a_stable_sort(backend, block, case):
    x, y = CASES[case]()
    ks = [1, 2, 4, 8, 16]
    ours = retrieval_metrics(x, y, ks, backend=backend, chunk_size=block)
    assert ours == pytest.approx(reference_metrics(x, y, x, y, ks, True), abs=1e-12)


# The main pass on the CPU (fused, dml.metrics.fused_side) and the torch pass of CUDA (forced
# here: every side whole, or only gathered rows)
PATHS = {
    "fused": (True, 0.25),
    "torch_whole_sides": (False, 0.0),
    "torch_some_rows": (False, 0.25),
    "torch_gathered_rows": (False, 1.0),
}


@pytest.mark.parametrize("path", ["fused", "torch_whole_sides", "torch_gathered_rows"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_path_of_the_block_pass_follows_the_tie_rule(case, path, monkeypatch):
    monkeypatch.setattr(BlockRanks, "fused_on_cpu", PATHS[path][0])
    monkeypatch.setattr(BlockRanks, "fused_min_pairs", 0)  # these data are small
    monkeypatch.setattr(BlockRanks, "dense_share", PATHS[path][1])
    x, y = CASES[case]()
    ks = [1, 2, 4, 8, 16]
    ours = retrieval_metrics(x, y, ks, backend="rank", chunk_size=16)
    assert ours == pytest.approx(reference_metrics(x, y, x, y, ks, True), abs=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block", [5, 64])
@pytest.mark.parametrize("seed", [0, 1])
def test_query_gallery_ties_equal_a_stable_sort(backend, block, seed):
    x, y = tied_data(seed, n=160, classes=10)
    rng = np.random.default_rng(seed)
    is_query = rng.random(len(y)) < 0.4
    q, qy, g, gy = x[is_query], y[is_query], x[~is_query], y[~is_query]
    ks = [1, 10, 20, 30]
    ours = retrieval_metrics(
        q, qy, ks, gallery_embeddings=g, gallery_labels=gy, backend=backend, chunk_size=block
    )
    assert ours == pytest.approx(reference_metrics(q, qy, g, gy, ks, False), abs=1e-12)


def test_identical_embeddings_score_what_the_index_order_gives():
    # 600 copies of one vector in 20 classes (label = i mod 20): every query's nearest
    # reference is index 0 (index 1 for query 0), so R@1 is the share of class-0 queries
    # other than query 0 itself: 29 / 600. Ties in the query's favour would give 1.0.
    x = np.ones((600, 8), np.float32)
    y = np.arange(600) % 20
    for backend in BACKENDS:
        out = retrieval_metrics(x, y, [1], backend=backend)
        assert out["R@1"] == pytest.approx(29 / 600, abs=1e-15), backend
        assert out["MAP@R"] < 0.06


def test_block_pass_needs_no_fallback_without_ties():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(300, 16)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 25, size=300))
    ranks = BlockRanks(x, y, x, y, same_source=True, block_size=64)
    ranks.run(max_k=8)
    assert ranks.fallback_rows == 0


def test_knn_lists_follow_the_tie_rule():
    x, _ = tied_data(5, n=80)
    d = ((x[:, None].astype(np.float64) - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    expected = np.argsort(d, axis=1, kind="stable")[:, :10]
    for backend in ["torch"] + (["faiss"] if faiss_available() else []):
        dist, idx = knn(torch.from_numpy(x), k=10, backend=backend)
        assert idx.tolist() == expected.tolist(), backend
        assert np.allclose(dist.numpy(), np.take_along_axis(d, expected, 1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_embeddings_are_an_error_naming_the_rows(backend, bad):
    x, y = tied_data(6)
    x[[3, 7]] = bad
    with pytest.raises(ValueError, match="2 of 150 embeddings are not finite"):
        retrieval_metrics(x, y, [1], backend=backend)
    g = x.copy()
    with pytest.raises(ValueError, match="gallery embeddings are not finite"):
        retrieval_metrics(
            np.ones_like(x), y, [1], gallery_embeddings=g, gallery_labels=y, backend=backend
        )


def test_all_nan_embeddings_are_an_error():
    x = np.full((600, 8), np.nan, np.float32)
    with pytest.raises(ValueError, match="600 of 600"):
        retrieval_metrics(x, np.arange(600) % 20, [1])
    with pytest.raises(ValueError, match="600 of 600"):
        nmi(x, np.arange(600) % 20)


@pytest.mark.parametrize(
    "value,accepted",
    [(1e18, True), (1.58113e18, True), (1.58115e18, False), (4e18, False), (1e19, False)],
)
def test_embeddings_too_large_for_float32_distances_are_an_error(value, accepted):
    """Squared norms above 1e37, in float64, are refused with the largest norm named: 4 x 1.6e37,
    and 4 x 1e38, a row sum that overflows float32; up to 1e37 is accepted and scored, also
    next to the limit (4 x 1.58113e18^2 = 0.99999e37 against 1.00001e37), where the float32
    sum's rounding must not decide. An accepted far row of its own class is every other query's
    farthest reference: the metrics equal those of the data without it."""
    x, y = tied_data(8, n=60)
    x[5] = value
    y[5] = y.max() + 1  # a class of its own: nothing to score for it, last for every other
    if accepted:
        rest = np.delete(np.arange(60), 5)
        ks = [1, 2, 4, 8]
        assert retrieval_metrics(x, y, ks) == retrieval_metrics(x[rest], y[rest], ks)
        return
    message = f"squared norms up to {4 * float(np.float32(value)) ** 2:.3g}, beyond float32"
    with pytest.raises(ValueError, match=re.escape(message)):
        retrieval_metrics(x, y, [1])


def test_nmi_of_a_single_class_is_an_error():
    with pytest.raises(ValueError, match="single class"):
        nmi(np.random.default_rng(0).normal(size=(20, 4)), np.zeros(20))


def stable_sort_ranks(q, yq, g, yg, same):
    """The reference: per query with a relevant reference, numpy's stable sort of its float64
    distance row (itself left out when ``same``): the rank of the first relevant reference,
    the relevance flags in order, and R."""
    d = ((q.astype(np.float64)[:, None] - g[None]) ** 2).sum(-1)
    first, hits, relevant = [], [], []
    for i in range(len(q)):
        cols = np.delete(np.arange(len(g)), i) if same else np.arange(len(g))
        order = cols[np.argsort(d[i, cols], kind="stable")]
        rel = yg[order] == yq[i]
        if rel.any():
            first.append(int(np.argmax(rel)))
            hits.append(rel)
            relevant.append(int(rel.sum()))
    return first, hits, relevant


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("regime", ["clustered", "random", "mixed"])
@pytest.mark.parametrize("block", [16, 64, 300])  # 300: two chunks of the fused transposed side
def test_block_pass_ranks_of_every_query_equal_a_stable_sort(regime, block, path):
    """Per query, not averaged: the rank of the first relevant reference, AP and RP of the
    block pass equal numpy's stable sort, on data where most queries have their first relevant
    reference among the R nearest (clustered: counted from the candidates), few do (random:
    counted against f), and both, with queries moving from one to the other during the pass.
    Integer coordinates below 1000 in 4-d: every squared distance is exact in float32."""
    from dml.metrics.ranking import precision_from_hits

    rng = np.random.default_rng(block)
    n = 600 if block == 300 else 400
    classes = n // 10
    y = rng.integers(0, classes, size=n)
    centres = rng.integers(-500, 500, size=(classes, 4))
    spread = {"clustered": 60, "random": 1000}.get(regime)
    if spread is None:  # half the classes tight, half spread out
        spread = np.where(y % 2 == 0, 60, 1000)[:, None]
    x = np.clip(centres[y] + (spread * rng.uniform(-1, 1, size=(n, 4))).astype(np.int64), -999, 999)
    x = x.astype(np.float32)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    ranks = BlockRanks(xt, yt, xt, yt, same_source=True, block_size=block)
    ranks.fused, ranks.dense_share = PATHS[path]
    first, ap, rp = ranks.run(max_k=n)
    assert ranks.fallback_rows <= n // 50  # exact ties at f are rare: the pass settles the rest
    expected_first, hits, relevant = stable_sort_ranks(x, y, x, y, same=True)
    expected_ap, expected_rp = precision_from_hits(
        torch.tensor(np.array(hits)), torch.tensor(relevant)
    )
    assert first.tolist() == expected_first
    assert torch.equal(ap, expected_ap) and torch.equal(rp, expected_rp)
    listed = sum(f < r for f, r in zip(expected_first, relevant)) / len(relevant)
    assert {"clustered": listed > 0.9, "random": listed < 0.5, "mixed": 0.5 < listed < 0.9}[
        regime
    ], listed  # first relevant among the R nearest


@pytest.mark.parametrize("case", ["tied", "one_repeated_vector"])
def test_the_fused_pass_ranks_ties_exactly_without_recomputing_rows(case, monkeypatch):
    """The CPU pass counts the references at exactly f whose index precedes the first relevant
    one, so a data set of duplicates needs no row recomputed (the torch pass recomputes every
    such row). 600-700 rows in blocks of 300: both fused kernels, two chunks of queries."""
    if case == "tied":
        x, y = tied_data(7, n=700, dim=4, classes=30, levels=3)
    else:
        x, y = np.ones((600, 3), np.float32), np.arange(600) % 20
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    ks = [1, 2, 4, 8, 16, 100]
    monkeypatch.setattr(BlockRanks, "fused_min_pairs", 0)  # small data: forced
    ranks = BlockRanks(xt, yt, xt, yt, same_source=True, block_size=300)
    assert ranks.fused
    first, ap, rp = ranks.run(max_k=max(ks))
    assert ranks.fallback_rows == 0
    ours = {f"R@{k}": float((first < k).double().mean()) for k in ks}
    ours.update({"MAP@R": float(ap.mean()), "R-Precision": float(rp.mean())})
    assert ours == pytest.approx(reference_metrics(x, y, x, y, ks, True), abs=1e-12)
    torch_pass = BlockRanks(xt, yt, xt, yt, same_source=True, block_size=300)
    torch_pass.fused = False
    t_first, t_ap, t_rp = torch_pass.run(max_k=max(ks))
    assert torch_pass.fallback_rows > 0
    # the torch pass settles a rank exactly only below max_k (all a Recall@K needs)
    assert torch.equal(t_first.clamp_max(max(ks)), first.clamp_max(max(ks)))
    assert torch.equal(t_ap, ap) and torch.equal(t_rp, rp)


def test_small_evaluations_skip_loading_the_compiled_loop():
    """Below ``fused_min_pairs`` the torch pass runs (the loop's load, about 1 s per process,
    would cost more than it saves); from it on, the fused one."""
    x = torch.zeros(100, 4)
    y = torch.arange(100) % 10
    assert not BlockRanks(x, y, x, y, same_source=True).fused
    n = int(BlockRanks.fused_min_pairs**0.5) + 1
    big = torch.zeros(n, 4)
    assert BlockRanks(big, torch.arange(n) % 10, big, torch.arange(n) % 10, True).fused


def stable_sort_stats(query, q_labels, ref, r_labels, same_source):
    """Per query with R >= 1: (rank of the first relevant reference, AP, RP) from numpy's
    stable sort of its float64 distance row."""
    from dml.metrics.ranking import precision_from_hits

    d = ((query.astype(np.float64)[:, None] - ref.astype(np.float64)[None]) ** 2).sum(-1)
    first, hits, relevant = [], [], []
    for i in range(len(query)):
        cols = np.arange(len(ref))
        if same_source:
            cols = cols[cols != i]
        rel = r_labels[cols[np.argsort(d[i, cols], kind="stable")]] == q_labels[i]
        if rel.any():
            first.append(int(np.argmax(rel)))
            hits.append(rel)
            relevant.append(int(rel.sum()))
    ap, rp = precision_from_hits(torch.tensor(np.array(hits)), torch.tensor(relevant))
    return first, ap, rp


def heavily_tied(seed, n, order):
    """Rows drawn from 1-3 points of a small integer grid (so most distances tie, at a few
    values), classes of 1-12 rows; ``order`` sets how labels follow the row index: random,
    ascending, or descending (then every block's references precede the earlier blocks' in
    index: each query's list is refilled by ties in every block)."""
    rng = np.random.default_rng(seed)
    points = rng.integers(0, 3, size=(int(rng.integers(1, 4)), 2)).astype(np.float32)
    x = points[rng.integers(0, len(points), size=n)]
    y = np.repeat(np.arange(n), rng.integers(1, 13, size=n))[:n]
    if order == "random":
        y = rng.permutation(y)
    elif order == "descending":
        y = y[::-1].copy()
    return x, y


@pytest.mark.parametrize("order", ["random", "ascending", "descending"])
@pytest.mark.parametrize("block", [16, 40, 300])  # 40: groups of 32 and a short one
def test_the_fused_pass_follows_the_tie_rule_on_collapsed_data(order, block, monkeypatch):
    """Data with a handful of distinct rows, in every label order: each query's list fills
    through ties at tau (visited in ascending reference index and cut short), queries keep
    or drop out of the transposed side's groups, and every per-query number equals the
    stable sort, same source and query / gallery."""
    monkeypatch.setattr(BlockRanks, "fused_min_pairs", 0)
    for seed in range(4):
        x, y = heavily_tied(seed, 620 if block == 300 else 330, order)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        ranks = BlockRanks(xt, yt, xt, yt, same_source=True, block_size=block)
        assert ranks.fused
        first, ap, rp = ranks.run(max_k=len(x))
        e_first, e_ap, e_rp = stable_sort_stats(x, y, x, y, True)
        assert first.tolist() == e_first, (seed, order)
        assert torch.equal(ap, e_ap) and torch.equal(rp, e_rp), (seed, order)
        assert ranks.fallback_rows == 0
        q = np.arange(len(x)) % 3 == 0
        ranks = BlockRanks(xt[q], yt[q], xt[~q], yt[~q], same_source=False, block_size=block)
        first, ap, rp = ranks.run(max_k=len(x))
        e_first, e_ap, e_rp = stable_sort_stats(x[q], y[q], x[~q], y[~q], False)
        assert first.tolist() == e_first, (seed, order, "query/gallery")
        assert torch.equal(ap, e_ap) and torch.equal(rp, e_rp), (seed, order, "query/gallery")


@pytest.mark.parametrize("fused", [True, False])
def test_band_blocks_kept_from_the_first_pass_are_not_computed_again(fused, monkeypatch):
    """The main pass reads the band blocks the first pass computed (within ``kept_bytes``):
    one GEMM per visited block instead of two for each band block, and the same numbers as
    recomputing them."""
    monkeypatch.setattr(BlockRanks, "fused_min_pairs", 0)
    x, y = heavily_tied(5, 500, "random")
    rng = np.random.default_rng(5)
    x = x + rng.integers(0, 4, size=x.shape).astype(np.float32)  # ties and non-ties
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    results, computed = {}, {}
    for kept in (0, BlockRanks.kept_bytes):
        monkeypatch.setattr(BlockRanks, "kept_bytes", kept)
        ranks = BlockRanks(xt, yt, xt, yt, same_source=True, block_size=64)
        ranks.fused = fused
        calls = []
        block = ranks._block
        monkeypatch.setattr(ranks, "_block", lambda i, j: calls.append((i, j)) or block(i, j))
        results[kept] = ranks.run(max_k=len(x))
        computed[kept] = calls
    n_blocks = len(list(ranks._blocks()))
    band = ranks._band()
    assert len(computed[0]) == n_blocks + len(band)
    assert sorted(computed[BlockRanks.kept_bytes]) == sorted(ranks._blocks())
    for a, b in zip(results[0], results[BlockRanks.kept_bytes]):
        assert torch.equal(a, b)
    assert results[0][0].tolist() == stable_sort_stats(x, y, x, y, True)[0]


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("width", [64, 100, 300])
def test_the_band_loop_writes_each_relevant_distance_to_its_slot(transposed, width):
    """``fused_side.band_values`` against numpy: each query's relevant distances land in their
    slots (reference - cs), never its own slot (even where the block holds a finite value there),
    and nothing outside this side's queries and references is written."""
    from dml.metrics.fused_side import band_values

    rng = np.random.default_rng(width)
    n_q, a, c = 90, 40, 30  # queries a .. a + 89, references c .. c + width - 1
    block = rng.random((width, n_q) if transposed else (n_q, width), dtype=np.float32)
    total = a + n_q + width + c
    cs = torch.from_numpy(rng.integers(0, total - 12, size=total))
    ce = cs + torch.from_numpy(rng.integers(1, 12, size=total))
    cs[a + 5], ce[a + 5] = a + 5 - 2, a + 5 + 3  # query a + 5 is among its own references
    rel = torch.full((total, 12), float("inf"))
    rel[a + 1, 11] = 0.5  # a slot no reference of this side maps to: kept
    before = rel.clone()
    band_values(torch.from_numpy(block), transposed, a, c, True, cs, ce, rel)
    rows = block.T if transposed else block
    written = 0
    for local in range(n_q):
        q = a + local
        expected = before[q].numpy().copy()
        for col in range(max(int(cs[q]), c), min(int(ce[q]), c + width)):
            if col != q:
                expected[col - int(cs[q])] = rows[local, col - c]
                written += 1
        assert np.array_equal(rel[q].numpy(), expected), q
    assert written > n_q  # the data put most queries' references in this side
    assert torch.equal(rel[:a], before[:a]) and torch.equal(rel[a + n_q :], before[a + n_q :])


@pytest.mark.parametrize("order", ["random", "descending"])
def test_the_list_scans_of_collapsed_data_stop_after_r_ties_per_block(order, monkeypatch):
    """Every distance ties (one repeated row): in each block a query's list takes at most R
    ties, visited in ascending index, and its scan stops right after them (the row side reads
    at most R + 1 entries, the transposed side the first one or two groups of 32), where a
    scan without the early stop would read the whole block (256 entries) every time."""
    monkeypatch.setattr(BlockRanks, "fused_min_pairs", 0)
    n, block = 1500, 256
    x = np.ones((n, 3), np.float32)
    y = np.arange(n) // 5
    y = y[::-1].copy() if order == "descending" else np.random.default_rng(0).permutation(y)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    ranks = BlockRanks(xt, yt, xt, yt, same_source=True, block_size=block)
    first, ap, rp = ranks.run(max_k=n)
    e_first, e_ap, e_rp = stable_sort_stats(x, y, x, y, True)
    assert first.tolist() == e_first
    assert torch.equal(ap, e_ap) and torch.equal(rp, e_rp)
    visits = ranks._fused.visits
    blocks = -(-n // block)  # each query meets every block of references once
    r = int(ranks.R.max())  # 4
    assert 0 < visits.max() <= blocks * max(r + 1, 2 * 32), visits.max()


def test_the_row_scans_of_separated_classes_visit_only_their_classes_lanes(monkeypatch):
    """Tight classes of 16 far apart on the unit sphere (no two distances tie): tau starts at
    each query's farthest relevant distance, so only its class's 15 other members lie under it,
    in 15 of the 64 lanes of its diagonal block (256 columns: 4 per lane); the scan visits those
    lanes only (at most 60 entries per query in all), where scanning every lane, starting from
    tau = +inf, or sending the single entry at exactly tau to the index-ordered tie scan reads
    the whole row (256)."""
    monkeypatch.setattr(BlockRanks, "fused_min_pairs", 0)
    rng = np.random.default_rng(3)
    n, size, block = 1024, 16, 256
    y = rng.permutation(np.arange(n) // size)
    centres = rng.normal(size=(n // size, 8))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = (centres[y] + 0.01 * rng.normal(size=(n, 8))).astype(np.float32)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    ranks = BlockRanks(xt, yt, xt, yt, same_source=True, block_size=block)
    first, ap, rp = ranks.run(max_k=n)
    assert first.tolist() == [0] * n and bool((ap == 1).all()) and bool((rp == 1).all())
    visits = ranks._fused.visits
    assert 0 < visits.max() <= (size - 1) * (block // 64), visits.max()


@pytest.mark.parametrize("gallery_rows", [0, 1, 3])
def test_the_block_pass_takes_a_gallery_with_no_relevant_reference(gallery_rows):
    """Queries none of whose labels the gallery holds (an empty gallery included): no query
    has R >= 1, so no statistics come back, and nothing is indexed out of range."""
    g = torch.Generator().manual_seed(0)
    query, q_labels = torch.randn(6, 8, generator=g), torch.tensor([0, 0, 1, 1, 2, 2])
    gallery = torch.randn(gallery_rows, 8, generator=g)
    g_labels = torch.full((gallery_rows,), 7)
    first, ap, rp = BlockRanks(query, q_labels, gallery, g_labels, False, 4).run(10)
    assert first.shape == ap.shape == rp.shape == (0,)
    assert first.dtype == torch.long and ap.dtype == rp.dtype == torch.float64
    # one shared label: that query's statistics, against a brute-force ranking
    if gallery_rows:
        g_labels[-1] = 2
        first, ap, rp = BlockRanks(query, q_labels, gallery, g_labels, False, 4).run(10)
        d = torch.cdist(query[4:].double(), gallery.double()) ** 2
        rank = (d < d[:, -1:]).sum(1)
        assert first.tolist() == rank.tolist()
        assert ap.tolist() == rp.tolist() == [float(r == 0) for r in rank.tolist()]


@pytest.mark.parametrize("seed", range(8))
def test_the_block_pass_equals_a_stable_sort_on_random_mixes_of_ties(seed):
    """Random cases (a differential test; 700 such cases passed when it was written): query =
    reference or a separate gallery, 1-300 rows of 1-4 integer coordinates in a range of 0 to
    1000 (span 0: every row the same vector), classes of one to many rows, a gallery with labels
    no query has, blocks of 8-300, the compiled or the torch pass, band blocks kept or not.
    Per query: the rank of the first relevant reference (up to max_k, beyond which the torch
    pass need not settle ties), AP and RP equal numpy's stable sort."""
    from dml.metrics.ranking import precision_from_hits

    rng = np.random.default_rng(100 + seed)
    same = seed % 4 != 3
    n = int(rng.integers(1, 300))
    m = n if same else int(rng.integers(1, 300))
    dim, span = int(rng.integers(1, 5)), [0, 1, 2, 1000][seed % 4]
    classes = int(rng.integers(1, max(2, n // int(rng.choice([1, 5, 20])) + 1)))
    q = rng.integers(-span, span + 1, size=(n, dim)).astype(np.float32)
    yq = rng.integers(0, classes, n)
    g, yg = (q, yq) if same else (q[: m // 2], yq[: m // 2])
    if not same:  # half the gallery from the queries (duplicates), half new, two extra labels
        extra = rng.integers(-span, span + 1, size=(m - m // 2, dim)).astype(np.float32)
        g, yg = (
            np.concatenate([g, extra]),
            np.concatenate([yg, rng.integers(0, classes + 2, m - m // 2)]),
        )
    ranks = BlockRanks(*map(torch.from_numpy, (q, yq, g, yg)), same, [8, 33, 64, 300][seed % 4])
    ranks.fused = seed % 2 == 0
    ranks.kept_bytes = 0 if seed in (2, 5) else ranks.kept_bytes
    max_k = [1, 4, 1000][seed % 3]
    first, ap, rp = ranks.run(max_k)
    expected_first, hits, relevant = stable_sort_ranks(q, yq, g, yg, same)
    assert [min(f, max_k) for f in first.tolist()] == [min(f, max_k) for f in expected_first]
    if relevant:
        width = max(relevant)
        flags = np.zeros((len(hits), width), bool)
        for k, h in enumerate(hits):
            flags[k, : min(len(h), width)] = h[:width]
        expected_ap, expected_rp = precision_from_hits(torch.tensor(flags), torch.tensor(relevant))
        assert torch.equal(ap, expected_ap) and torch.equal(rp, expected_rp)
    else:
        assert len(ap) == len(rp) == 0
