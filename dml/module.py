"""The LightningModule: image -> backbone -> pooling -> head -> objective, and its hooks.

The module is handed its parts by ``dml.builder`` (every check that spans parts is there). It
holds the Lightning hooks and the path from images to embeddings (``embed``); each other job is
a module of its own, which ``DMLModule`` takes in as a part:
- the training step: embed -> objective (every loss term, ``dml.objective``) -> log -> the sum;
- the non-finite policy (``dml.nonfinite_guard``): a NaN loss stops the run naming the step (or,
  ``nonfinite_loss: skip``, skips it); no checkpoint is written of a non-finite state;
- the optimizer (``dml.optimizer_setup``): one parameter group per part role;
- pooling initialisation (``dml.pooling_init``): GSP's prototypes at the first step;
- the device's settings (``dml.device_settings``): channels-last and compilation;
- evaluation (``dml.evaluation_steps``): embeddings to the ``Evaluator``, scored on rank 0;
- checkpoints of earlier layouts (``dml.checkpoint_migration``).
Its configuration groups are the dataclasses of ``dml.config``.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn

from dml.builder import build_parts, check_batch_composition, terms_by_name
from dml.checkpoint_migration import upgrade_checkpoint
from dml.config import (  # noqa: F401
    AT_LEAST_ONE,
    BackboneConfig,
    EvalConfig,
    IBCConfig,
    LossConfig,
    MemoryConfig,
    OptimizerConfig,
    PoolingConfig,
    ZeroShotConfig,
    as_config,
    check_range,
    check_ranges,
)
from dml.device_settings import DeviceSettings
from dml.evaluation import Evaluator
from dml.evaluation_steps import EvaluationSteps, format_metrics
from dml.losses.ibc import pseudo_test_refiner
from dml.models import pool_images
from dml.nonfinite_guard import NonFiniteGuard, check_policy
from dml.optimizer_setup import OptimizerSetup, check_optimizer
from dml.pooling_init import PoolingInitialization

EPOCH_METRICS_KEY = "dml_epoch_metrics"  # {epoch: validation metrics} in checkpoints


class DMLModule(
    NonFiniteGuard,
    OptimizerSetup,
    PoolingInitialization,
    EvaluationSteps,
    DeviceSettings,
    pl.LightningModule,
):
    def __init__(
        self,
        backbone: BackboneConfig = BackboneConfig(),
        pooling: PoolingConfig = PoolingConfig(),
        embedding_dim: Optional[int] = 512,
        loss: LossConfig = LossConfig(),
        optimizer: OptimizerConfig = OptimizerConfig(),
        evaluation: EvalConfig = EvalConfig(),
        zero_shot: ZeroShotConfig = ZeroShotConfig(),
        ibc: IBCConfig = IBCConfig(),
        memory: MemoryConfig = MemoryConfig(),
        num_classes: Optional[int] = None,
        recall_ks: Optional[List[int]] = None,
        nonfinite_loss: str = "stop",
        terms: Union[Dict[str, Optional[Dict[str, Any]]], List[Dict[str, Any]], None] = None,
        compile: Union[bool, str] = False,
        diagnostics: bool = True,
    ):
        """embedding_dim: D, the width of the embedding head's linear map; null: no head, the
        embedding is the pooled backbone feature, L2-normalised (``dml.models.PooledFeatures``;
        what ``python -m dml test --zero-shot`` evaluates). nonfinite_loss: what a NaN or
        infinite loss does: ``stop`` the run with an error naming the step, the loss parts and
        the learning rates (the default), or ``skip`` the step (no backward, no optimizer step)
        and go on. terms: more objective terms by name and class path,
        ``{name: {class_path: package.module.Class, init_args: {...}}}``
        (``dml.builder.build_terms``; the list of runs from before terms had names is read as
        that mapping). compile: ``torch.compile`` the backbone for training and
        evaluation (``true``, or a mode: "default", "reduce-overhead", "max-autotune"); the
        weights, their names and the checkpoints stay the plain module's. diagnostics: on the
        steps the loggers write, also log ``train/grad_norm/<term>`` (each loss term's gradient
        norm at the head's output) and the memory term's ``train/memory/...`` quantities
        (``Objective.diagnostics``); they change nothing in training."""
        super().__init__()
        backbone, pooling = as_config(BackboneConfig, backbone), as_config(PoolingConfig, pooling)
        loss, memory = as_config(LossConfig, loss), as_config(MemoryConfig, memory)
        optimizer = as_config(OptimizerConfig, optimizer)
        evaluation = as_config(EvalConfig, evaluation)
        zero_shot, ibc = as_config(ZeroShotConfig, zero_shot), as_config(IBCConfig, ibc)
        for key, group in (
            ("backbone", backbone),
            ("loss", loss),
            ("memory", memory),
            ("optimizer", optimizer),
            ("zero_shot", zero_shot),
            ("ibc", ibc),
        ):
            check_ranges(f"model.{key}", group)
        check_range("model.embedding_dim", embedding_dim, AT_LEAST_ONE)
        check_policy(nonfinite_loss)
        check_optimizer(optimizer)
        terms = terms_by_name(terms)  # also the list of checkpoints before terms had names
        # Plain dicts, so that checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(
            {
                "backbone": asdict(backbone),
                "pooling": asdict(pooling),
                "embedding_dim": embedding_dim,
                "loss": asdict(loss),
                "optimizer": asdict(optimizer),
                "evaluation": asdict(evaluation),
                "zero_shot": asdict(zero_shot),
                "ibc": asdict(ibc),
                "memory": asdict(memory),
                "num_classes": num_classes,
                "recall_ks": recall_ks,
                "nonfinite_loss": nonfinite_loss,
                "terms": terms,
                "compile": compile,
                "diagnostics": bool(diagnostics),
            }
        )
        self.optimizer_cfg, self.recall_ks = optimizer, recall_ks
        self.diagnostics = bool(diagnostics)
        self.nonfinite_loss, self.skipped_steps = nonfinite_loss, 0

        parts = build_parts(
            backbone, pooling, embedding_dim, loss, zero_shot, ibc, memory, num_classes, terms
        )
        self.backbone, self.pooling, self.head = parts.backbone, parts.pooling, parts.head
        self.init_device_settings(backbone.channels_last, compile)
        self.objective = parts.objective
        if self.objective.proximal is not None:
            self.objective.proximal.attach(self.network_parameters)
        refine = None
        if self.objective.ibc is not None and ibc.pseudo_test:
            refine = pseudo_test_refiner(self.objective.ibc, ibc.pseudo_test_k)
        self.evaluator = Evaluator(
            evaluation.nmi,
            evaluation.nmi_seed,
            evaluation.backend,
            refine,
            evaluation.rerank,
            evaluation.rerank_params,
        )
        self.last_metrics: Dict[str, float] = {}
        self.initial_metrics: Dict[str, float] = {}
        # validation metrics of every epoch of the run (kept in checkpoints): the run's summary
        self.epoch_metrics: Dict[int, Dict[str, float]] = {}
        # what the test line says was measured besides the split, e.g. "zero-shot: resnet50,
        # pretrained=True, no training, 2048-d gap features" (set by ``test --zero-shot``)
        self.test_description: Optional[str] = None

    # --- forward ----------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> Dict[str, Any]:
        """Everything the objective and dashboards need: "embeddings" (L2-normalised),
        "raw_embeddings" (the head's output; with no head, the pooled feature), "pooling"
        (``PoolingOutput``) and "grid" (H, W of the feature map the pooling weighs)."""
        if self.uses_channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        backbone = self.backbone if self.compiled_backbone is None else self.compiled_backbone
        feature_map, pooled = pool_images(
            backbone, self.pooling, images, projection=self.head.linear
        )
        raw, embeddings = self.head(pooled.pooled)
        return {
            "embeddings": embeddings,
            "raw_embeddings": raw,
            "pooling": pooled,
            "grid": tuple(int(n) for n in feature_map.shape[-2:]),
        }

    @torch.no_grad()
    def pooling_weights(self, images: torch.Tensor) -> Optional[torch.Tensor]:
        """The pooling's per-location weights (B, H, W) of ``images`` in eval mode, through
        ``embed`` (the compiled backbone, channels-last); None for a pooling without weights."""
        was_training = self.training
        self.eval()
        try:
            embedded = self.embed(images)
        finally:
            self.train(was_training)
        weights = embedded["pooling"].weights
        return None if weights is None else weights.reshape(len(images), *embedded["grid"])

    def last_evaluation(self):
        """What the last validation scored (query and reference sets: embeddings, labels,
        data-set indices), on rank 0; None before the first."""
        return self.evaluator.last_sets

    def last_query_results(self):
        """The per-query results of the last evaluation (``dml.metrics.QueryResults``: first
        relevant rank, MAP@R and R-Precision of each query), on rank 0; None before the
        first."""
        return self.evaluator.last_results

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings (B, D): what retrieval uses."""
        return self.embed(images)["embeddings"]

    def network_parameters(self) -> Iterator[Tuple[str, torch.nn.Parameter]]:
        """The network's trainable weights: every trainable parameter outside the objective
        (backbone, pooling, head, and any part added later)."""
        return (
            (name, p)
            for name, p in self.named_parameters()
            if p.requires_grad and not name.startswith("objective.")
        )

    # --- device-dependent settings (dml.device_settings), batch composition ---------------
    def setup(self, stage: str) -> None:
        """The device the trainer runs on decides channels-last (``BackboneConfig``);
        compilation follows ``model.compile``. Lightning calls this before it moves the module
        to that device and wraps it for DDP (``.to(device)`` keeps the memory format)."""
        self.apply_device_settings(self.trainer.strategy.root_device)
        dm = getattr(self.trainer, "datamodule", None)
        if stage == "fit" and hasattr(dm, "samples_per_class"):
            h = self.hparams
            check_batch_composition(
                as_config(LossConfig, h["loss"]),
                as_config(MemoryConfig, h["memory"]),
                as_config(IBCConfig, h["ibc"]),
                h["zero_shot"]["weight"],
                bool(h["terms"]),
                dm.classes_per_batch,
                dm.samples_per_class,
            )

    # --- training ---------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        images, labels, indices = batch
        embedded = self.embed(images)
        embedded["indices"] = indices  # the memory keeps each stored row's image index
        values = self.objective(embedded, labels)
        total = sum(values.values())
        if self.nonfinite_loss == "skip":  # must know before this step's update: reads now
            if not self.loss_is_finite(total):
                return self.on_nonfinite_loss(values, batch_idx)
        else:  # stop: recorded on the device, read every loss_watch.every steps
            self.loss_watch.record(total, values, self.global_step, self.current_epoch, batch_idx)
            if self.loss_watch.due():
                self.check_losses()
        if self.logs_this_step():
            batch_size = len(labels)
            for name, value in values.items():
                self.log(f"train/loss_{name}", value.detach(), batch_size=batch_size)
            self.log("train/loss", total.detach(), prog_bar=True, batch_size=batch_size)
            if self.diagnostics:
                found = self.objective.diagnostics(embedded, labels, values)
                for name, value in found.items():
                    self.log(f"train/{name}", value, batch_size=batch_size)
                self._last_diagnostics = (int(self.global_step), found)
        return total

    def record_diagnostics(self, values: Dict[str, torch.Tensor]) -> None:
        """Log more diagnostics for this step (an observer's, e.g. ``MemoryDrift``) as
        ``train/<name>``, and add them to ``last_diagnostics`` for the dashboard."""
        # the step Lightning logs this batch's values at (the optimiser step before the one
        # on_train_batch_end sees), so a resume keeps them (CSVLogger.forget_from)
        step = max(int(self.global_step) - 1, 0)
        if self._trainer is not None and self.trainer.is_global_zero:
            # straight to the loggers: Lightning's self.log from a callback hook would
            # repeat the value at every later logging step
            metrics = {f"train/{name}": float(value) for name, value in values.items()}
            for logger in self.trainer.loggers:
                logger.log_metrics(metrics, step=step)
        last = self.last_diagnostics()
        merged = dict(last[1]) if last is not None and last[0] == step else {}
        merged.update(values)
        self._last_diagnostics = (step, merged)

    def last_diagnostics(self):
        """(step, {name: value}) of the last step that logged the training diagnostics
        (``Objective.diagnostics``), or None."""
        return getattr(self, "_last_diagnostics", None)

    def logs_this_step(self) -> bool:
        """Whether Lightning writes this step's logged values to the loggers (every
        ``trainer.log_every_n_steps`` steps). The training losses are logged on those steps
        only: each ``self.log`` costs about 1 ms of host time per key (Lightning moves its
        result's state every call), which on other steps would be thrown away."""
        if self._trainer is None:
            return True
        try:
            return bool(
                self.trainer._logger_connector.should_update_logs or self.trainer.fast_dev_run
            )
        except AttributeError:  # another Lightning: log every step
            return True

    def on_train_epoch_end(self) -> None:
        self.check_losses()

    def on_train_end(self) -> None:
        self.check_losses()

    def on_validation_start(self) -> None:
        self.check_losses()

    # --- pooling initialisation (first training step) ------------------------------------
    def on_train_start(self) -> None:
        if self._trainer is not None and self.trainer.ckpt_path:
            self.apply_changed_optimizer_settings()
            for logger in self.trainer.loggers:  # rows a killed process wrote past the checkpoint
                if hasattr(logger, "forget_from"):
                    logger.forget_from(self.trainer.global_step)

    def on_train_batch_start(self, batch, batch_idx) -> None:
        if self.pooling.wants_initialization():
            self.initialize_pooling()

    def configure_optimizers(self):
        return self.build_optimizers()

    # --- evaluation -------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self.evaluator.reset()

    def on_test_epoch_start(self) -> None:
        self.evaluator.reset()

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        images, labels, indices = batch
        with torch.autocast(self.device.type, enabled=False):  # evaluation is float32
            z = self(images.float())
        self.evaluator.add(dataloader_idx, z.float(), labels, indices)

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self.validation_step(batch, batch_idx, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        if not self.evaluator.parts:
            return
        metrics = self.evaluate("val")
        split = f"val: {self.split_name('val')}"
        if self.trainer.sanity_checking:
            self.initial_metrics = metrics
            label = "resumed model" if self.trainer.ckpt_path else "untrained model"
            self.print(f"{label} | {split} | " + format_metrics(metrics))
        else:
            self.last_metrics = metrics
            self.epoch_metrics[int(self.current_epoch)] = dict(metrics)
            self.print(f"epoch {self.current_epoch:3d} | {split} | " + format_metrics(metrics))

    def on_test_epoch_end(self) -> None:
        if self.evaluator.parts:
            self.last_metrics = self.evaluate("test")
            about = f" | {self.test_description}" if self.test_description else ""
            split = self.split_name("test")
            plain = {k: v for k, v in self.last_metrics.items() if "/" not in k}
            self.print(f"test: {split}{about} | " + format_metrics(plain))
            for name in self.evaluator.rerank:  # beside the plain metrics, never instead
                mine = {
                    k.split("/", 1)[1]: v
                    for k, v in self.last_metrics.items()
                    if k.startswith(name + "/")
                }
                self.print(
                    f"test: {split}{about} | re-ranked: {name} "
                    f"({self.evaluator.rerank_settings(name)}) | " + format_metrics(mine)
                )
            if getattr(self, "per_class_path", None):
                self.print(f"test: {split} | per class: {self.per_class_path}")

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """Before any checkpoint is written: a non-finite loss since the last check stops the
        run (``nonfinite_loss: stop``), and so does a weight or buffer holding NaN or inf, so
        that no checkpoint ever holds a broken state."""
        self.check_losses()
        if self._trainer is not None:
            self.check_finite_state()
        checkpoint[EPOCH_METRICS_KEY] = {
            int(e): {k: float(v) for k, v in m.items()} for e, m in self.epoch_metrics.items()
        }

    # --- checkpoints of earlier layouts ----------------------------------------------------
    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        self.epoch_metrics = {
            int(e): dict(m) for e, m in (checkpoint.get(EPOCH_METRICS_KEY) or {}).items()
        }
        note = upgrade_checkpoint(checkpoint, self.state_dict())
        if note:
            rank_zero_warn(note)
