"""The training module's evaluation: the embeddings validation and test produce go to the
``Evaluator`` (``dml.evaluation``), which gathers them from every process and scores them on
rank 0; the metrics are broadcast, logged as ``<stage>/<metric>`` and returned.

``EvaluationSteps`` is a part of ``DMLModule`` (a mixin); the Lightning hooks that print each
epoch's line stay in ``dml/module.py``.
"""

from __future__ import annotations

import os
from typing import Dict

import torch

from dml.errors import NonFiniteEmbeddingsError
from dml.evaluation import EvalSets


class EvaluationSteps:
    """Expects the LightningModule's ``trainer``, ``evaluator``, ``recall_ks``, ``log`` and
    ``all_gather``."""

    def evaluate(self, stage: str) -> Dict[str, float]:
        dm = self.trainer.datamodule
        names = dm.loader_names(dm.eval_sets(stage))
        sets = self.evaluator.collect(names, self.all_gather, self.trainer.world_size)
        # every rank holds the same gathered sets, so every rank raises the same error
        self.check_finite_embeddings(sets, stage)
        metrics: Dict[str, float] = {}
        error = None
        if self.trainer.is_global_zero:
            try:
                ks = self.recall_ks or dm.recall_ks
                metrics = self.evaluator.score(sets, ks, self.device, rerank=stage == "test")
                if stage == "test":
                    self.write_per_class(stage, ks)
            except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
                if self.trainer.world_size == 1:
                    raise
                error = f"{type(exc).__name__}: {exc}"
        if self.trainer.world_size > 1:  # scoring ran on rank 0: all ranks learn its outcome
            metrics, error = self.trainer.strategy.broadcast((metrics, error), src=0)
        if error is not None:
            raise RuntimeError(f"{stage} evaluation failed on rank 0: {error}")
        self.evaluator.reset()
        if not self.trainer.sanity_checking:
            for name, value in metrics.items():
                # identical on every rank (broadcast): sync_dist averages equal values
                self.log(f"{stage}/{name}", float(value), prog_bar=name == "R@1", sync_dist=True)
        return metrics

    def write_per_class(self, stage: str, ks) -> str:
        """``<run folder>/per_class_<stage>.csv``: each class's query count and metrics (the
        mean over its queries), from the evaluation just scored."""
        from dml.inference.report import write_rows

        rows = self.evaluator.last_results.per_class(ks)
        path = os.path.join(self.trainer.default_root_dir, f"per_class_{stage}.csv")
        write_rows(
            [
                {k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()}
                for row in rows
            ],
            path,
        )
        self.per_class_path = path
        return path

    def check_finite_embeddings(self, sets: EvalSets, stage: str) -> None:
        """A NonFiniteEmbeddingsError naming the split, epoch and number of bad rows."""
        for s in sets.sets:
            bad = int((~torch.isfinite(s.embeddings).all(1)).sum())
            if bad:
                when = (
                    "before training"
                    if self.trainer.sanity_checking
                    else f"after epoch {self.current_epoch} (step {self.global_step})"
                )
                raise NonFiniteEmbeddingsError(
                    f"{stage} evaluation {when}: {bad} of {len(s.embeddings)} {s.name} "
                    f"embeddings are not finite (NaN or inf); the model has diverged, no metric "
                    f"is reported"
                )

    def split_name(self, stage: str) -> str:
        """What a stage's metrics measure: "test split", "MLRC fold 0", ..."""
        dm = self.trainer.datamodule
        return dm.split_name(stage) if hasattr(dm, "split_name") else stage


def format_metrics(metrics: Dict[str, float]) -> str:
    """``R@1  63.2  MAP@R  32.1``: each metric in percent, one decimal."""
    return "  ".join(f"{k} {100 * v:5.1f}" for k, v in metrics.items())
