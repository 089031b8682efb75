"""The non-finite policy of the training module: a NaN or infinite loss stops the run naming the
step, the loss terms and the learning rates (``nonfinite_loss: stop``) or skips the step
(``skip``); a weight or buffer holding NaN or inf stops the run before a checkpoint is written.

``NonFiniteGuard`` is a part of ``DMLModule`` (a mixin): the Lightning hooks stay in
``dml/module.py`` and call ``check_losses`` and ``check_finite_state``; the losses are watched
without a host read per step (``dml.loss_watch``).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from pytorch_lightning.utilities import rank_zero_warn

from dml.errors import ConfigError, NonFiniteLossError, NonFiniteStateError
from dml.loss_watch import LossWatch

POLICIES = ("stop", "skip")


def check_policy(nonfinite_loss: str) -> None:
    if nonfinite_loss not in POLICIES:
        raise ConfigError(f"model.nonfinite_loss: expected stop or skip, got {nonfinite_loss!r}")


class NonFiniteGuard:
    """Expects the LightningModule's ``trainer``, ``log``, ``global_step``, ``current_epoch``
    and the attributes ``nonfinite_loss`` ("stop" | "skip") and ``skipped_steps``."""

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
        step, epoch, batch_idx, terms = (
            found if found else (self.global_step, self.current_epoch, -1, {})
        )
        self.on_nonfinite_loss(
            {k: torch.tensor(v) for k, v in terms.items()}, batch_idx, step, epoch
        )

    def on_nonfinite_loss(
        self,
        terms: Dict[str, torch.Tensor],
        batch_idx: int,
        step: Optional[int] = None,
        epoch: Optional[int] = None,
    ):
        """Stop with one line naming the step, epoch, the non-finite terms and the learning
        rates; or, with ``nonfinite_loss: skip``, skip the step (returning None)."""
        bad = {
            name: float(value.detach())
            for name, value in terms.items()
            if not bool(torch.isfinite(value.detach()).all())
        }
        step = self.global_step if step is None else step
        epoch = self.current_epoch if epoch is None else epoch
        where = (
            f"step {step} (epoch {epoch}, batch {batch_idx})"
            if batch_idx >= 0
            else f"step {step} (epoch {epoch})"
        )
        if self.nonfinite_loss == "skip":
            self.skipped_steps += 1
            self.log("train/skipped_steps", float(self.skipped_steps), batch_size=1)
            rank_zero_warn(
                f"non-finite loss at {where}: {bad or 'on another process'}; step "
                f"skipped ({self.skipped_steps} so far)"
            )
            return None
        terms_text = ", ".join(f"loss_{k} = {v}" for k, v in bad.items()) or "on another process"
        raise NonFiniteLossError(
            f"non-finite loss at {where}: {terms_text}; learning rates: "
            f"{describe_learning_rates(self.trainer)}. Training stopped; the checkpoints "
            f"written so far are untouched. Lower the learning rate, or set "
            f"model.nonfinite_loss: skip to drop such steps."
        )

    def check_finite_state(self) -> None:
        """NonFiniteStateError naming the weights and buffers that hold NaN or inf."""
        bad = [
            name
            for name, t in self.state_dict().items()
            if t.is_floating_point() and not bool(torch.isfinite(t).all())
        ]
        if bad:
            names = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise NonFiniteStateError(
                f"non-finite model state after step {self.trainer.global_step} (epoch "
                f"{self.trainer.current_epoch}): {names} hold NaN or inf; learning rates: "
                f"{describe_learning_rates(self.trainer)}. Training stopped before writing a "
                f"checkpoint; those written so far are untouched. Lower the learning rate."
            )


def describe_learning_rates(trainer) -> str:
    """``backbone 0.001, head 0.001``: each parameter group's current learning rate."""
    return ", ".join(
        f"{g.get('name', i)} {g['lr']:g}"
        for opt in trainer.optimizers
        for i, g in enumerate(opt.param_groups)
    )
