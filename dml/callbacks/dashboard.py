"""Dashboard figures after validation: ``dashboard: {enabled: true, every_n_epochs: 5}``.

Rank 0 draws, from the embeddings the validation just scored:
- ``retrieval``: a few seeded queries with their top-k neighbours, framed green (same class)
  or red;
- ``pooling``: the pooling's per-location weights overlaid on images (GSP; skipped for poolings
  without weights);
- ``projection``: a 2-D projection (PCA or t-SNE) of the embeddings coloured by class;
- ``worst``: the queries where the model is worst (latest first relevant reference, then lowest
  MAP@R; ``QueryResults.worst``) with their top-k neighbours, and beside it
  ``worst_classes_<tag>.csv``, the classes of lowest MAP@R (a W&B table ``tables/worst_classes``);
- ``training``: the training diagnostics logged so far (``model.diagnostics``): each loss
  term's gradient norm, and for a memory the share of stored negatives inside the loss's
  margin and the stored positives and negatives per anchor (kept in this callback's state,
  so a resumed run draws its whole history).
Each figure is a PNG in ``<run folder>/figures/<name>_epoch<E>.png`` (for users without W&B,
written atomically) and, when a W&B logger is attached, an image under ``figures/<name>`` at the
current step. A figure that fails to draw is a warning naming it; training goes on. Only rank 0
draws, and nothing it calls is a collective (the folder is resolved in ``setup`` on every rank).
"""

from __future__ import annotations

import os
from typing import Dict

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_warn

from dml.errors import ConfigError
from dml.visualization.figures import save_png


