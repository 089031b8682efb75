"""Re-ranking against brute-force implementations written out here, loop by loop, from the
papers' definitions (k-reciprocal: Zhong et al. 2017 and their released re_ranking; alpha-QE
and DBA: Radenovic et al. 2018), and the metrics after re-ranking against a stable sort."""

import re

import numpy as np
import pytest
import torch
from test_retrieval_metrics import clustered_data

from dml.metrics.retrieval import results_from_distances
from dml.reranking import alpha_qe, k_reciprocal, rerank


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def squared(a, b):
    return ((a[:, None, :].astype(np.float64) - b[None].astype(np.float64)) ** 2).sum(-1)


def ranking(d):
    """Each row's columns by (distance, index), its own column first."""
    d = d.copy()
    np.fill_diagonal(d, -1.0)
    return np.argsort(d, axis=1, kind="stable")


def k_reciprocal_brute_force(query, gallery, k1, k2, lam):
    """The released re_ranking, loop by loop, on queries + gallery (or the queries alone)."""
    items = query if gallery is None else np.concatenate([query, gallery])
    n, n_q = len(items), len(query)
    dist = squared(items, items)
    dist = dist / dist.max(axis=1, keepdims=True)
    rank = ranking(dist)
    V = np.zeros((n, n))
    half = int(np.around(k1 / 2.0))

    def reciprocal(i, k):
        forward = rank[i, : k + 1]
        return np.array([j for j in forward if i in rank[j, : k + 1]])

    for i in range(n):
        r = reciprocal(i, k1)
        expansion = list(r)
        for c in r:
            rc = reciprocal(c, half)
            if len(np.intersect1d(rc, r)) > 2.0 / 3.0 * len(rc):
                expansion += list(rc)
        expansion = np.unique(expansion)
        w = np.exp(-dist[i, expansion])
        V[i, expansion] = w / w.sum()
    if k2 > 1:
        V = np.stack([V[rank[i, :k2]].mean(0) for i in range(n)])
    jaccard = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            m = np.minimum(V[i], V[j]).sum()
            jaccard[i, j] = 1 - m / (2 - m)
    final = (1 - lam) * jaccard + lam * dist
    return final[:n_q, n_q:] if gallery is not None else final


def alpha_qe_brute_force(query, gallery, k, alpha):
    same = gallery is None
    base = unit(query if same else gallery)
    aug = np.zeros_like(base, dtype=np.float64)
    order = ranking(squared(base, base))
    for j in range(len(base)):
        for i in order[j, : k + 1]:
            aug[j] += max(0.0, base[j] @ base[i]) ** alpha * base[i]
    aug = unit(aug)
    q = unit(query).astype(np.float64)
    out = np.zeros_like(q)
    d = squared(q, aug)
    for i in range(len(q)):
        if same:
            d[i, i] = np.inf
        near = np.argsort(d[i], kind="stable")[:k]
        out[i] = q[i] + sum(max(0.0, q[i] @ aug[j]) ** alpha * aug[j] for j in near)
    return squared(unit(out), aug)


@pytest.mark.parametrize("with_gallery", [False, True])
@pytest.mark.parametrize("k1,k2", [(6, 3), (4, 1)])
def test_k_reciprocal_distances_equal_the_released_algorithm_loop_by_loop(with_gallery, k1, k2):
    x, y = clustered_data(7, n_classes=8, max_per_class=8, duplicates=3, spread=0.8)
    x = unit(x).astype(np.float32)
    q, g = (x, None) if not with_gallery else (x[::2], x[1::2])
    ours = (
        k_reciprocal(
            torch.from_numpy(q), None if g is None else torch.from_numpy(g), k1=k1, k2=k2, lam=0.3
        )
        .dense()
        .numpy()
    )
    brute = k_reciprocal_brute_force(q, g, k1, k2, 0.3)
    assert ours.shape == brute.shape
    np.testing.assert_allclose(ours, brute, atol=2e-5)
    assert not np.allclose(
        ours,
        0.3
        * squared(q, q if g is None else g)
        / squared(q, q if g is None else g).max(1, keepdims=True),
        atol=1e-3,
    )


