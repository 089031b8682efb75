"""A searchable index of embeddings, with the paths and labels of its rows.

Kinds (``python -m dml index --kind``):
- ``flat``: exact search (the default), through ``dml.metrics.knn``: neighbours ordered by
  (distance, row) as the evaluation orders them, so Recall@K from its results is the
  evaluation's;
- ``ivf`` (faiss IndexIVFFlat: an inverted file over nlist k-means cells, nprobe searched),
  ``hnsw`` (IndexHNSWFlat: a navigable small-world graph, M = 32), ``ivfpq`` (IndexIVFPQ:
  inverted file with product-quantised codes): approximate; when built, each reports its
  Recall@10 against exact search on a sample of its rows, so the cost of the speed is known.

Files: ``INDEX`` is a faiss index (``faiss.write_index``; flat: IndexFlatL2), ``INDEX.rows.npz``
its rows' paths and labels and the build's facts (kind, dim, recall). Similarities are cosine
similarities of the L2-normalised embeddings, 1 - d^2 / 2.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from dml.errors import ConfigError
from dml.inference.embeddings import EmbeddingSet

KINDS = ("flat", "ivf", "hnsw", "ivfpq")
ROWS_SUFFIX = ".rows.npz"


def _faiss():
    try:
        import faiss
    except ImportError as error:  # pragma: no cover - faiss is in both install extras
        raise ConfigError("the index needs faiss: pip install -e .[cpu] (or .[gpu])") from error
    return faiss


def ivf_cells(n: int) -> int:
    """nlist: about 4 sqrt(n) cells, at least 39 rows per cell (faiss's k-means minimum)."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def pq_subquantizers(dim: int) -> int:
    """The number of PQ sub-vectors: dim / 8 rounded down to one that divides dim."""
    m = max(1, dim // 8)
    while dim % m:
        m -= 1
    return m


@dataclass
class SearchIndex:
    kind: str
    index: Any  # a faiss index
    paths: List[str]
    labels: np.ndarray
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @classmethod
    def build(cls, rows: EmbeddingSet, kind: str = "flat", nprobe: Optional[int] = None,
              recall_sample: int = 1000, seed: int = 0) -> "SearchIndex":
        if kind not in KINDS:
            raise ConfigError(f"--kind {kind}: expected one of {list(KINDS)}")
        faiss = _faiss()
        x = rows.float32()
        n, d = x.shape
        if kind == "flat":
            index = faiss.IndexFlatL2(d)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, 32)
            index.hnsw.efSearch = 64
        else:
            nlist = ivf_cells(n)
            if kind == "ivfpq" and n < 39 * 16:
                raise ConfigError(f"--kind ivfpq needs at least {39 * 16} rows to train its "
                                  f"codebooks, the embeddings have {n}; use flat")
            quantizer = faiss.IndexFlatL2(d)
            index = faiss.IndexIVFFlat(quantizer, d, nlist) if kind == "ivf" else \
                faiss.IndexIVFPQ(quantizer, d, nlist, pq_subquantizers(d),
                                 8 if n >= 39 * 256 else 4)
            index.cp.seed = seed
            index.train(x)
            index.nprobe = nprobe or max(1, min(nlist, 16))
        index.add(x)
        built = cls(kind, index, list(rows.paths), rows.labels,
                    {"kind": kind, "rows": n, "dim": d, "source": rows.meta})
        if kind != "flat":
            built.meta["recall@10"] = built.recall_against_exact(x, recall_sample, seed)
            built.meta["recall_sample"] = min(recall_sample, n)
        return built

    # --- search ---------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int = 10,
               exclude_self: bool = False) -> Tuple[np.ndarray, np.ndarray]:
        """(similarities, row indices), each (q, k), nearest first. ``exclude_self``: the
        queries are this index's rows in order, each left out of its own results."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ConfigError(f"the queries are {queries.shape[-1]}-d embeddings, the index "
                              f"holds {self.dim}-d ones: embed them with the checkpoint the "
                              f"index was built from")
        if exclude_self and len(queries) != len(self):
            raise ConfigError("exclude_self: the queries must be the index's own rows")
        k = min(k, len(self) - int(exclude_self))
        if k < 1:
            raise ConfigError("the index has no row to return")
        if self.kind == "flat":
            from dml.metrics.knn import knn

            reference = self.index.reconstruct_n(0, len(self))
            d, i = knn(queries, None if exclude_self else reference, k, backend="torch")
            return (1.0 - d.numpy() / 2.0), i.numpy()
        d, i = self.index.search(queries, k + int(exclude_self))
        if exclude_self:
            d, i = drop_rows_self(d, i, k)
        return 1.0 - d / 2.0, i

    def recall_against_exact(self, x: np.ndarray, sample: int, seed: int = 0,
                             k: int = 10) -> float:
        """Mean share of each sampled row's exact 10 nearest (itself excluded) that the index
        returns among its 10."""
        from dml.metrics.knn import knn

        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(len(x), size=min(sample, len(x)), replace=False))
        k = min(k, len(x) - 1)
        _, exact = knn(torch.from_numpy(x[rows]), torch.from_numpy(x), k + 1, backend="torch")
        exact = [[j for j in e.tolist() if j != r][:k] for e, r in zip(exact, rows)]
        _, found = self.index.search(x[rows], k + 1)
        found = [[j for j in f.tolist() if j != r][:k] for f, r in zip(found, rows)]
        return float(np.mean([len(set(e) & set(f)) / k for e, f in zip(exact, found)]))

    # --- files --------------------------------------------------------------------------------
    def save(self, path: str) -> str:
        """The faiss file and its rows file, each written whole or not at all."""
        faiss = _faiss()
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        tmp_index, tmp_rows = f"{path}.{os.getpid()}.partial", \
            f"{path}.{os.getpid()}.partial{ROWS_SUFFIX}"
        try:
            faiss.write_index(self.index, tmp_index)
            np.savez(tmp_rows, paths=np.asarray(self.paths, dtype=str), labels=self.labels,
                     meta=np.asarray(json.dumps(self.meta)))
            os.replace(tmp_rows, path + ROWS_SUFFIX)
            os.replace(tmp_index, path)
        finally:
            for tmp in (tmp_index, tmp_rows):
                if os.path.exists(tmp):
                    os.remove(tmp)
        return path

    @classmethod
    def load(cls, path: str) -> "SearchIndex":
        faiss = _faiss()
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: no such index")
        if not os.path.isfile(path + ROWS_SUFFIX):
            raise ConfigError(f"{path}: its rows file {path + ROWS_SUFFIX} (paths and labels) "
                              f"is missing; rebuild the index with `python -m dml index`")
        try:
            index = faiss.read_index(path)
        except RuntimeError as error:
            raise ConfigError(f"{path}: not a faiss index ({error})") from error
        with np.load(path + ROWS_SUFFIX, allow_pickle=False) as f:
            paths, labels = [str(p) for p in f["paths"]], f["labels"]
            meta = json.loads(str(f["meta"]))
        if len(paths) != index.ntotal:
            raise ConfigError(f"{path}: the index holds {index.ntotal} rows, its rows file "
                              f"{len(paths)}")
        return cls(meta.get("kind", "flat"), index, paths, labels, meta)


def drop_rows_self(d: np.ndarray, i: np.ndarray, k: int):
    """Each query's own row removed from its k + 1 results (the last one if it is absent)."""
    rows = np.arange(len(i))[:, None]
    own = i == rows
    own[~own.any(1), -1] = True
    first = own.argmax(1)
    keep = np.ones_like(own)
    keep[np.arange(len(i)), first] = False
    return d[keep].reshape(len(i), k), i[keep].reshape(len(i), k)
