"""XBN: the cross-batch memory's stored embeddings moment-matched to the current batch
(``xbn: {enabled: true}``; docs/methods/xbn.md, "XBN").

The memory itself is part of the objective (``model.memory``, ``dml.losses.memory``) and is the
only writer of its rows (``dml.memory.CrossBatchMemory``); this callback owns the matching
policy and its state. In ``setup`` it registers its transform on every memory the objective has
(``Objective.memories``); the memory calls it at every step after its warm-up, before its loss
term, with the global batch, and writes the update it returns. The update, per dimension d:

    z_d <- sigma_B,d * (z_d - mu_M,d) / sigma_M,d + mu_B,d

on the stored rows (those of earlier batches), where (mu_B, sigma_B^2) are the batch's mean
and population variance, or, ``adaptive``, their Kalman-filtered estimates
(``dml.memory.MomentKalmanFilter``, which sees every batch after the warm-up), and
(mu_M, sigma_M^2) the memory's, from its exact running sums. Both modes use the population
variance. Options:
- ``renormalize``: L2-normalise the matched rows again, a second transform (default false: the
  pair losses compare by cosine, and the memory keeps exactly the matched moments);
- ``per_batch``: match each enqueued batch's rows separately instead of the whole memory;
- ``recount_every``: steps between exact recounts of the running sums (bounds float drift).

Each memory has its own filter; their state is in the checkpoint (callback state: ``kalman``
for the first memory, ``kalman_<i>`` for others); the memory is in the model's.
"""

from __future__ import annotations

from typing import Any, Dict, List

import pytorch_lightning as pl
import torch

from dml.errors import ConfigError
from dml.memory.cross_batch import Affine, CrossBatchMemory, NewRows
from dml.memory.moments import MomentKalmanFilter, batch_moments, moment_match


class CrossBatchNormalization(pl.Callback):
    """Args:
    enabled: match the memory to every batch (needs ``model.memory.enabled``).
    adaptive: match to Kalman-filtered moments (adaptive XBN) instead of the batch's.
    renormalize, per_batch, recount_every: see the module docstring.
    process_noise_mean, process_noise_var: the filter's random-walk variances.
    """

    def __init__(
        self,
        enabled: bool = False,
        adaptive: bool = False,
        renormalize: bool = False,
        per_batch: bool = False,
        process_noise_mean: float = 1e-5,
        process_noise_var: float = 1e-6,
        recount_every: int = 100,
    ):
        if recount_every < 1:
            raise ConfigError("xbn.recount_every must be >= 1")
        self.enabled, self.adaptive = enabled, adaptive
        self.renormalize, self.per_batch = renormalize, per_batch
        self.q_mean, self.q_var = process_noise_mean, process_noise_var
        self.recount_every = recount_every
        self.memories: List[CrossBatchMemory] = []
        self.filters: List[MomentKalmanFilter] = []
        self.pending: Dict[str, Any] = {}  # filter state loaded before setup built the filters

    @property
    def state_key(self) -> str:
        return "CrossBatchNormalization"

    @property
    def kalman(self):
        """The first memory's filter (None unless adaptive)."""
        return self.filters[0] if self.filters else None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not self.enabled:
            return
        memories = pl_module.objective.memories()
        if not memories:
            raise ConfigError(
                "xbn.enabled matches a cross-batch memory: set model.memory.enabled: true"
            )
        for memory in memories:
            self.attach(memory)

    def attach(self, memory: CrossBatchMemory) -> None:
        """Register the matching (and ``renormalize``'s second transform) on ``memory``, with a
        filter of its own when adaptive; attaching twice changes nothing."""
        if any(m is memory for m in self.memories):
            return
        self.memories.append(memory)
        if self.adaptive:
            self.filters.append(
                MomentKalmanFilter(memory.dim, self.q_mean, self.q_var).to(memory.sum.device)
            )
        memory.add_transform(self.match)
        if self.renormalize:
            memory.add_transform(renormalized)
        self.load_filters()

    def on_fit_start(self, trainer, pl_module) -> None:
        for kalman in self.filters:
            kalman.to(pl_module.device)

    def state_dict(self) -> Dict[str, Any]:
        return {state_name(i): f.state_dict() for i, f in enumerate(self.filters)}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.pending = dict(state_dict)
        self.load_filters()

    def load_filters(self) -> None:
        for i, kalman in enumerate(self.filters):
            if state_name(i) in self.pending:
                kalman.load_state_dict(self.pending.pop(state_name(i)))

    # --- the transform the memory calls -----------------------------------------------------
    @torch.no_grad()
    def target(self, memory: CrossBatchMemory, batch: torch.Tensor):
        """(mean, population variance) to match: the batch's, or their filtered estimate."""
        if self.filters:
            index = next(i for i, m in enumerate(self.memories) if m is memory)
            return self.filters[index].update(batch)
        return batch_moments(batch)

    @torch.no_grad()
    def match(self, memory: CrossBatchMemory, batch: torch.Tensor):
        """The update that moment-matches ``memory`` to ``batch`` (None while it is empty)."""
        target = self.target(memory, batch)  # the filter sees every batch, even before rows
        if len(memory) == 0:
            return None
        if self.per_batch:
            stored, ids = memory.stored, memory.stored_batch_ids
            rows = stored.clone()
            for batch_id in torch.unique(ids):
                picked = ids == batch_id
                rows[picked] = moment_match(stored[picked], target=target)
            return NewRows(rows)
        mean_m, var_m = memory.moments()
        mean_b, var_b = (t.double() for t in target)
        scale = (var_b.clamp_min(0) + 1e-12).sqrt() / (var_m + 1e-12).sqrt()
        step = int(getattr(memory, "iteration", 0))
        return Affine(scale, mean_b - mean_m * scale, recount=step % self.recount_every == 0)


def state_name(i: int) -> str:
    return "kalman" if i == 0 else f"kalman_{i}"


@torch.no_grad()
def renormalized(memory: CrossBatchMemory, batch: torch.Tensor):
    """The stored rows L2-normalised again (XBN's ``renormalize``)."""
    stored = memory.stored
    return NewRows(stored / torch.linalg.vector_norm(stored, dim=1, keepdim=True).clamp_min(1e-12))