def test_k_reciprocal_in_small_blocks_equals_one_block():
    x, _ = clustered_data(8, n_classes=10)
    x = torch.from_numpy(unit(x).astype(np.float32))
    whole = k_reciprocal(x, k1=5, k2=3).dense()
    blocked = k_reciprocal(x, k1=5, k2=3, block=7)
    parts = torch.cat([blocked.rows(a, min(a + 5, len(x))) for a in range(0, len(x), 5)])
    torch.testing.assert_close(parts, whole, atol=1e-6, rtol=0)


@pytest.mark.parametrize("with_gallery", [False, True])
def test_alpha_qe_with_dba_equals_its_definition(with_gallery):
    x, _ = clustered_data(9, n_classes=10, max_per_class=7, duplicates=2)
    q, g = (x, None) if not with_gallery else (x[::2], x[1::2])
    ours = (
        alpha_qe(torch.from_numpy(q), None if g is None else torch.from_numpy(g), k=3, alpha=3.0)
        .dense()
        .numpy()
    )
    np.testing.assert_allclose(ours, alpha_qe_brute_force(q, g, 3, 3.0), atol=2e-5)


def test_metrics_after_reranking_follow_a_stable_sort_of_the_reranked_distances():
    x, y = clustered_data(10, n_classes=12, max_per_class=9)
    x = unit(x).astype(np.float32)
    for name in ("k_reciprocal", "alpha_qe"):
        reranked = rerank(name, torch.from_numpy(x))
        ours = results_from_distances(reranked, y, max_elements=50).metrics([1, 4])
        d = reranked.dense().numpy().astype(np.float64)
        np.fill_diagonal(d, np.inf)
        order = np.argsort(d.astype(np.float32), 1, kind="stable")
        relevant = (y[:, None] == y[None]) & ~np.eye(len(y), dtype=bool)
        keep = relevant.any(1)
        hits = (y[order] == y[:, None])[keep][:, :-1]
        R = relevant.sum(1)[keep]
        ap = [np.sum(np.cumsum(h[:r]) / np.arange(1, r + 1) * h[:r]) / r for h, r in zip(hits, R)]
        assert ours["R@1"] == pytest.approx(hits[:, 0].mean(), abs=1e-12)
        assert ours["R@4"] == pytest.approx(hits[:, :4].any(1).mean(), abs=1e-12)
        assert ours["MAP@R"] == pytest.approx(np.mean(ap), abs=1e-9)


def test_bad_settings_are_errors():
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match="expected one of"):
        rerank("bm25", x)
    with pytest.raises(ValueError, match="unknown parameters"):
        rerank("alpha_qe", x, k1=3)
    with pytest.raises(ValueError, match="k1 0"):
        k_reciprocal(x, k1=0)


def test_evaluation_settings_are_checked_when_the_config_is_read():
    from dml.config import EvalConfig
    from dml.errors import ConfigError

    assert EvalConfig(rerank=["k_reciprocal"], rerank_params={"k_reciprocal": {"k1": 5.0}})
    for names, params, message in (
        (["bm25"], {}, "unknown re-ranking 'bm25'"),
        (["k_reciprocal"], {"k_reciprocal": {"k1": 2.5}}, "k1 2.5 must be a whole number"),
        (["k_reciprocal"], {"k_reciprocal": {"k1": 0}}, "k1 0 must be a whole number >= 1"),
        (["k_reciprocal"], {"k_reciprocal": {"lam": 1.5}}, "lam 1.5 must be in [0, 1]"),
        (["k_reciprocal"], {"k_reciprocal": {"k9": 1}}, "unknown parameters ['k9']"),
        ([], {"alpha_qe": {"k": 3}}, "alpha_qe is not in model.evaluation.rerank"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            EvalConfig(rerank=names, rerank_params=params)
