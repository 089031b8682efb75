"""What ``python -m dml compare`` compares: one model's embeddings of an evaluation split.

A model is given as
- an embeddings file (``python -m dml embed CKPT --split test --out a.npz``), searched against
  itself, or against a gallery file (``--gallery``) for a data set with one (In-Shop);
- a checkpoint (``.ckpt``), which embeds its data set's test split (query and gallery where the
  data set has them);
- an MLRC folder (``runs/mlrc/<data set>/<name>``, ``dml/mlrc.py``): the four fold models of a
  seed, their test embeddings L2-normalised, concatenated and normalised again, as the MLRC
  "concatenated" row.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from dml.errors import ConfigError
from dml.inference.embeddings import EmbeddingSet


@dataclass
class ModelSets:
    """One model's embeddings of a split: ``query`` searched against ``gallery`` (None: against
    itself, each query left out of its own search). ``source``: what it came from;
    ``gallery_source``: the gallery's file, where it was given apart."""

    source: str
    query: EmbeddingSet
    gallery: Optional[EmbeddingSet]
    recall_ks: List[int]
    gallery_source: Optional[str] = None


def load_model(
    path: str,
    gallery: Optional[str] = None,
    root: Optional[str] = None,
    seed: Optional[int] = None,
    trust_modules: Sequence[str] = (),
) -> ModelSets:
    """A ``ModelSets`` from an embeddings file, a checkpoint or an MLRC folder (module
    docstring); every bad input is a ConfigError naming it."""
    if os.path.isdir(path):
        return _mlrc_model(path, root, seed)
    if not os.path.exists(path):
        raise ConfigError(f"{path}: no such file or folder")
    if seed is not None:
        raise ConfigError(f"--mlrc-seed: only for MLRC folders; {path} is a file")
    if path.endswith(".npz"):
        query = EmbeddingSet.load(path)
        gallery_set = EmbeddingSet.load(gallery) if gallery else None
        for name, rows in ((path, query), (gallery, gallery_set)):
            if rows is not None:
                _check_rows(name, rows)
        if gallery_set is not None:
            _check_disjoint(path, query, gallery, gallery_set)
        return ModelSets(path, query, gallery_set, [1, 2, 4, 8], gallery)
    if gallery:
        raise ConfigError(f"--gallery: only for embeddings files; {path} embeds its own split")
    from dml.inference import Embedder

    embedder = Embedder.from_checkpoint(path, trust_modules=trust_modules)
    try:
        sets = embedder.embed_evaluation_sets(root)
    except OSError as error:  # its data set's folder, as its config or --root names it
        raise ConfigError(f"{path}: {error} (give its data set's folder with --root)") from None
    return ModelSets(path, _query(sets), sets.get("gallery"), embedder.recall_ks)


def _check_disjoint(
    path: str, query: EmbeddingSet, gallery_path: str, gallery: EmbeddingSet
) -> None:
    """Queries searched in a gallery that holds them would find themselves at distance 0."""
    shared = set(query.paths) & set(gallery.paths)
    if shared:
        raise ConfigError(
            f"{gallery_path}: holds {len(shared)} of the queries of {path} (e.g. "
            f"{sorted(shared)[0]}); a query would find itself. Without --gallery "
            f"a split is searched against itself, each query left out"
        )


def _query(sets):
    return sets["test"] if "test" in sets else sets["query"]


def _check_rows(path: str, rows: EmbeddingSet) -> None:
    if len(rows) == 0:
        raise ConfigError(f"{path}: 0 embeddings, there is nothing to compare")
    if not rows.has_labels:
        raise ConfigError(
            f"{path}: its rows have no class labels (embedded from a folder of "
            f"images?); comparing needs a labelled split (python -m dml embed "
            f"CKPT --split test)"
        )
    if rows.non_finite_rows():
        raise ConfigError(
            f"{path}: {rows.non_finite_rows()} of {len(rows)} embeddings hold "
            f"NaN or inf; a model that diverged has no metrics"
        )


