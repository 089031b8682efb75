"""Per-class results, the paired bootstrap and McNemar's test against independent computations:
pytorch-metric-learning's average of per-class averages, per-class means written out here,
scipy's binomial test, and simulated data whose true difference is known."""

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from scipy.stats import binomtest
from test_retrieval_metrics import brute_force_recall, clustered_data

from dml.metrics import retrieval_metrics
from dml.metrics.retrieval import query_results
from dml.metrics.significance import mcnemar, paired_bootstrap


def test_per_class_means_and_their_average_match_a_loop_and_pml():
    x, y = clustered_data(4, n_classes=20, max_per_class=10)
    x, y = x[y != 0], y[y != 0]  # no singleton class: PML scores every class then
    ks = [1, 2, 4]
    metrics, rows = retrieval_metrics(x, y, ks, per_class=True)
    results = query_results(x, y, ks)
    # the same numbers as without per_class
    assert {k: v for k, v in metrics.items() if "class-mean" not in k} == retrieval_metrics(
        x, y, ks
    )
    for row in rows:  # each class's mean over its queries, from the per-query values
        mine = results.labels == row["class"]
        assert row["queries"] == int((y == row["class"]).sum()) == int(mine.sum())
        assert row["R@1"] == pytest.approx(results.hit(1)[mine].mean())
        assert row["MAP@R"] == pytest.approx(results.ap[mine].mean())
    calc = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
        k="max_bin_count",
        avg_of_avgs=True,
    )
    pml = calc.get_accuracy(torch.from_numpy(x), torch.from_numpy(y))
    assert metrics["R@1 class-mean"] == pytest.approx(pml["precision_at_1"], abs=1e-6)
    assert metrics["MAP@R class-mean"] == pytest.approx(
        pml["mean_average_precision_at_r"], abs=1e-6
    )
    assert metrics["R-Precision class-mean"] == pytest.approx(pml["r_precision"], abs=1e-6)
    # classes of unequal size: the class mean is not the query mean
    assert metrics["MAP@R class-mean"] != pytest.approx(metrics["MAP@R"], abs=1e-4)


