"""The LightningModule: image -> backbone -> pooling -> head -> objective, and the evaluator.

The module is handed its parts by ``dml.builder`` (every check that spans parts is there) and
does three things with them:
- training step: embed -> objective (every loss term, ``dml.objective``) -> log -> the sum;
  a non-finite loss stops the run naming the step (or, with ``nonfinite_loss: skip``, skips it);
- optimizer: one parameter group per part role (backbone, head, and the objective's own:
  "loss" for proxies and class embeddings), each trainable parameter in exactly one;
- evaluation: embeddings to the ``Evaluator`` (``dml.evaluation``), scored exactly on rank 0.
Its configuration groups are the dataclasses of ``dml.config``.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn

from dml.builder import build_parts, check_batch_composition
from dml.config import (AT_LEAST_ONE, BackboneConfig, EvalConfig, IBCConfig,  # noqa: F401
                        LossConfig, MemoryConfig, OptimizerConfig, PoolingConfig, ZeroShotConfig,
                        as_config, check_range, check_ranges)
from dml.errors import ConfigError, NonFiniteEmbeddingsError, NonFiniteLossError
from dml.evaluation import EvalSets, Evaluator
from dml.loss_watch import LossWatch
from dml.lr_schedule import build_schedule
from dml.losses.ibc import pseudo_test_refiner
from dml.models import pool_images

EPOCH_METRICS_KEY = "dml_epoch_metrics"  # {epoch: validation metrics} in checkpoints
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
              "radam": torch.optim.RAdam}


class DMLModule(pl.LightningModule):
    def __init__(self, backbone: BackboneConfig = BackboneConfig(),
                 pooling: PoolingConfig = PoolingConfig(), embedding_dim: int = 512,
                 loss: LossConfig = LossConfig(), optimizer: OptimizerConfig = OptimizerConfig(),
                 evaluation: EvalConfig = EvalConfig(),
                 zero_shot: ZeroShotConfig = ZeroShotConfig(), ibc: IBCConfig = IBCConfig(),
                 memory: MemoryConfig = MemoryConfig(), num_classes: Optional[int] = None,
                 recall_ks: Optional[List[int]] = None, nonfinite_loss: str = "stop",
                 terms: Optional[List[Dict[str, Any]]] = None, compile: Union[bool, str] = False):
        """nonfinite_loss: what a NaN or infinite loss does: ``stop`` the run with an error
        naming the step, the loss parts and the learning rates (the default), or ``skip`` the
        step (no backward, no optimizer step) and go on. terms: extra objective terms by class
        path, ``[{class_path: package.module.Class, init_args: {...}}]``
        (``dml.builder.build_terms``). compile: ``torch.compile`` the backbone for training and
        evaluation (``true``, or a mode: "default", "reduce-overhead", "max-autotune"); the
        weights, their names and the checkpoints stay the plain module's."""
        super().__init__()
        backbone, pooling = as_config(BackboneConfig, backbone), as_config(PoolingConfig, pooling)
        loss, memory = as_config(LossConfig, loss), as_config(MemoryConfig, memory)
        optimizer = as_config(OptimizerConfig, optimizer)
        evaluation = as_config(EvalConfig, evaluation)
        zero_shot, ibc = as_config(ZeroShotConfig, zero_shot), as_config(IBCConfig, ibc)
        for key, group in (("backbone", backbone), ("loss", loss), ("memory", memory),
                           ("optimizer", optimizer), ("zero_shot", zero_shot), ("ibc", ibc)):
            check_ranges(f"model.{key}", group)
        check_range("model.embedding_dim", embedding_dim, AT_LEAST_ONE)
        if nonfinite_loss not in ("stop", "skip"):
            raise ConfigError(f"model.nonfinite_loss: expected stop or skip, got "
                              f"{nonfinite_loss!r}")
        if compile not in (False, True, "default", "reduce-overhead", "max-autotune",
                           "max-autotune-no-cudagraphs"):
            raise ConfigError(f"model.compile: expected true, false or a torch.compile mode "
                              f"(default, reduce-overhead, max-autotune), got {compile!r}")
        if optimizer.name not in OPTIMIZERS:
            raise ConfigError(f"model.optimizer.name: unknown optimizer {optimizer.name!r}; "
                              f"expected one of {sorted(OPTIMIZERS)}")
        if optimizer.scheduler not in ("none", "step", "cosine"):
            raise ConfigError(f"model.optimizer.scheduler: unknown scheduler "
                              f"{optimizer.scheduler!r}; expected none, step or cosine")
        # Plain dicts, so that checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters({
            "backbone": asdict(backbone), "pooling": asdict(pooling),
            "embedding_dim": embedding_dim, "loss": asdict(loss),
            "optimizer": asdict(optimizer), "evaluation": asdict(evaluation),
            "zero_shot": asdict(zero_shot), "ibc": asdict(ibc), "memory": asdict(memory),
            "num_classes": num_classes, "recall_ks": recall_ks, "nonfinite_loss": nonfinite_loss,
            "terms": terms, "compile": compile})
        self.optimizer_cfg, self.recall_ks = optimizer, recall_ks
        self.nonfinite_loss, self.skipped_steps = nonfinite_loss, 0

        parts = build_parts(backbone, pooling, embedding_dim, loss, zero_shot, ibc, memory,
                            num_classes, terms)
        self.backbone, self.pooling, self.head = parts.backbone, parts.pooling, parts.head
        self.channels_last_setting = backbone.channels_last
        self.compile_setting = compile
        # the compiled backbone is kept outside the module tree: its weights are the backbone's
        self.__dict__["compiled_backbone"] = None
        self.objective = parts.objective
        if self.objective.proximal is not None:
            self.objective.proximal.attach(self.network_parameters)
        refine = None
        if self.objective.ibc is not None and ibc.pseudo_test:
            refine = pseudo_test_refiner(self.objective.ibc, ibc.pseudo_test_k)
        self.evaluator = Evaluator(evaluation.nmi, evaluation.nmi_seed, evaluation.backend,
                                   refine)
        self.last_metrics: Dict[str, float] = {}
        self.initial_metrics: Dict[str, float] = {}
        # validation metrics of every epoch of the run (kept in checkpoints): the run's summary
        self.epoch_metrics: Dict[int, Dict[str, float]] = {}

    # --- forward ----------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> Dict[str, Any]:
        """Everything the objective and dashboards need: "embeddings" (L2-normalised),
        "raw_embeddings" (the head's output) and "pooling" (``PoolingOutput``)."""
        if self.uses_channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        backbone = self.backbone if self.compiled_backbone is None else self.compiled_backbone
        _, pooled = pool_images(backbone, self.pooling, images, projection=self.head.linear)
        raw, embeddings = self.head(pooled.pooled)
        return {"embeddings": embeddings, "raw_embeddings": raw, "pooling": pooled}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings (B, D): what retrieval uses."""
        return self.embed(images)["embeddings"]

    def network_parameters(self) -> Iterator[Tuple[str, torch.nn.Parameter]]:
        """The network's trainable weights: every trainable parameter outside the objective
        (backbone, pooling, head, and any part added later)."""
        return ((name, p) for name, p in self.named_parameters()
                if p.requires_grad and not name.startswith("objective."))

    # --- device-dependent settings: memory format and compilation --------------------------
    @property
    def uses_channels_last(self) -> bool:
        return bool(getattr(self, "channels_last_active", False))

    def setup(self, stage: str) -> None:
        """The device the trainer runs on decides channels-last (``BackboneConfig``);
        compilation follows ``model.compile``. Lightning calls this before it moves the module
        to that device and wraps it for DDP (``.to(device)`` keeps the memory format)."""
        self.apply_device_settings(self.trainer.strategy.root_device)
        dm = getattr(self.trainer, "datamodule", None)
        if stage == "fit" and hasattr(dm, "samples_per_class"):
            h = self.hparams
            check_batch_composition(as_config(LossConfig, h["loss"]),
                                    as_config(MemoryConfig, h["memory"]),
                                    as_config(IBCConfig, h["ibc"]), h["zero_shot"]["weight"],
                                    bool(h["terms"]), dm.classes_per_batch,
                                    dm.samples_per_class)

    def apply_device_settings(self, device: torch.device) -> None:
        wanted = self.channels_last_setting
        if wanted is None:
            wanted = device.type == "cuda"
        self.channels_last_active = bool(wanted) and self.backbone.convolutional
        if self.channels_last_active:
            self.backbone.to(memory_format=torch.channels_last)
        if self.compile_setting and self.compiled_backbone is None:
            mode = None if self.compile_setting is True else self.compile_setting
            self.__dict__["compiled_backbone"] = torch.compile(self.backbone, mode=mode)

    # --- training ---------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        images, labels, _ = batch
        terms = self.objective(self.embed(images), labels)
        total = sum(terms.values())
        if self.nonfinite_loss == "skip":  # must know before this step's update: reads now
            if not self.loss_is_finite(total):
                return self.on_nonfinite_loss(terms, batch_idx)
        else:  # stop: recorded on the device, read every loss_watch.every steps
            self.loss_watch.record(total, terms, self.global_step, self.current_epoch, batch_idx)
            if self.loss_watch.due():
                self.check_losses()
        if self.logs_this_step():
            batch_size = len(labels)
            for name, value in terms.items():
                self.log(f"train/loss_{name}", value.detach(), batch_size=batch_size)
            self.log("train/loss", total.detach(), prog_bar=True, batch_size=batch_size)
        return total

    def logs_this_step(self) -> bool:
        """Whether Lightning writes this step's logged values to the loggers (every
        ``trainer.log_every_n_steps`` steps). The training losses are logged on those steps
        only: each ``self.log`` costs about 1 ms of host time per key (Lightning moves its
        result's state every call), which on other steps would be thrown away."""
        if self._trainer is None:
            return True
        try:
            return bool(self.trainer._logger_connector.should_update_logs
                        or self.trainer.fast_dev_run)
        except AttributeError:  # another Lightning: log every step
            return True

    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def loss_is_finite(self, total: torch.Tensor) -> bool:
        """Whether every process's loss is finite (one agreement under DDP, so that all stop or
        skip together)."""
        finite = bool(torch.isfinite(total.detach()).all())
        if self.world_size > 1:
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        return finite

    @property
    def loss_watch(self) -> LossWatch:
        if "_loss_watch" not in self.__dict__:
            self.__dict__["_loss_watch"] = LossWatch()
        return self.__dict__["_loss_watch"]

    def check_losses(self) -> None:
        """``nonfinite_loss: stop``: raise for the first non-finite loss since the last check
        (``dml.loss_watch``: the losses are read on the host every 50 steps and before every
        validation, checkpoint and the end of training, not once per step)."""
        if self._trainer is None:
            return
        found = self.loss_watch.read()
        finite = found is None
        if self.world_size > 1:
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            return
        step, epoch, batch_idx, terms = found if found else (self.global_step,
                                                             self.current_epoch, -1, {})
        self.on_nonfinite_loss({k: torch.tensor(v) for k, v in terms.items()}, batch_idx,
                               step, epoch)

    def on_train_epoch_end(self) -> None:
        self.check_losses()

    def on_train_end(self) -> None:
        self.check_losses()

    def on_validation_start(self) -> None:
        self.check_losses()

    def on_nonfinite_loss(self, terms: Dict[str, torch.Tensor], batch_idx: int,
                          step: Optional[int] = None, epoch: Optional[int] = None):
        """Stop with one line naming the step, epoch, the non-finite terms and the learning
        rates; or, with ``nonfinite_loss: skip``, skip the step (returning None)."""
        bad = {name: float(value.detach()) for name, value in terms.items()
               if not bool(torch.isfinite(value.detach()).all())}
        step = self.global_step if step is None else step
        epoch = self.current_epoch if epoch is None else epoch
        where = f"step {step} (epoch {epoch}, batch {batch_idx})" if batch_idx >= 0 else \
            f"step {step} (epoch {epoch})"
        if self.nonfinite_loss == "skip":
            self.skipped_steps += 1
            self.log("train/skipped_steps", float(self.skipped_steps), batch_size=1)
            rank_zero_warn(f"non-finite loss at {where}: {bad or 'on another process'}; step "
                           f"skipped ({self.skipped_steps} so far)")
            return None
        terms_text = ", ".join(f"loss_{k} = {v}" for k, v in bad.items()) or \
            "on another process"
        raise NonFiniteLossError(
            f"non-finite loss at {where}: {terms_text}; learning rates: "
            f"{describe_learning_rates(self.trainer)}. Training stopped; the checkpoints "
            f"written so far are untouched. Lower the learning rate, or set "
            f"model.nonfinite_loss: skip to drop such steps.")

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

    def initialize_pooling(self) -> None:
        """A pooling that asks for it (GSP's prototypes) is initialised on rank 0 from the
        candidates it wants, and its state broadcast. Runs at the first training step, after
        every ``on_train_start`` hook (CCP's proxies are picked by then)."""
        rows = self.objective.class_representatives()
        source = self.pooling.candidate_source(None if rows is None else len(rows))
        candidates = rows if source == "class_rows" else \
            self.gap_embeddings(self.pooling.init_batches)
        if self.trainer.is_global_zero:
            self.pooling.initialize(candidates)
        for tensor in self.pooling.state_dict().values():  # every rank: rank 0's state
            tensor.copy_(self.trainer.strategy.broadcast(tensor, src=0))

    @torch.no_grad()
    def gap_embeddings(self, batches: int) -> torch.Tensor:
        """The head's projection of GAP features of ``batches`` training batches (eval mode)."""
        was_training = self.training
        self.eval()
        embeddings = []
        dm = self.trainer.datamodule
        for i, batch in enumerate(dm.train_dataloader()):
            if i >= batches:
                break
            features = self.backbone(dm.device_batch(batch, self.device)[0])
            embeddings.append(self.head.linear(features.mean(dim=(2, 3))))
        self.train(was_training)
        return torch.cat(embeddings)

    # --- optimizer ----------------------------------------------------------------------
    def configured_learning_rates(self) -> Dict[str, float]:
        """The initial learning rate of each parameter group, from ``model.optimizer``."""
        cfg = self.optimizer_cfg
        rates = {"backbone": cfg.lr * cfg.backbone_lr_mult, "head": cfg.lr,
                 "loss": cfg.loss_lr if cfg.loss_lr is not None else cfg.lr}
        if cfg.layer_decay is not None:  # backbone.0 .. backbone.{L-1}, the last at full rate
            _, count = self.backbone.layer_ids()
            for layer in range(count):
                rates[f"backbone.{layer}"] = rates["backbone"] * \
                    cfg.layer_decay ** (count - 1 - layer)
        return rates

    def parameter_groups(self) -> Dict[str, List[torch.nn.Parameter]]:
        """Trainable parameters by group: the backbone's, the other network parts' ("head"), and
        the objective's terms' own (``Objective.parameter_groups``). Every trainable parameter
        is in exactly one, or this is an error naming the ones that are not."""
        groups: Dict[str, List[torch.nn.Parameter]] = {}
        for name, part in self.named_children():
            if name == "objective":
                for group, params in self.objective.parameter_groups().items():
                    groups.setdefault(group, []).extend(params)
                continue
            if name == "backbone" and self.optimizer_cfg.layer_decay is not None:
                layers, _ = part.layer_ids()
                for pname, p in part.named_parameters():
                    if p.requires_grad:
                        groups.setdefault(f"backbone.{layers[pname]}", []).append(p)
                continue
            params = [p for p in part.parameters() if p.requires_grad]
            if params:
                groups.setdefault("backbone" if name == "backbone" else "head", []).extend(params)
        owners: Dict[int, int] = {}
        for params in groups.values():
            for p in params:
                owners[id(p)] = owners.get(id(p), 0) + 1
        wrong = [n for n, p in self.named_parameters() if p.requires_grad and owners.get(id(p)) != 1]
        if wrong:
            raise RuntimeError(f"parameters in no optimizer group or in several: {wrong[:10]}")
        return groups

    def configure_optimizers(self):
        cfg = self.optimizer_cfg
        lrs = self.configured_learning_rates()
        groups = self.parameter_groups()
        unknown = sorted(set(groups) - set(lrs))
        if unknown:
            raise RuntimeError(f"parameter group(s) {unknown} have no learning rate; the groups "
                               f"are {sorted(lrs)}")
        groups = [{"params": params, "lr": lrs[name], "name": name}
                  for name, params in groups.items()]
        kwargs = {"weight_decay": cfg.weight_decay}
        if cfg.name == "sgd":
            kwargs["momentum"] = 0.9
        optimizer = OPTIMIZERS[cfg.name](groups, lr=cfg.lr, **kwargs)
        if cfg.scheduler == "none" and cfg.warmup_epochs == 0:
            return optimizer
        # per optimizer step, sized from the steps this trainer will take (dml.lr_schedule);
        # a function, not the object: LambdaLR then saves only the step count, and a resumed
        # run follows its own config (more epochs stretch the decay)
        factor = build_schedule(cfg, self.trainer)
        sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

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
            if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                # the schedule is rebuilt from the config (dml.lr_schedule) and set to the
                # optimizer step the run resumes at (also where the checkpoint counted epochs:
                # the epoch-wise schedulers before it); the rate is that step's, not the one
                # saved with the optimizer
                scheduler.last_epoch = self.trainer.global_step
                for group, base, factor in zip(scheduler.optimizer.param_groups,
                                               scheduler.base_lrs, scheduler.lr_lambdas):
                    group["lr"] = base * factor(scheduler.last_epoch)
        if changes:
            self.print("resume: optimizer settings from the config, not the checkpoint: "
                       + "; ".join(changes))

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

    def _evaluate(self, stage: str) -> Dict[str, float]:
        dm = self.trainer.datamodule
        names = dm.loader_names(dm.eval_sets(stage))
        sets = self.evaluator.collect(names, self.all_gather, self.trainer.world_size)
        # every rank holds the same gathered sets, so every rank raises the same error
        self.check_finite_embeddings(sets, stage)
        metrics: Dict[str, float] = {}
        error = None
        if self.trainer.is_global_zero:
            try:
                metrics = self.evaluator.score(sets, self.recall_ks or dm.recall_ks, self.device)
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

    def check_finite_embeddings(self, sets: EvalSets, stage: str) -> None:
        """A NonFiniteEmbeddingsError naming the split, epoch and number of bad rows."""
        for s in sets.sets:
            bad = int((~torch.isfinite(s.embeddings).all(1)).sum())
            if bad:
                when = "before training" if self.trainer.sanity_checking else \
                    f"after epoch {self.current_epoch} (step {self.global_step})"
                raise NonFiniteEmbeddingsError(
                    f"{stage} evaluation {when}: {bad} of {len(s.embeddings)} {s.name} "
                    f"embeddings are not finite (NaN or inf); the model has diverged, no metric "
                    f"is reported")

    def on_validation_epoch_end(self) -> None:
        if not self.evaluator.parts:
            return
        metrics = self._evaluate("val")
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
            self.last_metrics = self._evaluate("test")
            self.print(f"test: {self.split_name('test')} | " + format_metrics(self.last_metrics))

    def split_name(self, stage: str) -> str:
        """What a stage's metrics measure: "test split", "MLRC fold 0", ..."""
        dm = self.trainer.datamodule
        return dm.split_name(stage) if hasattr(dm, "split_name") else stage

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint[EPOCH_METRICS_KEY] = {int(e): {k: float(v) for k, v in m.items()}
                                         for e, m in self.epoch_metrics.items()}

    # --- checkpoints of the earlier layout -----------------------------------------------
    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        self.epoch_metrics = {int(e): dict(m) for e, m in
                              (checkpoint.get(EPOCH_METRICS_KEY) or {}).items()}
        for i, state in enumerate(checkpoint.get("lr_schedulers") or []):
            if "lr_lambdas" not in state:  # an epoch-wise scheduler (cosine, step) of old
                checkpoint["lr_schedulers"][i] = {
                    "last_epoch": state.get("last_epoch", 0), "base_lrs": state["base_lrs"],
                    "lr_lambdas": [None] * len(state["base_lrs"])}
        if migrate_checkpoint(checkpoint):
            state = checkpoint["state_dict"]
            fresh = [k for k in self.state_dict() if k not in state and
                     k.startswith(("objective.proximal.", "objective.memory."))]
            for key in fresh:  # state the earlier layout kept in callbacks: starts afresh
                state[key] = self.state_dict()[key]
            rank_zero_warn("checkpoint of the layout before the objective: weights renamed "
                           "(loss_fn -> objective.metric, ...)" +
                           (f"; {len(fresh)} memory / proximal buffers start afresh"
                            if fresh else ""))


# Parameter names before the objective (loss terms as module attributes) -> now.
LEGACY_PREFIXES = {"loss_fn.": "objective.metric.", "zero_shot_loss.": "objective.zero_shot.",
                   "ibc.": "objective.ibc."}


def migrate_checkpoint(checkpoint: Dict[str, Any]) -> bool:
    """Checkpoints written before the objective existed: their weights are renamed in place, so
    that they load; the XBM/XBN memory and CCP's theta_prev, then callback state, are not
    carried over, and resuming training from them is refused by the CLI's config check.
    Returns whether anything was renamed."""
    state = checkpoint.get("state_dict", {})
    legacy = [k for k in state if k.startswith(tuple(LEGACY_PREFIXES))]
    for key in legacy:
        prefix = next(p for p in LEGACY_PREFIXES if key.startswith(p))
        state[LEGACY_PREFIXES[prefix] + key[len(prefix):]] = state.pop(key)
    return bool(legacy)


def describe_learning_rates(trainer) -> str:
    """``backbone 0.001, head 0.001``: each parameter group's current learning rate."""
    return ", ".join(f"{g.get('name', i)} {g['lr']:g}" for opt in trainer.optimizers
                     for i, g in enumerate(opt.param_groups))


def format_metrics(metrics: Dict[str, float]) -> str:
    return "  ".join(f"{k} {100 * v:5.1f}" for k, v in metrics.items())