def _mlrc_model(folder: str, root: Optional[str], seed: Optional[int]) -> ModelSets:
    from dml.inference import Embedder
    from dml.mlrc import FOLDS, concatenate_normalized

    records = sorted(glob.glob(os.path.join(folder, "seed*", "fold*", "*", "fold.json")))
    by_seed = {}
    for record in records:
        with open(record) as f:
            done = json.load(f)
        parts = record.split(os.sep)
        s, fold = int(parts[-4][4:]), int(parts[-3][4:])
        # the checkpoint inside this folder (fold.json's path may be where it was trained)
        found = sorted(
            glob.glob(os.path.join(os.path.dirname(record), "*", "checkpoints", "best-*.ckpt"))
        )
        if done.get("status") == "done" and found:
            by_seed.setdefault(s, {})[fold] = found[-1]
    complete = sorted(s for s, folds in by_seed.items() if len(folds) == FOLDS)
    if not complete:
        raise ConfigError(
            f"{folder}: no seed with {FOLDS} trained fold models (expected "
            f"seed<s>/fold<k>/<fingerprint>/fold.json, as python -m dml.mlrc "
            f"writes)"
        )
    seed = complete[0] if seed is None else seed
    if seed not in complete:
        raise ConfigError(
            f"{folder}: --seed {seed} has no {FOLDS} trained fold models; "
            f"seeds with them: {complete}"
        )
    folds = [Embedder.from_checkpoint(by_seed[seed][k]) for k in range(FOLDS)]
    try:
        sets = [e.embed_evaluation_sets(root) for e in folds]
    except OSError as error:
        raise ConfigError(f"{folder}: {error} (give its data set's folder with --root)") from None
    names = list(sets[0])
    merged = {}
    for name in names:
        first = sets[0][name]
        if any(s[name].paths != first.paths for s in sets[1:]):
            raise ConfigError(
                f"{folder}: the fold models of seed {seed} embedded different {name} images"
            )
        merged[name] = EmbeddingSet(
            concatenate_normalized([s[name].float32() for s in sets]),
            first.paths,
            first.labels,
            dict(first.meta, mlrc=folder, seed=seed),
        )
    return ModelSets(
        f"{folder} (seed {seed}, {FOLDS} fold models concatenated)",
        _query(merged),
        merged.get("gallery"),
        folds[0].recall_ks,
    )


def check_same_split(a: ModelSets, b: ModelSets) -> ModelSets:
    """``b`` with its rows in ``a``'s order, or a ConfigError unless both models embedded the
    same images (the same paths and, for generated data, the same content) with the same labels:
    the paired tests pair query q of A with query q of B."""
    if (a.gallery is None) != (b.gallery is None):
        raise ConfigError(
            f"{a.source} and {b.source}: one is searched against a gallery, the "
            f"other against itself"
        )
    query = _aligned(a.query, b.query, "query", a.source, b.source)
    gallery = (
        None
        if a.gallery is None
        else _aligned(
            a.gallery,
            b.gallery,
            "gallery",
            a.gallery_source or a.source,
            b.gallery_source or b.source,
        )
    )
    return ModelSets(b.source, query, gallery, b.recall_ks, b.gallery_source)


def _aligned(x: EmbeddingSet, y: EmbeddingSet, what: str, x_name: str, y_name: str) -> EmbeddingSet:
    """``y`` reordered to ``x``'s paths (unique paths, the same set), labels checked."""
    content_x, content_y = x.meta.get("content"), y.meta.get("content")
    if content_x and content_y and content_x != content_y:
        raise ConfigError(
            f"{x_name} and {y_name}: their {what} images are generated data of "
            f"other settings (the same names, other images); compare two models "
            f"on the same split"
        )
    if x.paths != y.paths:
        position = {p: i for i, p in enumerate(y.paths)}
        if (
            len(position) != len(y.paths)
            or len(set(x.paths)) != len(x.paths)
            or set(position) != set(x.paths)
        ):
            raise ConfigError(
                f"{x_name} and {y_name}: their {what} rows are not the same "
                f"images ({len(x)} and {len(y)} rows); compare two models on the "
                f"same split"
            )
        order = np.array([position[p] for p in x.paths])
        y = EmbeddingSet(y.embeddings[order], list(x.paths), y.labels[order], y.meta)
    if not np.array_equal(x.labels, y.labels):
        raise ConfigError(f"{x_name} and {y_name}: the same {what} images with other labels")
    return y
