"""A searchable index of embeddings, with the paths and labels of its rows.

Kinds (``python -m dml index --kind``):
- ``flat``: exact search (the default), through ``dml.metrics.knn``: neighbours ordered by
  (distance, row) as the evaluation orders them, so Recall@K from its results is the
  evaluation's;
- ``ivf`` (faiss IndexIVFFlat: an inverted file over nlist k-means cells, nprobe searched),
  ``hnsw`` (IndexHNSWFlat: a navigable small-world graph, M = 32), ``ivfpq`` (IndexIVFPQ:
  inverted file with product-quantised codes): approximate; when built, each reports its
  Recall@10 against exact search on a sample of its rows, so the cost of the speed is known.
  A returned neighbour counts when it lies at or inside the exact 10th distance (the rule of
  ann-benchmarks), so exact duplicates, any of which is a right answer, are not miscounted.

Cosine, always: rows are L2-normalised when the index is built and queries when they are
searched (an ``.npz`` from another tool need not hold unit rows), so the similarity returned,
1 - d^2 / 2 for the squared distance d^2 of unit vectors, is the cosine, clipped to [-1, 1]
against rounding. Rows or queries with NaN, inf or zero length are refused, naming how many.
(ivfpq compares compressed codes: its similarities are estimates of the cosine.)

A search returns real neighbours or fewer (``Hits``): where an approximate index finds fewer than
k candidates for a query (faiss fills the gap with row -1), that query gets fewer hits, never a
placeholder; ``exact_fallback`` searches such queries exhaustively instead.

Files: ``INDEX`` is a faiss index (``faiss.write_index``; flat: IndexFlatL2), ``INDEX.rows.npz``
its rows' paths and labels and the build's facts (kind, dim, recall), read as data
(``dml.safe_load``).
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
from dml.safe_load import load_npz, one_line

KINDS = ("flat", "ivf", "hnsw", "ivfpq")
ROWS_SUFFIX = ".rows.npz"
# A returned neighbour within this much of the exact k-th squared distance counts as a hit in
# the recall check (float32 rounding of distances of unit vectors is ~1e-6).
RECALL_DISTANCE_SLACK = 1e-5


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


def unit_rows(x: np.ndarray, what: str) -> np.ndarray:
    """``x`` with each row divided by its L2 norm (in float64, so that rows beyond float32's
    range in either direction keep their direction); NaN, inf or zero rows refused by count."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise ConfigError(f"{what}: rows of type {x.dtype}, expected floats")
    x = x.astype(np.float64) if x.dtype.itemsize <= 8 else x.astype(np.longdouble)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise ConfigError(
            f"{what}: {int(bad.sum())} of {len(x)} rows hold NaN or inf "
            f"(first: row {int(np.flatnonzero(bad)[0])}); nothing was searched"
        )
    scale = np.abs(x).max(axis=1, keepdims=True)
    scale[scale == 0] = 1
    x = (x / scale).astype(np.float64)  # the largest entry 1: no overflow or underflow
    norms = np.linalg.norm(x, axis=1)
    zero = norms == 0
    if zero.any():
        raise ConfigError(
            f"{what}: {int(zero.sum())} of {len(x)} rows have length 0 (first: row "
            f"{int(np.flatnonzero(zero)[0])}), so they have no cosine similarity"
        )
    return np.ascontiguousarray(x / norms[:, None], dtype=np.float32)


