"""A set of embeddings with what they embed: the file ``python -m dml embed`` writes.

Format (``.npz``, numpy's zip of arrays): ``embeddings`` (n, D) float32 or float16, L2-normalised
rows; ``paths`` (n,) the image files (or ``<data set>:<split>/<index>`` for in-memory data);
``labels`` (n,) int64 class ids where known, -1 where not; ``meta`` one JSON string (the
checkpoint, the embedding size, the data set and split, the unreadable files skipped).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from dml.errors import ConfigError
from dml.safe_load import load_npz


@dataclass
class EmbeddingSet:
    embeddings: np.ndarray
    paths: List[str]
    labels: np.ndarray
    meta: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if self.embeddings.ndim != 2 or not (
            len(self.embeddings) == len(self.paths) == len(self.labels)
        ):
            raise ValueError(
                f"EmbeddingSet: {self.embeddings.shape} embeddings, "
                f"{len(self.paths)} paths and {len(self.labels)} labels"
            )

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def has_labels(self) -> bool:
        return bool(len(self.labels)) and bool((self.labels >= 0).all())

    def save(self, path: str) -> str:
        """Written to a temporary file and renamed: a failed write leaves no file under
        ``path``."""
        if not path.endswith(".npz"):
            raise ConfigError(f"--out {path}: embeddings are written as .npz")
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        tmp = f"{path}.{os.getpid()}.partial.npz"
        try:
            np.savez(
                tmp,
                embeddings=self.embeddings,
                paths=np.asarray(self.paths, dtype=str),
                labels=self.labels,
                meta=np.asarray(json.dumps(self.meta)),
            )
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path

    @classmethod
    def load(cls, path: str) -> "EmbeddingSet":
        """Read as data (``np.load(allow_pickle=False)``); every bad file is one ConfigError
        naming it."""

        def same_rows(shapes) -> None:  # before anything is inflated (a deflate bomb)
            rows = [shapes[k][0] if shapes[k] else None for k in ("embeddings", "paths", "labels")]
            if len(set(rows)) != 1:
                raise ConfigError(
                    f"{path}: {rows[0]} embeddings, {rows[1]} paths and {rows[2]} labels; "
                    f"expected one path and one integer label per row"
                )

        f = load_npz(
            path,
            ("embeddings", "paths", "labels", "meta"),
            "embeddings file (python -m dml embed)",
            same_rows,
        )
        embeddings, paths, labels = f["embeddings"], f["paths"], f["labels"]
        if embeddings.ndim != 2 or not np.issubdtype(embeddings.dtype, np.floating):
            raise ConfigError(
                f"{path}: embeddings of shape {embeddings.shape} and type "
                f"{embeddings.dtype}, expected (rows, dim) floats"
            )
        if embeddings.shape[1] == 0:
            raise ConfigError(f"{path}: the embeddings have 0 dimensions")
        if (
            paths.ndim != 1
            or labels.ndim != 1
            or not np.issubdtype(labels.dtype, np.integer)
            or not (len(embeddings) == len(paths) == len(labels))
        ):
            raise ConfigError(
                f"{path}: {len(embeddings)} embeddings, {paths.size} paths and "
                f"{labels.size} labels ({labels.dtype}); expected one path and one "
                f"integer label per row"
            )
        return cls(embeddings, [str(p) for p in paths], labels, f["meta"])

    def non_finite_rows(self) -> int:
        """How many rows hold NaN or inf."""
        return int((~np.isfinite(self.embeddings)).any(axis=1).sum())

    def float32(self) -> np.ndarray:
        return np.ascontiguousarray(self.embeddings, dtype=np.float32)


def concatenate(sets: List[EmbeddingSet], meta: Optional[Dict[str, Any]] = None) -> EmbeddingSet:
    return EmbeddingSet(
        np.concatenate([s.embeddings for s in sets]),
        [p for s in sets for p in s.paths],
        np.concatenate([s.labels for s in sets]),
        meta or {},
    )