class DashboardFigures(pl.Callback):
    """Args:
    enabled: draw figures.
    every_n_epochs: draw after every n-th validation (and after the last epoch's).
    num_queries, top_k: rows and neighbours of the retrieval grid.
    num_heatmaps: images with pooling weights.
    projection: pca | tsne; max_points: subsample for the projection.
    seed: which queries and points are drawn.
    """

    def __init__(
        self,
        enabled: bool = True,
        every_n_epochs: int = 5,
        num_queries: int = 6,
        top_k: int = 5,
        num_heatmaps: int = 6,
        projection: str = "pca",
        max_points: int = 2000,
        seed: int = 0,
    ):
        if projection not in ("pca", "tsne"):
            raise ConfigError(f"dashboard.projection: expected pca or tsne, got {projection!r}")
        if every_n_epochs < 1:
            raise ConfigError("dashboard.every_n_epochs must be >= 1")
        self.enabled, self.every_n_epochs = enabled, every_n_epochs
        self.num_queries, self.top_k, self.num_heatmaps = num_queries, top_k, num_heatmaps
        self.projection, self.max_points, self.seed = projection, max_points, seed
        self.last_paths: Dict[str, str] = {}
        self.out_dir = "figures"  # set to <run folder>/figures in setup
        self.history: Dict[str, list] = {}  # diagnostics key -> [(step, value), ...]
        self._recorded_step, self._recorded_keys = None, set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Keep the diagnostics of each step that logged them (read once per such step)."""
        if not self.enabled or not trainer.is_global_zero:
            return
        last = pl_module.last_diagnostics() if hasattr(pl_module, "last_diagnostics") else None
        if last is None:
            return
        step, values = last
        if step != self._recorded_step:
            self._recorded_step, self._recorded_keys = step, set()
        for key, value in values.items():  # keys added later in the step come on a later call
            if key not in self._recorded_keys:
                self._recorded_keys.add(key)
                self.history.setdefault(key, []).append((step, float(value)))

    def state_dict(self) -> Dict[str, list]:
        return {"history": {k: [list(p) for p in v] for k, v in self.history.items()}}

    def load_state_dict(self, state_dict) -> None:
        self.history = {k: [tuple(p) for p in v] for k, v in state_dict.get("history", {}).items()}

    def setup(self, trainer, pl_module, stage: str) -> None:
        # every rank calls setup: trainer.log_dir (a broadcast under DDP) is safe only here
        self.out_dir = os.path.join(trainer.log_dir or trainer.default_root_dir, "figures")

    def on_validation_end(self, trainer, pl_module) -> None:
        # rank 0 alone from here on: nothing below may call a collective
        if not self.enabled or trainer.sanity_checking or not trainer.is_global_zero:
            return
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and epoch + 1 >= trainer.max_epochs
        if (epoch + 1) % self.every_n_epochs and not last:
            return
        self.draw(trainer, pl_module, f"epoch{epoch:03d}")

    def draw(self, trainer, pl_module, tag: str) -> Dict[str, str]:
        """Draw every figure; one that fails is a warning naming it, never a stopped run."""
        sets = pl_module.last_evaluation()  # what the validation just scored (rank 0)
        if sets is None:
            return {}
        paths: Dict[str, str] = {}
        for name, build in (
            ("retrieval", self.retrieval_figure),
            ("pooling", self.pooling_figure_of_queries),
            ("projection", self.projection_figure),
            ("worst", self.worst_queries_figure),
            ("training", self.training_figure),
        ):
            try:
                fig = build(trainer, pl_module, sets, tag)
                if fig is not None:
                    paths[name] = save_png(fig, os.path.join(self.out_dir, f"{name}_{tag}.png"))
            except Exception as error:  # noqa: BLE001 - a figure must never stop training
                rank_zero_warn(
                    f"dashboard: the {name} figure of {tag} failed "
                    f"({type(error).__name__}: {error}); training goes on"
                )
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                for name, path in paths.items():
                    try:
                        logger.log_image(
                            key=f"figures/{name}", images=[path], step=trainer.global_step
                        )
                    except Exception as error:  # noqa: BLE001
                        rank_zero_warn(
                            f"dashboard: sending the {name} figure to W&B failed "
                            f"({type(error).__name__}: {error})"
                        )
        self.log_worst_classes(trainer, pl_module, tag)
        self.last_paths = paths
        return paths

    def log_worst_classes(self, trainer, pl_module, tag: str, count: int = 10) -> None:
        """The ``count`` classes of lowest MAP@R: a CSV beside the figures and a W&B table."""
        from dml.inference.report import write_rows

        results = pl_module.last_query_results()
        if results is None:
            return
        rows = sorted(results.per_class([1]), key=lambda r: (r["MAP@R"], r["class"]))[:count]
        try:
            os.makedirs(self.out_dir, exist_ok=True)
            write_rows(rows, os.path.join(self.out_dir, f"worst_classes_{tag}.csv"))
            columns = ["class", "queries", "R@1", "MAP@R", "R-Precision"]
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_table(
                        key="tables/worst_classes",
                        columns=columns,
                        data=[[r[c] for c in columns] for r in rows],
                        step=trainer.global_step,
                    )
        except Exception as error:  # noqa: BLE001 - a table must never stop training
            rank_zero_warn(
                f"dashboard: the worst classes of {tag} failed "
                f"({type(error).__name__}: {error}); training goes on"
            )

    def training_figure(self, trainer, pl_module, sets, tag):
        from dml.visualization.figures import training_diagnostics

        return training_diagnostics(self.history, f"training diagnostics, {tag}")

    def _rows(self, sets):
        """The seeded query rows drawn."""
        rng = np.random.default_rng(self.seed)
        n = len(sets.query.embeddings)
        return rng.choice(n, size=min(self.num_queries, n), replace=False)

    def retrieval_figure(self, trainer, pl_module, sets, tag):
        return self.neighbours_grid(trainer, sets, self._rows(sets), "top-{k} neighbours, " + tag)

    def worst_queries_figure(self, trainer, pl_module, sets, tag):
        results = pl_module.last_query_results()
        if results is None or len(results) == 0:
            return None
        rows = results.query_index[results.worst(self.num_queries)]
        return self.neighbours_grid(
            trainer, sets, rows, "worst queries and their top-{k} neighbours, " + tag
        )

    def neighbours_grid(self, trainer, sets, rows, title: str):
        """Query rows ``rows`` with their top-k neighbours, framed by class."""
        from dml.visualization import retrieval_grid, top_k_neighbours

        datasets = trainer.datamodule.eval_sets("val")
        q, r = sets.query, sets.reference
        k = min(self.top_k, len(r.embeddings) - (1 if sets.same else 0))
        if sets.same:  # itself excluded
            neighbours = top_k_neighbours(q.embeddings, None, k)[torch.as_tensor(rows)]
        else:
            neighbours = top_k_neighbours(q.embeddings[rows], r.embeddings, k)
        q_data, r_data = datasets[q.name], datasets[r.name]
        queries = [q_data[int(q.indices[i])][0] for i in rows]
        shown = [[r_data[int(r.indices[j])][0] for j in row] for row in neighbours.tolist()]
        correct = [
            [bool(r.labels[j] == q.labels[i]) for j in row]
            for i, row in zip(rows, neighbours.tolist())
        ]
        return retrieval_grid(queries, shown, correct, title=title.format(k=k))

    def pooling_figure_of_queries(self, trainer, pl_module, sets, tag):
        datasets = trainer.datamodule.eval_sets("val")
        q = sets.query
        images = [
            datasets[q.name][int(q.indices[i])][0] for i in self._rows(sets)[: self.num_heatmaps]
        ]
        return self.pooling_figure(pl_module, images, tag)

    def projection_figure(self, trainer, pl_module, sets, tag):
        from dml.visualization import embedding_projection

        r = sets.reference
        return embedding_projection(
            r.embeddings,
            r.labels,
            self.projection,
            self.max_points,
            self.seed,
            title=f"{self.projection.upper()} of the {r.name} embeddings, {tag}",
        )

    @staticmethod
    @torch.no_grad()
    def pooling_figure(pl_module, images, tag: str):
        from dml.visualization import pooling_heatmaps

        if not images:
            return None
        batch = torch.stack(images).to(pl_module.device)
        weights = pl_module.pooling_weights(batch)
        if weights is None:
            return None
        return pooling_heatmaps(
            batch.cpu(),
            weights.flatten(1).cpu(),
            weights.shape[-2:],
            title=f"pooling weights, {tag}",
        )
