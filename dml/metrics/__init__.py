"""Exact retrieval and clustering metrics for deep metric learning.

Public, stable API: ``retrieval_metrics`` and ``nmi``.
"""

from dml.metrics.clustering import kmeans_assign, nmi, normalized_mutual_info
from dml.metrics.knn import faiss_available, k_reciprocal_neighbors, knn
from dml.metrics.retrieval import retrieval_metrics

__all__ = [
    "retrieval_metrics",
    "nmi",
    "knn",
    "kmeans_assign",
    "normalized_mutual_info",
    "faiss_available",
    "k_reciprocal_neighbors",
]
