"""The optimizer of the training module: one parameter group per part role, each trainable
parameter in exactly one, learning rates from ``model.optimizer``, a per-step schedule
(``dml.lr_schedule``), and on resume the config's rates applied where they changed.

Groups: ``backbone`` (lr x backbone_lr_mult; with layer_decay one group per layer,
``backbone.<l>``, at lr x backbone_lr_mult x layer_decay^(L - 1 - l)), ``head`` (pooling, head,
any other network part) and the objective's own (``Objective.parameter_groups``: "loss" for
proxies and class embeddings, at loss_lr). ``OptimizerSetup`` is a part of ``DMLModule`` (a
mixin); ``configure_optimizers`` stays in ``dml/module.py``.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from dml.errors import ConfigError
from dml.lr_schedule import build_schedule

OPTIMIZERS = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "radam": torch.optim.RAdam,
}


SCHEDULERS = ("none", "step", "cosine")


def check_optimizer(optimizer) -> None:
    """A ConfigError for an optimizer or schedule ``model.optimizer`` names that does not exist."""
    if optimizer.name not in OPTIMIZERS:
        raise ConfigError(
            f"model.optimizer.name: unknown optimizer {optimizer.name!r}; "
            f"expected one of {sorted(OPTIMIZERS)}"
        )
    if optimizer.scheduler not in SCHEDULERS:
        raise ConfigError(
            f"model.optimizer.scheduler: unknown scheduler "
            f"{optimizer.scheduler!r}; expected none, step or cosine"
        )


class OptimizerSetup:
    """Expects the LightningModule's ``trainer``, ``backbone``, ``objective`` and
    ``optimizer_cfg`` (``dml.config.OptimizerConfig``)."""

    def configured_learning_rates(self) -> Dict[str, float]:
        """The initial learning rate of each parameter group, from ``model.optimizer``."""
        cfg = self.optimizer_cfg
        rates = {
            "backbone": cfg.lr * cfg.backbone_lr_mult,
            "head": cfg.lr,
            "loss": cfg.loss_lr if cfg.loss_lr is not None else cfg.lr,
        }
        if cfg.layer_decay is not None:  # backbone.0 .. backbone.{L-1}, the last at full rate
            _, count = self.backbone.layer_ids()
            for layer in range(count):
                rates[f"backbone.{layer}"] = rates["backbone"] * cfg.layer_decay ** (
                    count - 1 - layer
                )
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
        wrong = [
            n for n, p in self.named_parameters() if p.requires_grad and owners.get(id(p)) != 1
        ]
        if wrong:
            raise RuntimeError(f"parameters in no optimizer group or in several: {wrong[:10]}")
        return groups

    def build_optimizers(self):
        """The optimizer over ``parameter_groups``, with its per-step schedule when one is
        configured (what ``configure_optimizers`` returns)."""
        cfg = self.optimizer_cfg
        lrs = self.configured_learning_rates()
        groups = self.parameter_groups()
        unknown = sorted(set(groups) - set(lrs))
        if unknown:
            raise RuntimeError(
                f"parameter group(s) {unknown} have no learning rate; the groups are {sorted(lrs)}"
            )
        groups = [
            {"params": params, "lr": lrs[name], "name": name} for name, params in groups.items()
        ]
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
                    changes.append(
                        f"{name} weight decay {group.get('weight_decay'):g} -> "
                        f"{self.optimizer_cfg.weight_decay:g}"
                    )
                    group["weight_decay"] = self.optimizer_cfg.weight_decay
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if hasattr(scheduler, "base_lrs"):
                scheduler.base_lrs = [
                    g.get("initial_lr", g["lr"]) for g in scheduler.optimizer.param_groups
                ]
            if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                # the schedule is rebuilt from the config (dml.lr_schedule) and set to the
                # optimizer step the run resumes at (also where the checkpoint counted epochs:
                # the epoch-wise schedulers before it); the rate is that step's, not the one
                # saved with the optimizer
                scheduler.last_epoch = self.trainer.global_step
                for group, base, factor in zip(
                    scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas
                ):
                    group["lr"] = base * factor(scheduler.last_epoch)
        if changes:
            self.print(
                "resume: optimizer settings from the config, not the checkpoint: "
                + "; ".join(changes)
            )