@dataclass
class Hits:
    """What a search found: per query, the rows of its neighbours and their cosine similarities,
    nearest first. A query has ``k`` hits, or fewer where the index found fewer (``short``);
    every row is a real row of the index and every similarity a finite cosine."""

    rows: List[np.ndarray]
    similarities: List[np.ndarray]
    k: int
    notes: List[str] = field(default_factory=list)
    rerank_distances: Optional[List[np.ndarray]] = None  # the order of a re-ranked search

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def short(self) -> np.ndarray:
        """The queries with fewer than k hits."""
        return np.array([q for q, r in enumerate(self.rows) if len(r) < self.k], dtype=np.int64)

    def full(self) -> Tuple[np.ndarray, np.ndarray]:
        """(similarities, rows), each (queries, k): for searches where every query got k hits
        (flat indexes always do)."""
        if len(self.short):
            raise ConfigError(
                f"{len(self.short)} of {len(self)} queries got fewer than "
                f"{self.k} hits; read them per query (Hits.rows) or search with "
                f"exact_fallback"
            )
        if not len(self):
            return np.zeros((0, self.k), np.float32), np.zeros((0, self.k), np.int64)
        return np.stack(self.similarities), np.stack(self.rows)

    @classmethod
    def from_faiss(cls, d: np.ndarray, i: np.ndarray, k: int, own=None) -> "Hits":
        """faiss' (distances, ids), with its -1 / sentinel slots and each query's own row
        (``own[q]``, when the queries are the index's rows) left out, first k kept."""
        rows, sims = [], []
        for q in range(len(i)):
            keep = (i[q] >= 0) & np.isfinite(d[q])
            if own is not None:
                keep &= i[q] != own[q]
            rows.append(i[q][keep][:k].astype(np.int64))
            sims.append(cosine_of(d[q][keep][:k]))
        return cls(rows, sims, k)


