"""The LightningModule: backbone -> pooling -> embedding head -> metric loss (+ GSP's zero-shot
loss), with the validation hook that scores the evaluation split exactly (``dml.evaluation``).
Its configuration groups are the dataclasses of ``dml.config``.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, Dict, List, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn

from dml.config import (BackboneConfig, EvalConfig, IBCConfig, LossConfig,  # noqa: F401
                        OptimizerConfig, PoolingConfig, ZeroShotConfig, as_config)
from dml.errors import ConfigError, NonFiniteEmbeddingsError, NonFiniteLossError
from dml.evaluation import EmbeddingBuffer, gather_by_index, score
from dml.losses import (LOSSES, MultiProxyLoss, ZeroShotPrototypeLoss, build_loss, build_miner,
                        proxy_rows)
from dml.metrics import k_reciprocal_neighbors
from dml.models import GSP, Backbone, EmbeddingHead, IntraBatchConnections, build_pooling

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
              "radam": torch.optim.RAdam}


class DMLModule(pl.LightningModule):
    def __init__(self, backbone: BackboneConfig = BackboneConfig(),
                 pooling: PoolingConfig = PoolingConfig(), embedding_dim: int = 512,
                 loss: LossConfig = LossConfig(), optimizer: OptimizerConfig = OptimizerConfig(),
                 evaluation: EvalConfig = EvalConfig(),
                 zero_shot: ZeroShotConfig = ZeroShotConfig(), ibc: IBCConfig = IBCConfig(),
                 num_classes: Optional[int] = None, recall_ks: Optional[List[int]] = None,
                 nonfinite_loss: str = "stop"):
        """nonfinite_loss: what a NaN or infinite loss does: ``stop`` the run with an error
        naming the step, the loss parts and the learning rates (the default), or ``skip`` the
        step (no backward, no optimizer step) and go on."""
        super().__init__()
        if nonfinite_loss not in ("stop", "skip"):
            raise ConfigError(f"model.nonfinite_loss: expected stop or skip, got "
                              f"{nonfinite_loss!r}")
        self.nonfinite_loss = nonfinite_loss
        self.skipped_steps = 0
        backbone, pooling = as_config(BackboneConfig, backbone), as_config(PoolingConfig, pooling)
        loss = as_config(LossConfig, loss)
        optimizer, evaluation = as_config(OptimizerConfig, optimizer), as_config(EvalConfig, evaluation)
        zero_shot, ibc = as_config(ZeroShotConfig, zero_shot), as_config(IBCConfig, ibc)
        # Plain dicts, so that checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters({
            "backbone": asdict(backbone), "pooling": asdict(pooling),
            "embedding_dim": embedding_dim, "loss": asdict(loss),
            "optimizer": asdict(optimizer), "evaluation": asdict(evaluation),
            "zero_shot": asdict(zero_shot), "ibc": asdict(ibc),
            "num_classes": num_classes, "recall_ks": recall_ks, "nonfinite_loss": nonfinite_loss})
        self.optimizer_cfg, self.eval_cfg, self.loss_cfg = optimizer, evaluation, loss
        self.backbone = Backbone(backbone.name, backbone.pretrained, backbone.frozen_bn,
                                 backbone.width)
        self.pooling = build_pooling(pooling.name, self.backbone.out_channels, pooling.params,
                                     embedding_dim)
        self.head = EmbeddingHead(self.backbone.out_channels, embedding_dim)
        self.loss_fn = build_loss(loss.name, num_classes, embedding_dim, loss.params)
        if loss.proxies_per_class > 0:
            if self.loss_fn is None or LOSSES[loss.name][1]:
                raise ConfigError(f"model.loss.proxies_per_class: {loss.name} already has its "
                                  f"own proxies; multi-proxy CCP needs a pair loss (c1, c2, "
                                  f"multi_similarity, triplet, contrastive)")
            self.loss_fn = MultiProxyLoss(self.loss_fn, num_classes, loss.proxies_per_class,
                                          embedding_dim, loss.proxy_weight, loss.pair_weight,
                                          loss.normalize)
        self.miner = build_miner(loss.miner, loss.miner_params)
        if self.miner is not None and loss.name == "xbm_contrastive":
            raise ConfigError("model.loss.miner: xbm_contrastive sums over all pairs; it takes "
                              "no miner (set model.loss.miner: null)")
        self.zero_shot_cfg = zero_shot
        self.zero_shot_loss = None
        if zero_shot.weight > 0:
            if not isinstance(self.pooling, GSP):
                raise ConfigError("model.zero_shot.weight > 0 needs attribute vectors: set "
                                  "model.pooling.name: gsp")
            if num_classes is None:
                raise ConfigError("model.zero_shot needs the number of training classes")
            self.zero_shot_loss = ZeroShotPrototypeLoss(num_classes, embedding_dim,
                                                        zero_shot.lam, zero_shot.scale)
        self.ibc_cfg = ibc
        self.ibc = None
        if ibc.enabled:
            if num_classes is None or num_classes < 2:
                raise ConfigError("model.ibc needs the number of training classes")
            self.ibc = IntraBatchConnections(embedding_dim, num_classes, ibc.layers, ibc.heads,
                                             ibc.dropout, ibc.ff_hidden, ibc.concat, ibc.tau,
                                             ibc.label_smoothing, ibc.mpn_weight)
        if self.loss_fn is None and self.ibc is None and zero_shot.weight == 0:
            raise ConfigError("model.loss.name: none leaves nothing to train; enable model.ibc "
                              "or model.zero_shot, or name a loss")
        if optimizer.name not in OPTIMIZERS:
            raise ConfigError(f"model.optimizer.name: unknown optimizer {optimizer.name!r}; "
                              f"expected one of {sorted(OPTIMIZERS)}")
        if optimizer.scheduler not in ("none", "step", "cosine"):
            raise ConfigError(f"model.optimizer.scheduler: unknown scheduler "
                              f"{optimizer.scheduler!r}; expected none, step or cosine")
        self.recall_ks = recall_ks
        self._eval_buffer = EmbeddingBuffer()
        # Callbacks that add loss terms register here (name -> object with .losses()).
        self.loss_contributors: Dict[str, Any] = {}
        self.last_metrics: Dict[str, float] = {}
        self.keep_eval_sets = False  # rank 0 keeps the last scored (embeddings, labels, indices)
        self.last_eval_sets: Dict[str, tuple] = {}
        self.initial_metrics: Dict[str, float] = {}

    # --- forward ----------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> Dict[str, Any]:
        """Everything the losses and dashboards need: embeddings and the pooling's outputs."""
        features = self.backbone(images)
        pooled = self.pooling(features, projection=self.head.linear)
        raw, embeddings = self.head(pooled.pooled)
        return {"embeddings": embeddings, "raw_embeddings": raw, "pooling": pooled}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings (B, D): what retrieval uses."""
        return self.embed(images)["embeddings"]

    # --- training ---------------------------------------------------------------------
    def compute_losses(self, out: Dict[str, Any], labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Named loss components; their sum is optimised. Methods add components here."""
        z, raw, local_labels = out["embeddings"], out["raw_embeddings"], labels
        if self.loss_cfg.gather and self.world_size > 1:  # the global batch, see LossConfig
            z, raw, labels = self.gather_batch(z, raw, labels)
        pairs = self.miner(z, labels) if self.miner is not None else None
        weight = self.zero_shot_cfg.metric_weight
        parts: Dict[str, torch.Tensor] = {}
        if isinstance(self.loss_fn, MultiProxyLoss):  # proxy and in-batch terms, raw inputs
            parts = {name: weight * value for name, value in
                     self.loss_fn.parts(raw, labels, pairs).items()}
        elif self.loss_fn is not None:
            parts = {"metric": weight * self.loss_fn(z, labels, pairs)}
        if self.ibc is not None:
            parts.update(self.ibc_losses(out, local_labels))
        if self.zero_shot_loss is not None:
            parts["zero_shot"] = self.zero_shot_cfg.weight * self.zero_shot_loss(
                out["pooling"].attributes, local_labels)
        for contributor in self.loss_contributors.values():  # e.g. the cross-batch memory
            parts.update(contributor.losses(self, out, local_labels))
        return parts

    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def gather_batch(self, *tensors: torch.Tensor):
        """The global batch in rank order; gradients of the gathered rows flow back to the
        process that computed them (their sum over processes)."""
        return tuple(self.all_gather(t, sync_grads=t.requires_grad).reshape(-1, *t.shape[1:])
                     for t in tensors)

    def ibc_losses(self, out: Dict[str, Any], labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """IBC's two cross-entropies. Under DDP messages pass over the local batch, or with
        ``model.ibc.gather`` over the global one: then every process computes the same MPN loss
        on the whole batch, so the averaged gradient equals one process's."""
        z, raw = out["embeddings"], out["raw_embeddings"]
        if not (self.ibc_cfg.gather and self.world_size > 1):
            return self.ibc(raw, z, labels)
        z_all, labels_all = self.gather_batch(z, labels)
        return self.ibc(raw, z_all, labels_all, labels)

    # --- GSP prototypes ---------------------------------------------------------------
    def on_train_start(self) -> None:
        if self._trainer is not None and self.trainer.ckpt_path:
            self.apply_changed_optimizer_settings()
        if isinstance(self.pooling, GSP) and not bool(self.pooling.initialized):
            candidates = self.gsp_candidates()
            if self.trainer.is_global_zero:
                self.pooling.initialize_prototypes(candidates)
            # every rank starts from rank 0's prototypes
            prototypes = self.trainer.strategy.broadcast(self.pooling.prototypes.data, src=0)
            self.pooling.prototypes.data.copy_(prototypes)
            self.pooling.initialized.fill_(True)

    @torch.no_grad()
    def gsp_candidates(self) -> torch.Tensor:
        """Candidate prototypes: the loss's proxy rows, or GAP embeddings of training batches."""
        gsp: GSP = self.pooling
        rows = proxy_rows(self.loss_fn)
        use_proxies = gsp.init == "proxies" or (
            gsp.init == "auto" and rows is not None and len(rows) >= len(gsp.prototypes))
        if use_proxies:
            if rows is None:
                raise ConfigError("model.pooling.params.init: proxies, but the loss "
                                  f"{type(self.loss_fn).__name__} has no proxies")
            return rows
        was_training = self.training
        self.eval()
        loader = self.trainer.datamodule.train_dataloader()
        embeddings = []
        for i, (images, _, _) in enumerate(loader):
            if i >= gsp.init_batches:
                break
            features = self.backbone(images.to(self.device))
            embeddings.append(self.head.linear(features.mean(dim=(2, 3))))
        self.train(was_training)
        return torch.cat(embeddings)

    def training_step(self, batch, batch_idx):
        images, labels, _ = batch
        parts = self.compute_losses(self.embed(images), labels)
        total = sum(parts.values())
        batch_size = len(labels)
        if not self.loss_is_finite(total):
            return self.on_nonfinite_loss(parts, batch_idx)
        for name, value in parts.items():
            self.log(f"train/loss_{name}", value.detach(), batch_size=batch_size)
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=batch_size)
        return total

    def loss_is_finite(self, total: torch.Tensor) -> bool:
        """Whether every process's loss is finite (one agreement under DDP, so that all stop or
        skip together)."""
        finite = bool(torch.isfinite(total.detach()).all())
        if self.world_size > 1:
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        return finite

    def on_nonfinite_loss(self, parts: Dict[str, torch.Tensor], batch_idx: int):
        """Stop with one line naming the step, epoch, the non-finite parts and the learning
        rates; or, with ``nonfinite_loss: skip``, skip the step (returning None)."""
        bad = {name: float(value.detach()) for name, value in parts.items()
               if not bool(torch.isfinite(value.detach()).all())}
        where = (f"step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx})")
        if self.nonfinite_loss == "skip":
            self.skipped_steps += 1
            self.log("train/skipped_steps", float(self.skipped_steps), batch_size=1)
            rank_zero_warn(f"non-finite loss at {where}: {bad or 'on another process'}; step "
                           f"skipped ({self.skipped_steps} so far)")
            return None
        lrs = describe_learning_rates(self.trainer)
        parts_text = ", ".join(f"loss_{k} = {v}" for k, v in bad.items()) or \
            "on another process"
        raise NonFiniteLossError(
            f"non-finite loss at {where}: {parts_text}; learning rates: {lrs}. Training "
            f"stopped; the checkpoints written so far are untouched. Lower the learning rate, "
            f"or set model.nonfinite_loss: skip to drop such steps.")

    def configured_learning_rates(self) -> Dict[str, float]:
        """The initial learning rate of each parameter group, from ``model.optimizer``."""
        cfg = self.optimizer_cfg
        return {"backbone": cfg.lr * cfg.backbone_lr_mult, "head": cfg.lr,
                "loss": cfg.loss_lr if cfg.loss_lr is not None else cfg.lr}

    def apply_changed_optimizer_settings(self) -> None:
        """On resume, learning rates and weight decay come back from the checkpoint. Where the
        config now asks for others (allowed with --resume_changes), apply them: each group's
        schedule goes on from where it was, scaled to the new initial rate."""
        wanted = self.configured_learning_rates()
        changes = []
        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                name = group.get("name")
                initial = group.get("initial_lr", group["lr"])
                if name in wanted and wanted[name] != initial:
                    group["lr"] = group["lr"] * wanted[name] / initial if initial else wanted[name]
                    if "initial_lr" in group:
                        group["initial_lr"] = wanted[name]
                    changes.append(f"{name} lr {initial:g} -> {wanted[name]:g}")
                if group.get("weight_decay") != self.optimizer_cfg.weight_decay:
                    changes.append(f"{name} weight decay {group.get('weight_decay'):g} -> "
                                   f"{self.optimizer_cfg.weight_decay:g}")
                    group["weight_decay"] = self.optimizer_cfg.weight_decay
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if hasattr(scheduler, "base_lrs"):
                scheduler.base_lrs = [g.get("initial_lr", g["lr"])
                                      for g in scheduler.optimizer.param_groups]
        if changes:
            self.print("resume: optimizer settings from the config, not the checkpoint: "
                       + "; ".join(changes))

    def configure_optimizers(self):
        cfg = self.optimizer_cfg
        lrs = self.configured_learning_rates()
        groups = [
            {"params": [p for p in self.backbone.parameters() if p.requires_grad],
             "lr": lrs["backbone"], "name": "backbone"},
            {"params": [p for m in (self.pooling, self.head, self.ibc) if m is not None
                        for p in m.parameters() if p.requires_grad], "lr": lrs["head"],
             "name": "head"},
            # every loss term's own parameters: proxies, GSP's zero-shot class embeddings
            {"params": [p for m in (self.loss_fn, self.zero_shot_loss) if m is not None
                        for p in m.parameters() if p.requires_grad], "lr": lrs["loss"],
             "name": "loss"},
        ]
        groups = [g for g in groups if g["params"]]
        kwargs = {"weight_decay": cfg.weight_decay}
        if cfg.name == "sgd":
            kwargs["momentum"] = 0.9
        optimizer = OPTIMIZERS[cfg.name](groups, lr=cfg.lr, **kwargs)
        if cfg.scheduler == "none":
            return optimizer
        if cfg.scheduler == "step":
            sched = torch.optim.lr_scheduler.MultiStepLR(optimizer, cfg.milestones, cfg.gamma)
        else:
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(
                optimizer, T_max=max(1, self.trainer.max_epochs or 1))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    # --- evaluation -------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._eval_buffer.clear()

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        images, labels, indices = batch
        with torch.autocast(self.device.type, enabled=False):  # evaluation is float32
            z = self(images.float())
        self._eval_buffer.add(dataloader_idx, z.float(), labels, indices)

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self.validation_step(batch, batch_idx, dataloader_idx)

    def on_test_epoch_start(self) -> None:
        self._eval_buffer.clear()

    def _evaluate(self, prefix: str) -> Dict[str, float]:
        dm = self.trainer.datamodule
        datasets = dm.eval_sets(prefix)
        protocol = dm.protocol(datasets)
        sets = {}
        for i, name in enumerate(dm.loader_names(datasets)):
            emb, lab, idx = self._eval_buffer.concatenated(i)
            sets[name] = gather_by_index(emb, lab, idx, self.all_gather, self.trainer.world_size)
        # every rank holds the same gathered sets, so every rank raises the same error
        self.check_finite_embeddings(sets, prefix)
        metrics: Dict[str, float] = {}
        error = None
        cfg = self.eval_cfg
        if self.trainer.is_global_zero:
            try:
                if self.ibc is not None and self.ibc_cfg.pseudo_test:
                    sets = self.pseudo_test_embeddings(sets)
                if self.keep_eval_sets:  # for dashboards (DashboardFigures) and notebooks
                    self.last_eval_sets = {k: tuple(t.cpu() for t in v) for k, v in sets.items()}
                ks = self.recall_ks or dm.recall_ks
                metrics = score(protocol, sets, ks, cfg.nmi, cfg.nmi_seed, cfg.backend,
                                self.device)
            except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
                if self.trainer.world_size == 1:
                    raise
                error = f"{type(exc).__name__}: {exc}"
        if self.trainer.world_size > 1:  # scoring ran on rank 0: all ranks learn its outcome
            metrics, error = self.trainer.strategy.broadcast((metrics, error), src=0)
        if error is not None:
            raise RuntimeError(f"{prefix} evaluation failed on rank 0: {error}")
        self._eval_buffer.clear()
        if not self.trainer.sanity_checking:
            for name, value in metrics.items():
                # identical on every rank (broadcast): sync_dist averages equal values
                self.log(f"{prefix}/{name}", float(value), prog_bar=name == "R@1", sync_dist=True)
        return metrics

    def check_finite_embeddings(self, sets: Dict[str, tuple], prefix: str) -> None:
        """A NonFiniteEmbeddingsError naming the split, epoch and number of bad rows."""
        for name, (emb, *_) in sets.items():
            bad = int((~torch.isfinite(emb).all(1)).sum())
            if bad:
                when = "before training" if self.trainer.sanity_checking else \
                    f"after epoch {self.current_epoch} (step {self.global_step})"
                raise NonFiniteEmbeddingsError(
                    f"{prefix} evaluation {when}: {bad} of {len(emb)} {name} embeddings are "
                    f"not finite (NaN or inf); the model has diverged, no metric is reported")

    def pseudo_test_embeddings(self, sets: Dict[str, tuple]) -> Dict[str, tuple]:
        """IBC's pseudo-test mode: every embedding replaced by its MPN output over itself and its
        k-reciprocal neighbours (queries' neighbours taken from the gallery)."""
        k, backend = self.ibc_cfg.pseudo_test_k, "torch" if self.device.type != "cpu" else "auto"
        was_training = self.ibc.training
        self.ibc.eval()
        refined = {}
        reference = sets["test" if "test" in sets else "gallery"][0].to(self.device)
        for name, (emb, *rest) in sets.items():
            emb = emb.to(self.device)
            if name in ("test", "gallery"):
                idx, mask = k_reciprocal_neighbors(emb, k, backend=backend)
                new = self.ibc.refine(emb, idx.to(self.device), mask.to(self.device))
            else:
                idx, mask = k_reciprocal_neighbors(emb, k, reference, backend=backend)
                new = self.ibc.refine(emb, idx.to(self.device), mask.to(self.device), reference)
            refined[name] = (new, *rest)
        self.ibc.train(was_training)
        return refined

    def on_validation_epoch_end(self) -> None:
        if not self._eval_buffer.parts:
            return
        metrics = self._evaluate("val")
        if self.trainer.sanity_checking:
            self.initial_metrics = metrics
            label = "resumed model" if self.trainer.ckpt_path else "untrained model"
            self.print(f"{label} | " + format_metrics(metrics))
        else:
            self.last_metrics = metrics
            self.print(f"epoch {self.current_epoch:3d} | " + format_metrics(metrics))

    def on_test_epoch_end(self) -> None:
        if self._eval_buffer.parts:
            self.last_metrics = self._evaluate("test")
            self.print("test | " + format_metrics(self.last_metrics))


def describe_learning_rates(trainer) -> str:
    """``backbone 0.001, head 0.001``: each parameter group's current learning rate."""
    return ", ".join(f"{g.get('name', i)} {g['lr']:g}" for opt in trainer.optimizers
                     for i, g in enumerate(opt.param_groups))


def format_metrics(metrics: Dict[str, float]) -> str:
    return "  ".join(f"{k} {100 * v:5.1f}" for k, v in metrics.items())
