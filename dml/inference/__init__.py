"""Using a trained model: embed image collections, index and search them, export the network
(``python -m dml embed | index | search | export``, ``dml.inference.cli``)."""

from dml.inference.embedder import Embedder
from dml.inference.embeddings import EmbeddingSet
from dml.inference.export import export
from dml.inference.index import SearchIndex

__all__ = ["Embedder", "EmbeddingSet", "SearchIndex", "export"]
