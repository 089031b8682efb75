"""``python -m dml search --rerank NAME``: the k nearest rows after a re-ranking.

The re-ranking (``dml.reranking``: k-reciprocal, or alpha-QE with database-side augmentation)
runs exactly over every stored row of the index (as the evaluation's re-ranked metrics do), so
its cost is that of an exhaustive search of the rows against themselves. Each query's hits are
the k rows of smallest re-ranked distance, ties by row; each hit carries the plain cosine of the
query and the row (``similarity``, always a real cosine) and the re-ranked distance it was
ordered by (``rerank_distance``).
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch

from dml.errors import ConfigError
from dml.inference.index import Hits, SearchIndex, unit_rows
from dml.metrics.ordering import key_index, stable_smallest


def check_rerank(index: SearchIndex, name: str, params: Optional[Dict]) -> None:
    """ConfigErrors about the index or the settings, before anything is searched."""
    from dml.reranking import settings

    if index.kind == "ivfpq":
        raise ConfigError(
            "--rerank: an ivfpq index stores compressed codes, not its rows; "
            "re-rank over a flat, ivf or hnsw index"
        )
    try:
        settings(name, params)
    except ValueError as error:
        raise ConfigError(f"--rerank-param: {error}") from None


def reranked_search(
    index: SearchIndex,
    queries: np.ndarray,
    k: int,
    name: str,
    params: Optional[Dict] = None,
    exclude_self: bool = False,
) -> Hits:
    from dml.reranking import rerank

    check_rerank(index, name, params)
    stored = index.stored_rows()
    queries = unit_rows(np.asarray(queries, dtype=np.float32), "the queries")
    if queries.shape[1] != index.dim:
        raise ConfigError(
            f"the queries are {queries.shape[1]}-d embeddings, the index holds {index.dim}-d ones"
        )
    if exclude_self and (
        len(queries) != len(stored) or np.abs(queries - stored).max(initial=0) > 1e-4
    ):
        raise ConfigError(
            f"exclude_self: the queries must be the index's own {len(stored)} rows, in order"
        )
    available = len(stored) - int(exclude_self)
    notes = []
    if k > available:
        notes.append(f"k {k} clamped to {available}, the rows in the index")
        k = available
    if k < 1 or len(queries) == 0:
        return Hits(
            [np.zeros(0, np.int64)] * len(queries),
            [np.zeros(0, np.float32)] * len(queries),
            max(k, 0),
            notes,
        )
    reranked = rerank(
        name,
        torch.from_numpy(queries),
        None if exclude_self else torch.from_numpy(stored),
        **(params or {}),
    )
    rows, sims, dists = [], [], []
    step = max(1, (1 << 24) // len(stored))
    for a in range(0, len(queries), step):
        d = reranked.rows(a, a + step).float()
        if exclude_self:
            own = torch.arange(a, a + len(d))
            d[torch.arange(len(d)), own] = float("inf")
        top = key_index(stable_smallest(d, k, torch.arange(len(stored)))).numpy()
        for q, found in enumerate(top):
            rows.append(found.astype(np.int64))
            dists.append(d[q, torch.from_numpy(found)].numpy())
            cosine = stored[found] @ queries[a + q]
            sims.append(np.clip(cosine, -1.0, 1.0).astype(np.float32))
    return Hits(rows, sims, k, notes, rerank_distances=dists)
