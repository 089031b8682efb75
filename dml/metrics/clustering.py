"""NMI of a k-means clustering of the embeddings against the class labels.

k-means runs with k = number of distinct labels and a fixed seed (faiss when installed,
scikit-learn otherwise; the two give different clusterings, so compare NMI within one back end).
NMI uses the arithmetic-mean normalisation, I(Y; C) / ((H(Y) + H(C)) / 2), scikit-learn's default.
"""

from __future__ import annotations

import numpy as np
import torch

from dml.metrics.knn import faiss, faiss_available
from dml.metrics.retrieval import as_labels, check_finite


def _as_numpy(x, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(x), dtype=dtype)


def kmeans_assign(
    embeddings,
    num_clusters: int,
    seed: int = 0,
    niter: int = 50,
    nredo: int = 1,
    backend: str = "auto",
) -> np.ndarray:
    """Cluster index of each embedding after k-means with ``num_clusters`` centroids.

    ``nredo`` restarts keep the clustering of lowest objective (faiss: random init; sklearn:
    k-means++ init).
    """
    x = _as_numpy(embeddings, np.float32)
    if backend == "auto":
        backend = "faiss" if faiss_available() else "sklearn"
    if backend == "faiss":
        # max_points_per_centroid=n: no subsampling, every embedding shapes the centroids.
        km = faiss.Kmeans(
            x.shape[1],
            num_clusters,
            niter=niter,
            nredo=nredo,
            seed=seed,
            max_points_per_centroid=len(x),
            min_points_per_centroid=1,
            verbose=False,
        )
        km.train(x)
        return km.index.search(x, 1)[1][:, 0]
    if backend == "sklearn":
        from sklearn.cluster import KMeans

        return KMeans(
            n_clusters=num_clusters, n_init=nredo, max_iter=niter, random_state=seed
        ).fit_predict(x)
    raise ValueError(f"kmeans_assign: unknown backend {backend!r}; expected auto/faiss/sklearn")


def normalized_mutual_info(labels, clusters) -> float:
    """NMI between two labelings, from their contingency table (arithmetic normalisation)."""
    _, y = np.unique(_as_numpy(labels, np.int64), return_inverse=True)
    _, c = np.unique(_as_numpy(clusters, np.int64), return_inverse=True)
    n = len(y)
    if n != len(c):
        raise ValueError("normalized_mutual_info: labelings differ in length")
    pairs = np.bincount(y * (c.max() + 1) + c, minlength=(y.max() + 1) * (c.max() + 1))
    joint = pairs.reshape(y.max() + 1, c.max() + 1) / n
    py, pc = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / np.outer(py, pc)[nz])).sum())
    hy = float(-(py * np.log(py)).sum())
    hc = float(-(pc * np.log(pc)).sum())
    if hy == 0.0 and hc == 0.0:  # both labelings constant: identical partitions
        return 1.0
    denom = (hy + hc) / 2.0
    return max(mi, 0.0) / denom if denom > 0 else 0.0


def nmi(embeddings, labels, seed: int = 0, nredo: int = 1, backend: str = "auto") -> float:
    """NMI of k-means (k = number of classes, fixed seed) against ``labels``.

    Non-finite embeddings and a single class (NMI is 0 / 0 there) are errors, not scores."""
    labels = as_labels(labels, "labels", "nmi").cpu().numpy().reshape(-1)
    x = torch.from_numpy(_as_numpy(embeddings, np.float32))  # k-means runs on the CPU
    if x.ndim != 2 or len(x) != len(labels):
        raise ValueError(
            f"nmi: expected (n, d) embeddings and n labels, got {tuple(x.shape)} and {len(labels)}"
        )
    check_finite(x, "embeddings", "nmi")
    num_classes = len(np.unique(labels))
    if num_classes < 2:
        raise ValueError("nmi: the labels hold a single class; NMI is undefined (0 / 0)")
    clusters = kmeans_assign(x.numpy(), num_classes, seed=seed, nredo=nredo, backend=backend)
    return normalized_mutual_info(labels, clusters)
