"""The non-finite-loss guard of ``nonfinite_loss: stop``, without a host-device synchronisation
per step.

Reading a loss on the host (``bool(torch.isfinite(loss))``) waits for the GPU to reach that
point, so a per-step check keeps the CPU from queueing ahead. ``LossWatch`` instead keeps, on the
loss's device, the first step whose total loss is NaN or infinite and the terms at that step
(``torch.where`` updates, no read), and the module reads it every ``every`` steps and before every
validation, checkpoint and the end of training (``DMLModule.check_losses``). The run then stops
naming the exact step, as an immediate check would, up to ``every`` steps later; no checkpoint is
written in between, so those on disk stay finite.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch


class LossWatch:
    def __init__(self, every: int = 50):
        self.every = every
        self._reset()

    def _reset(self) -> None:
        self.first_step: Optional[torch.Tensor] = None  # -1 while every loss was finite
        self.values: Dict[str, torch.Tensor] = {}  # each term at the first bad step
        self.present: Dict[str, torch.Tensor] = {}  # whether that step had the term
        self.where: Dict[int, Tuple[int, int]] = {}  # step -> (epoch, batch index)
        self.pending = 0

    def record(
        self,
        total: torch.Tensor,
        terms: Dict[str, torch.Tensor],
        step: int,
        epoch: int,
        batch_idx: int,
    ) -> None:
        """Device-side bookkeeping of one training step (nothing read on the host)."""
        total = total.detach()
        if self.first_step is None:
            self.first_step = torch.full((), -1, dtype=torch.long, device=total.device)
        first_bad = ~torch.isfinite(total).all() & (self.first_step < 0)
        self.first_step = torch.where(
            first_bad, torch.full_like(self.first_step, step), self.first_step
        )
        for name, value in terms.items():
            value = value.detach().float().reshape(())
            if name not in self.values:  # a term first seen now (the memory's, after warm-up)
                self.values[name] = torch.zeros_like(value)
                self.present[name] = torch.zeros((), dtype=torch.bool, device=value.device)
            self.values[name] = torch.where(first_bad, value, self.values[name])
            self.present[name] = first_bad | self.present[name]
        self.where[step] = (epoch, batch_idx)
        self.pending += 1

    def due(self) -> bool:
        return self.pending >= self.every

    def read(self) -> Optional[Tuple[int, int, int, Dict[str, float]]]:
        """(step, epoch, batch index, {term: value}) of the first non-finite loss since the last
        read, or None; one host-device synchronisation. Clears the record."""
        if self.first_step is None:
            self._reset()
            return None
        step = int(self.first_step)
        found = None
        if step >= 0:
            epoch, batch_idx = self.where.get(step, (-1, -1))
            terms = {
                name: float(value)
                for name, value in self.values.items()
                if bool(self.present[name])
            }
            found = (step, epoch, batch_idx, terms)
        self._reset()
        return found

    @staticmethod
    def bad_terms(terms: Dict[str, float]) -> List[str]:
        return [name for name, value in terms.items() if not torch.isfinite(torch.tensor(value))]
