"""The evaluation metrics against independent references: brute force numpy, PML, scikit-learn."""

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from sklearn.metrics import normalized_mutual_info_score

from dml.metrics import (
    faiss_available,
    kmeans_assign,
    knn,
    nmi,
    normalized_mutual_info,
    retrieval_metrics,
)

KNN_BACKENDS = ["torch"] + (["faiss"] if faiss_available() else [])
BACKENDS = ["rank"] + KNN_BACKENDS


def clustered_data(seed, n_classes=30, dim=16, max_per_class=9, duplicates=20, spread=0.9):
    """Gaussian classes of 1..max_per_class points, with exact in-class duplicates and a
    singleton class (a query without relevant references)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_classes, dim))
    sizes = rng.integers(2, max_per_class + 1, size=n_classes)
    sizes[0] = 1
    labels = np.repeat(np.arange(n_classes), sizes)
    x = centers[labels] + spread * rng.normal(size=(len(labels), dim))
    # Exact duplicates inside a class: ties that a first-column self-drop would get wrong.
    src = rng.choice(np.flatnonzero(sizes[labels] >= 2), size=duplicates, replace=False)
    dst = np.array(
        [
            rng.choice(np.flatnonzero((labels == labels[s]) & (np.arange(len(labels)) != s)))
            for s in src
        ]
    )
    x[dst] = x[src]
    return x.astype(np.float32), labels


def brute_force_recall(query, q_labels, ref, r_labels, ks, same_source):
    d = ((query[:, None, :].astype(np.float64) - ref[None].astype(np.float64)) ** 2).sum(-1)
    if same_source:
        np.fill_diagonal(d, np.inf)
        relevant = (q_labels[:, None] == r_labels[None]) & ~np.eye(len(q_labels), dtype=bool)
    else:
        relevant = q_labels[:, None] == r_labels[None]
    keep = relevant.any(1)
    order = np.argsort(d, axis=1, kind="stable")
    hits = (r_labels[order] == q_labels[:, None])[keep]
    return {f"R@{k}": hits[:, :k].any(1).mean() for k in ks}


def pml_reference(query, q_labels, ref=None, r_labels=None):
    calc = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r", "r_precision"), k="max_bin_count"
    )
    if ref is None:
        acc = calc.get_accuracy(torch.from_numpy(query), torch.from_numpy(q_labels))
    else:
        acc = calc.get_accuracy(
            torch.from_numpy(query),
            torch.from_numpy(q_labels),
            torch.from_numpy(ref),
            torch.from_numpy(r_labels),
            ref_includes_query=False,
        )
    return acc


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_same_source_against_brute_force_and_pml(backend, seed):
    x, y = clustered_data(seed)
    ks = [1, 2, 4, 8, 16]
    ours = retrieval_metrics(x, y, ks, backend=backend)
    ref = brute_force_recall(x, y, x, y, ks, same_source=True)
    for k in ks:
        assert ours[f"R@{k}"] == pytest.approx(ref[f"R@{k}"], abs=1e-12)
    pml = pml_reference(x, y)
    assert ours["R@1"] == pytest.approx(pml["precision_at_1"], abs=1e-6)
    assert ours["MAP@R"] == pytest.approx(pml["mean_average_precision_at_r"], abs=1e-6)
    assert ours["R-Precision"] == pytest.approx(pml["r_precision"], abs=1e-6)
    # The data are not trivially separable: the metrics must not all be 1.
    assert 0.2 < ours["MAP@R"] < 0.95


@pytest.mark.parametrize("backend", BACKENDS)
def test_query_gallery_against_brute_force_and_pml(backend):
    x, y = clustered_data(3, n_classes=25, max_per_class=12)
    rng = np.random.default_rng(3)
    is_query = rng.random(len(y)) < 0.5
    q, qy, g, gy = x[is_query], y[is_query], x[~is_query], y[~is_query]
    ks = [1, 10, 20, 30, 40]
    ours = retrieval_metrics(q, qy, ks, gallery_embeddings=g, gallery_labels=gy, backend=backend)
    ref = brute_force_recall(q, qy, g, gy, ks, same_source=False)
    for k in ks:
        assert ours[f"R@{k}"] == pytest.approx(ref[f"R@{k}"], abs=1e-12)
    pml = pml_reference(q, qy, g, gy)
    assert ours["R@1"] == pytest.approx(pml["precision_at_1"], abs=1e-6)
    assert ours["MAP@R"] == pytest.approx(pml["mean_average_precision_at_r"], abs=1e-6)
    assert ours["R-Precision"] == pytest.approx(pml["r_precision"], abs=1e-6)


def test_map_at_r_hand_computed():
    # 1-D points; class 0 = {0, 1, 3}, class 1 = {2, 4}.
    x = np.array([[0.0], [1.0], [2.1], [3.2], [4.4]], np.float32)
    y = np.array([0, 0, 1, 0, 1])
    # Query 0: R=2, neighbours 1(+), 2.1(-) -> AP = (1/1)/2 = 0.5, RP = 1/2.
    # Query 1: R=2, neighbours 0(+), 2.1(-) -> 0.5, RP 1/2.
    # Query 2.1: R=1, neighbour 3.2(-) (1 at 1.1 is farther) -> 0.
    # Query 3.2: R=2, neighbours 2.1(-), 4.4(-) -> 0.
    # Query 4.4: R=1, neighbour 3.2(-) -> 0.
    out = retrieval_metrics(x, y, ks=[1, 2])
    assert out["MAP@R"] == pytest.approx((0.5 + 0.5) / 5)
    assert out["R-Precision"] == pytest.approx((0.5 + 0.5) / 5)
    assert out["R@1"] == pytest.approx(2 / 5)
    assert out["R@2"] == pytest.approx(3 / 5)  # 4.4 -> {3.2, 2.1}: 2.1 shares class 1


def test_self_is_excluded_by_index_with_duplicates():
    # Three identical points of one class plus a far point: the first column is not always self.
    x = np.array([[0.0, 0.0]] * 3 + [[5.0, 5.0]], np.float32)
    for backend in KNN_BACKENDS:
        _, idx = knn(torch.from_numpy(x), k=2, backend=backend)
        for i in range(3):
            assert i not in idx[i].tolist()
            assert set(idx[i].tolist()) == {0, 1, 2} - {i}


@pytest.mark.parametrize("gallery", [False, True])
def test_backends_agree(gallery):
    x, y = clustered_data(5, n_classes=60, dim=32)
    ks = [1, 2, 4, 8, 100, 10_000]  # K beyond the reference count is capped
    kw = {}
    if gallery:
        x, y, kw = x[::2], y[::2], {"gallery_embeddings": x[1::2], "gallery_labels": y[1::2]}
    results = [retrieval_metrics(x, y, ks, backend=b, chunk_size=37, **kw) for b in BACKENDS]
    for other in results[1:]:
        assert other == pytest.approx(results[0], abs=1e-12)
    assert results[0]["R@10000"] == 1.0


def test_torch_and_numpy_inputs_agree():
    x, y = clustered_data(6)
    a = retrieval_metrics(x, y, [1, 4])
    b = retrieval_metrics(torch.from_numpy(x), torch.from_numpy(y), [1, 4])
    assert a == b


def test_bad_inputs_are_clear_errors():
    x, y = clustered_data(0)
    with pytest.raises(ValueError, match="one label per embedding"):
        retrieval_metrics(x, y[:-1], [1])
    with pytest.raises(ValueError, match="gallery"):
        retrieval_metrics(x, y, [1], gallery_embeddings=x)
    with pytest.raises(ValueError, match="ks must be positive"):
        retrieval_metrics(x, y, [0])
    # no rows on either side: nothing to score, said in one line (not an IndexError)
    for queries, gallery in [(x[:1], x[:0]), (x[:0], x[:2]), (x[:0], x[:0])]:
        with pytest.raises(ValueError, match="no query has a relevant reference"):
            retrieval_metrics(
                queries,
                y[: len(queries)],
                [1],
                gallery_embeddings=gallery,
                gallery_labels=y[: len(gallery)],
            )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nmi_formula_against_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 7, size=200)
    clusters = np.where(rng.random(200) < 0.6, labels, rng.integers(0, 9, size=200))
    assert normalized_mutual_info(labels, clusters) == pytest.approx(
        normalized_mutual_info_score(labels, clusters), abs=1e-10
    )


def test_nmi_is_one_on_separated_clusters_and_seeded():
    x, y = clustered_data(0, n_classes=10, spread=0.01)
    keep = np.bincount(y)[y] > 1
    x, y = x[keep], y[keep]
    assert nmi(x, y, seed=0, backend="sklearn") == pytest.approx(1.0, abs=1e-9)
    noisy, ny = clustered_data(1, n_classes=20, spread=1.5)
    assert nmi(noisy, ny, seed=3) == nmi(noisy, ny, seed=3)
    clusters = kmeans_assign(noisy, 20, seed=3)
    assert nmi(noisy, ny, seed=3) == pytest.approx(normalized_mutual_info_score(ny, clusters))