def cosine_of(squared_distances: np.ndarray) -> np.ndarray:
    """The cosine of unit vectors at squared distance d^2: 1 - d^2 / 2, clipped to [-1, 1]."""
    return np.clip(1.0 - np.asarray(squared_distances, np.float64) / 2.0, -1.0, 1.0).astype(
        np.float32
    )


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
    def build(
        cls,
        rows: EmbeddingSet,
        kind: str = "flat",
        nprobe: Optional[int] = None,
        recall_sample: int = 1000,
        seed: int = 0,
    ) -> "SearchIndex":
        """The index of ``rows`` (L2-normalised first). Approximate kinds' parameters are
        clamped to the rows there are; ``meta["notes"]`` says where."""
        if kind not in KINDS:
            raise ConfigError(f"--kind {kind}: expected one of {list(KINDS)}")
        if len(rows) == 0:
            raise ConfigError("the embeddings have 0 rows: there is nothing to index")
        faiss = _faiss()
        x = unit_rows(rows.embeddings, "the embeddings")
        n, d = x.shape
        notes = []
        if kind == "flat":
            index = faiss.IndexFlatL2(d)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, 32)
            index.hnsw.efSearch = 64
        else:
            nlist = ivf_cells(n)
            if kind == "ivfpq" and n < 39 * 16:
                raise ConfigError(
                    f"--kind ivfpq needs at least {39 * 16} rows to train its "
                    f"codebooks, the embeddings have {n}; use flat"
                )
            if nprobe is not None and nprobe < 1:
                raise ConfigError(f"--nprobe {nprobe}: expected a number of cells >= 1")
            quantizer = faiss.IndexFlatL2(d)
            index = (
                faiss.IndexIVFFlat(quantizer, d, nlist)
                if kind == "ivf"
                else faiss.IndexIVFPQ(
                    quantizer, d, nlist, pq_subquantizers(d), 8 if n >= 39 * 256 else 4
                )
            )
            index.cp.seed = seed
            index.cp.min_points_per_centroid = 1  # nlist is already sized to the rows
            index.train(x)
            index.nprobe = min(nprobe or 16, nlist)
            if nprobe and nprobe > nlist:
                notes.append(f"nprobe {nprobe} clamped to the {nlist} cells of {n} rows")
        index.add(x)
        unit = np.abs(np.linalg.norm(rows.embeddings.astype(np.float64), axis=1) - 1) <= 1e-3
        if not unit.all():
            notes.append(
                f"{int((~unit).sum())} of {n} rows were not of unit length and were L2-normalised"
            )
        built = cls(
            kind,
            index,
            list(rows.paths),
            rows.labels,
            {
                "kind": kind,
                "rows": n,
                "dim": d,
                "normalised": True,
                "notes": notes,
                "source": rows.meta,
            },
        )
        if kind != "flat":
            if n < 2:
                notes.append("no recall check: one row has no neighbour")
            else:
                built.meta["recall@10"] = built.recall_against_exact(x, recall_sample, seed)
                built.meta["recall_sample"] = min(recall_sample, n)
                built.meta["recall_k"] = min(10, n - 1)
        return built

    # --- search ---------------------------------------------------------------------------
    def search(
        self,
        queries: np.ndarray,
        k: int = 10,
        exclude_self: bool = False,
        exact_fallback: bool = False,
        nprobe: Optional[int] = None,
    ) -> Hits:
        """The k nearest rows of each query (L2-normalised first). ``exclude_self``: the
        queries are this index's rows in order, each left out of its own results.
        ``exact_fallback``: queries an approximate index finds fewer than k hits for are
        searched exhaustively. ``nprobe``: ivf kinds, cells searched (clamped to the cells)."""
        queries = np.asarray(queries)
        if queries.ndim != 2:
            raise ConfigError(
                f"the queries are an array of shape {queries.shape}, expected (queries, {self.dim})"
            )
        if queries.shape[1] != self.dim:
            raise ConfigError(
                f"the queries are {queries.shape[1]}-d embeddings, the index "
                f"holds {self.dim}-d ones: embed them with the checkpoint the "
                f"index was built from"
            )
        if exclude_self and len(queries) != len(self):
            raise ConfigError(
                f"exclude_self: the queries must be the index's own {len(self)} "
                f"rows, in order; there are {len(queries)} queries"
            )
        if k < 1:
            raise ConfigError(f"k {k}: expected a number of neighbours >= 1")
        available = len(self) - int(exclude_self)
        if available < 1:
            raise ConfigError(
                "the index has no row to return (one row, searched with exclude_self)"
            )
        notes = []
        if k > available:
            notes.append(
                f"k {k} clamped to {available}, the rows "
                f"{'other than the query ' if exclude_self else ''}in the index"
            )
            k = available
        if len(queries) == 0:
            return Hits([], [], k, notes)
        queries = unit_rows(queries, "the queries")
        own = np.arange(len(queries)) if exclude_self else None
        if exclude_self and self.kind != "ivfpq":  # ivfpq keeps codes, not the rows
            differ = np.flatnonzero(np.abs(queries - self.stored_rows()).max(axis=1) > 1e-4)
            if len(differ):
                raise ConfigError(
                    f"exclude_self: the queries must be the index's own rows, in "
                    f"order; {len(differ)} of {len(queries)} are not (first: "
                    f"query {int(differ[0])})"
                )
        if nprobe is not None:
            notes += self.set_nprobe(nprobe)
        if self.kind == "flat":
            hits = self.exact_search(queries, k, own)
        else:
            d, i = self.index.search(queries, k + int(exclude_self))
            hits = Hits.from_faiss(d, i, k, own)
            short = hits.short
            if exact_fallback and len(short):
                exact = self.exact_search(queries[short], k, None if own is None else own[short])
                for j, q in enumerate(short):
                    hits.rows[q], hits.similarities[q] = exact.rows[j], exact.similarities[j]
                notes.append(
                    f"{len(short)} queries with fewer than {k} hits were searched exhaustively"
                )
        hits.notes = notes + hits.notes
        return hits

    def stored_rows(self) -> np.ndarray:
        """The index's rows as it stores them (ivfpq: decoded from its codes), float32."""
        if hasattr(self.index, "invlists"):
            rows = (
                self.index.reconstruct_n(0, len(self))
                if self.index.direct_map.type
                else self.rows_of_inverted_lists()
            )
        else:
            rows = self.index.reconstruct_n(0, len(self))
        if isinstance(rows, torch.Tensor):  # faiss.contrib.torch_utils, once imported, patches
            rows = rows.cpu().numpy()  # faiss to hand back torch tensors
        return np.ascontiguousarray(rows, dtype=np.float32)

    def rows_of_inverted_lists(self) -> np.ndarray:
        """An IVF index's rows in id order, read from its inverted lists."""
        faiss = _faiss()
        ivf = faiss.extract_index_ivf(self.index)
        ivf.make_direct_map()
        return ivf.reconstruct_n(0, len(self))

    def exact_search(self, queries: np.ndarray, k: int, own=None) -> Hits:
        """Exhaustive search of the stored rows under the evaluation's rule: neighbours ordered
        by (distance, row), ``own[q]`` left out of query q's list."""
        from dml.metrics.knn import knn

        reference = self.stored_rows()
        if own is not None and len(own) == len(reference) and (own == np.arange(len(own))).all():
            d, i = knn(queries, None, k, backend="torch")
            return Hits.from_faiss(d.numpy(), i.numpy(), k)
        extra = int(own is not None)
        d, i = knn(queries, reference, min(k + extra, len(reference)), backend="torch")
        return Hits.from_faiss(d.numpy(), i.numpy(), k, own)

    def set_nprobe(self, nprobe: int) -> List[str]:
        if not hasattr(self.index, "nprobe"):
            raise ConfigError(
                f"--nprobe: a {self.kind} index has no cells to probe (ivf and ivfpq do)"
            )
        if nprobe < 1:
            raise ConfigError(f"--nprobe {nprobe}: expected a number of cells >= 1")
        nlist = int(self.index.nlist)
        self.index.nprobe = min(nprobe, nlist)
        return [f"nprobe {nprobe} clamped to the index's {nlist} cells"] if nprobe > nlist else []

    def recall_against_exact(self, x: np.ndarray, sample: int, seed: int = 0, k: int = 10) -> float:
        """Recall@k against exact search, counted by distance: the mean share of the index's k
        answers for each sampled row (itself excluded) that lie at or inside the row's exact
        k-th squared distance (+ ``RECALL_DISTANCE_SLACK``), distances recomputed from ``x``."""
        from dml.metrics.knn import knn

        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(len(x), size=min(sample, len(x)), replace=False))
        k = min(k, len(x) - 1)
        exact_d, exact_i = knn(
            torch.from_numpy(x[rows]), torch.from_numpy(x), k + 1, backend="torch"
        )
        # the exact k-th distance among the other rows: the row itself dropped from its k + 1
        kth = np.array(
            [
                d[i != r][k - 1]
                for d, i, r in zip(exact_d.numpy().astype(np.float64), exact_i.numpy(), rows)
            ]
        )
        _, found = self.index.search(x[rows], k + 1)
        hits = 0
        for q, (r, ids) in enumerate(zip(rows, found)):
            ids = [j for j in ids.tolist() if j >= 0 and j != r][:k]
            true_d = ((x[ids].astype(np.float64) - x[r].astype(np.float64)) ** 2).sum(1)
            hits += int((true_d <= kth[q] + RECALL_DISTANCE_SLACK).sum())
        return hits / (len(rows) * k)

    # --- files --------------------------------------------------------------------------------
    def save(self, path: str) -> str:
        """The faiss file and its rows file, each written whole or not at all."""
        faiss = _faiss()
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        tmp_index, tmp_rows = (
            f"{path}.{os.getpid()}.partial",
            f"{path}.{os.getpid()}.partial{ROWS_SUFFIX}",
        )
        try:
            faiss.write_index(self.index, tmp_index)
            np.savez(
                tmp_rows,
                paths=np.asarray(self.paths, dtype=str),
                labels=self.labels,
                meta=np.asarray(json.dumps(self.meta)),
            )
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
            raise ConfigError(
                f"{path}: its rows file {path + ROWS_SUFFIX} (paths and labels) "
                f"is missing; rebuild the index with `python -m dml index`"
            )
        try:
            index = faiss.read_index(path)
        except RuntimeError as error:
            raise ConfigError(f"{path}: not a faiss index ({one_line(error)})") from None
        f = load_npz(
            path + ROWS_SUFFIX, ("paths", "labels", "meta"), "index rows file (python -m dml index)"
        )
        paths, labels, meta = [str(p) for p in f["paths"]], f["labels"], f["meta"]
        if len(paths) != index.ntotal or labels.shape != (len(paths),):
            raise ConfigError(
                f"{path}: the index holds {index.ntotal} rows, its rows file "
                f"{len(paths)} paths and {labels.size} labels"
            )
        kind = meta.get("kind", "flat")
        if kind not in KINDS:
            raise ConfigError(
                f"{path}: its rows file names kind {kind!r}, expected one of {list(KINDS)}"
            )
        built = cls(kind, index, paths, labels, meta)
        if not meta.get("normalised") and kind != "ivfpq" and len(built):
            norms = np.linalg.norm(built.stored_rows()[:1000], axis=1)
            if np.abs(norms - 1).max() > 1e-3:
                raise ConfigError(
                    f"{path}: an index of rows that are not of unit length (built "
                    f"before rows were L2-normalised); rebuild it with "
                    f"`python -m dml index`"
                )
        return built