def test_per_class_hits_equal_brute_force_recall_per_class():
    x, y = clustered_data(5, n_classes=12, max_per_class=8)
    _, rows = retrieval_metrics(x, y, [1, 4], per_class=True)
    d = ((x[:, None].astype(np.float64) - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    order = np.argsort(d, 1, kind="stable")
    hit = y[order] == y[:, None]
    for row in rows:
        q = np.flatnonzero(y == row["class"])
        assert row["R@1"] == pytest.approx(hit[q, :1].any(1).mean())
        assert row["R@4"] == pytest.approx(hit[q, :4].any(1).mean())
    assert {r["class"] for r in rows} == set(y[np.bincount(y)[y] > 1].tolist())


def per_query(values):
    return {"R@1": np.asarray(values, dtype=np.float64)}


def test_a_model_against_itself_differs_by_exactly_zero():
    rng = np.random.default_rng(0)
    v = {"R@1": rng.integers(0, 2, 500).astype(float), "MAP@R": rng.random(500)}
    for groups in (None, rng.integers(0, 25, 500)):
        out = paired_bootstrap(v, v, groups, resamples=500, seed=1)
        for d in out.values():
            assert (d.difference, d.low, d.high, d.p_value) == (0.0, 0.0, 0.0, 1.0)
    m = mcnemar(v["R@1"], v["R@1"])
    assert (m.only_a, m.only_b, m.p_value) == (0, 0, 1.0)


@pytest.mark.parametrize("fixed", [1, 7, 30])
def test_b_fixing_k_queries_differs_by_k_over_n_and_mcnemar_is_its_formula(fixed):
    """B puts every query next to its class; A is B with ``fixed`` queries (one per class)
    moved next to another class. Through the evaluator: B - A = fixed / n in R@1."""
    rng = np.random.default_rng(fixed)
    classes, per_class, dim = 40, 3, 48
    centers = np.eye(dim)[:classes] * 4.0
    y = np.repeat(np.arange(classes), per_class)
    b = (centers[y] + 0.01 * rng.normal(size=(len(y), dim))).astype(np.float32)
    a = b.copy()
    moved = rng.choice(classes, size=fixed, replace=False) * per_class  # first item of a class
    a[moved] = centers[(y[moved] + 1) % classes] + 1.0 * np.eye(dim)[-1]
    ra, rb = query_results(a, y, [1]), query_results(b, y, [1])
    brute = brute_force_recall(a, y, a, y, [1], True)["R@1"]
    assert ra.hit(1).mean() == pytest.approx(brute)
    assert rb.hit(1).mean() == 1.0
    assert sorted(np.flatnonzero(ra.hit(1) == 0)) == sorted(moved)
    out = paired_bootstrap(ra.values([1]), rb.values([1]), resamples=2000, seed=0)["R@1"]
    assert out.difference == pytest.approx(fixed / len(y), abs=1e-15)
    assert out.low <= out.difference <= out.high
    m = mcnemar(ra.hit(1), rb.hit(1))
    assert (m.only_a, m.only_b) == (0, fixed)
    assert m.p_value == pytest.approx(binomtest(0, fixed, 0.5).pvalue, rel=1e-12)
    assert m.statistic == pytest.approx((fixed - 1) ** 2 / fixed)


def test_mcnemar_exact_p_against_scipy_on_random_outcomes():
    rng = np.random.default_rng(3)
    for _ in range(20):
        a, b = rng.random(200) < 0.6, rng.random(200) < rng.uniform(0.5, 0.8)
        m = mcnemar(a, b)
        n10, n01 = int((a & ~b).sum()), int((~a & b).sum())
        assert (m.only_a, m.only_b) == (n10, n01)
        assert m.p_value == pytest.approx(binomtest(n10, n10 + n01, 0.5).pvalue, rel=1e-9)
        assert m.statistic == pytest.approx((abs(n10 - n01) - 1) ** 2 / (n10 + n01))


def test_bootstrap_coverage_is_near_nominal_and_the_null_is_rejected_at_its_level():
    """Paired Bernoulli outcomes with true P(A right) = 0.60 and P(B right) = 0.66 (so the true
    difference is 0.06), correlated within a query; 300 simulated evaluations of 400 queries."""
    rng = np.random.default_rng(11)
    covered = rejected_null = 0
    trials, n = 300, 400
    for t in range(trials):
        u = rng.random(n)
        a = (u < 0.60).astype(float)
        b = np.where(rng.random(n) < 0.5, u < 0.66, rng.random(n) < 0.66).astype(float)
        d = paired_bootstrap(per_query(a), per_query(b), resamples=1000, seed=t)["R@1"]
        covered += d.low <= 0.06 <= d.high
        same = rng.random(n) < 0.6  # the null: B is A's distribution, resampled
        other = np.where(rng.random(n) < 0.5, same, rng.random(n) < 0.6)
        null = paired_bootstrap(per_query(same), per_query(other), resamples=1000, seed=t)
        rejected_null += null["R@1"].p_value < 0.05
    assert 0.92 <= covered / trials <= 0.98, covered / trials
    assert 0.02 <= rejected_null / trials <= 0.09, rejected_null / trials


def test_class_bootstrap_with_one_query_per_class_is_the_query_bootstrap():
    rng = np.random.default_rng(2)
    a, b = per_query(rng.random(300)), per_query(rng.random(300))
    by_query = paired_bootstrap(a, b, None, resamples=400, seed=5)["R@1"]
    by_class = paired_bootstrap(a, b, np.arange(300), resamples=400, seed=5)["R@1"]
    assert (by_class.low, by_class.high, by_class.p_value) == pytest.approx(
        (by_query.low, by_query.high, by_query.p_value), abs=1e-12
    )


def test_class_bootstrap_is_wider_when_a_class_moves_together():
    """Every query of a class gains or loses the same: the queries are not independent, and
    resampling classes says so with a wider interval."""
    rng = np.random.default_rng(4)
    groups = np.repeat(np.arange(30), 20)
    shift = rng.normal(0.02, 0.1, 30)[groups]
    a = rng.random(600)
    b = a + shift
    q = paired_bootstrap(per_query(a), per_query(b), None, resamples=2000, seed=0)["R@1"]
    c = paired_bootstrap(per_query(a), per_query(b), groups, resamples=2000, seed=0)["R@1"]
    assert q.difference == c.difference
    assert (c.high - c.low) > 3 * (q.high - q.low)


def test_nan_and_mismatched_inputs_are_errors():
    with pytest.raises(ValueError, match="NaN"):
        paired_bootstrap(per_query([0.0, np.nan]), per_query([0.0, 1.0]))
    with pytest.raises(ValueError, match="same, non-empty"):
        paired_bootstrap(per_query([0.0, 1.0]), per_query([0.0]))
    with pytest.raises(ValueError, match="same, non-empty"):
        paired_bootstrap(per_query([]), per_query([]))
    with pytest.raises(ValueError, match="group ids"):
        paired_bootstrap(per_query([0.0, 1.0]), per_query([1.0, 1.0]), groups=[0])
