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
    itself, each query left out of its own search). ``source``: what it came from."""
    source: str
    query: EmbeddingSet
    gallery: Optional[EmbeddingSet]
    recall_ks: List[int]


def load_model(path: str, gallery: Optional[str] = None, root: Optional[str] = None,
               seed: Optional[int] = None, trust_modules: Sequence[str] = ()) -> ModelSets:
    """A ``ModelSets`` from an embeddings file, a checkpoint or an MLRC folder (module
    docstring); every bad input is a ConfigError naming it."""
    if os.path.isdir(path):
        return _mlrc_model(path, root, seed)
    if not os.path.exists(path):
        raise ConfigError(f"{path}: no such file or folder")
    if path.endswith(".npz"):
        query = EmbeddingSet.load(path)
        gallery_set = EmbeddingSet.load(gallery) if gallery else None
        for name, rows in ((path, query), (gallery, gallery_set)):
            if rows is not None:
                _check_rows(name, rows)
        return ModelSets(path, query, gallery_set, [1, 2, 4, 8])
    if gallery:
        raise ConfigError(f"--gallery: only for embeddings files; {path} embeds its own split")
    from dml.inference import Embedder

    embedder = Embedder.from_checkpoint(path, trust_modules=trust_modules)
    sets = embedder.embed_evaluation_sets(root)
    return ModelSets(path, _query(sets), sets.get("gallery"),
                     embedder.recall_ks)


def _query(sets):
    return sets["test"] if "test" in sets else sets["query"]


def _check_rows(path: str, rows: EmbeddingSet) -> None:
    if len(rows) == 0:
        raise ConfigError(f"{path}: 0 embeddings, there is nothing to compare")
    if not rows.has_labels:
        raise ConfigError(f"{path}: its rows have no class labels (embedded from a folder of "
                          f"images?); comparing needs a labelled split (python -m dml embed "
                          f"CKPT --split test)")
    if rows.non_finite_rows():
        raise ConfigError(f"{path}: {rows.non_finite_rows()} of {len(rows)} embeddings hold "
                          f"NaN or inf; a model that diverged has no metrics")


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
        if done.get("status") == "done" and os.path.isfile(done.get("checkpoint", "")):
            by_seed.setdefault(s, {})[fold] = done["checkpoint"]
    complete = sorted(s for s, folds in by_seed.items() if len(folds) == FOLDS)
    if not complete:
        raise ConfigError(f"{folder}: no seed with {FOLDS} trained fold models (expected "
                          f"seed<s>/fold<k>/<fingerprint>/fold.json, as python -m dml.mlrc "
                          f"writes)")
    seed = complete[0] if seed is None else seed
    if seed not in complete:
        raise ConfigError(f"{folder}: --seed {seed} has no {FOLDS} trained fold models; "
                          f"seeds with them: {complete}")
    folds = [Embedder.from_checkpoint(by_seed[seed][k]) for k in range(FOLDS)]
    sets = [e.embed_evaluation_sets(root) for e in folds]
    names = list(sets[0])
    merged = {}
    for name in names:
        first = sets[0][name]
        if any(s[name].paths != first.paths for s in sets[1:]):
            raise ConfigError(f"{folder}: the fold models of seed {seed} embedded different "
                              f"{name} images")
        merged[name] = EmbeddingSet(concatenate_normalized([s[name].float32() for s in sets]),
                                    first.paths, first.labels,
                                    dict(first.meta, mlrc=folder, seed=seed))
    return ModelSets(f"{folder} (seed {seed}, {FOLDS} fold models concatenated)",
                     _query(merged), merged.get("gallery"),
                     folds[0].recall_ks)


def check_same_split(a: ModelSets, b: ModelSets) -> None:
    """A ConfigError unless both models embedded the same images, in the same order, with the
    same labels (the paired tests pair query q of A with query q of B)."""
    if (a.gallery is None) != (b.gallery is None):
        raise ConfigError(f"{a.source} and {b.source}: one is searched against a gallery, the "
                          f"other against itself")
    for what, x, y in (("query", a.query, b.query), ("gallery", a.gallery, b.gallery)):
        if x is None:
            continue
        if x.paths != y.paths or not np.array_equal(x.labels, y.labels):
            raise ConfigError(f"{a.source} and {b.source}: their {what} rows are not the same "
                              f"images with the same labels ({len(x)} and {len(y)} rows); "
                              f"compare two models on the same split")
