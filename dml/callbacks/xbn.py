"""XBN: the cross-batch memory's stored embeddings moment-matched to the current batch
(``xbn: {enabled: true}``; METHODS.md, "XBN").

The memory itself is part of the objective (``model.memory``, ``dml.losses.memory``); this
callback owns the matching policy and its state. In ``setup`` it hands the memory one
transform (``CrossBatchMemoryLoss.set_transform``); the memory calls it at every step after its
warm-up, before its loss term, with the global batch. The transform then, per dimension d:

    z_d <- sigma_B,d * (z_d - mu_M,d) / sigma_M,d + mu_B,d

on the stored rows (those of earlier batches), where (mu_B, sigma_B^2) are the batch's mean
and population variance, or, ``adaptive``, their Kalman-filtered estimates
(``dml.memory.MomentKalmanFilter``, which sees every batch after the warm-up), and
(mu_M, sigma_M^2) the memory's, from its exact running sums. Both modes use the population
variance. Options:
- ``renormalize``: L2-normalise the matched rows again (default false: the pair losses compare
  by cosine, and the memory keeps exactly the matched moments);
- ``per_batch``: match each enqueued batch's rows separately instead of the whole memory;
- ``recount_every``: steps between exact recounts of the running sums (bounds float drift).

The filter's state is in the checkpoint (callback state); the memory is in the model's.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import pytorch_lightning as pl
import torch

from dml.errors import ConfigError
from dml.memory.moments import MomentKalmanFilter, batch_moments, moment_match


class CrossBatchNormalization(pl.Callback):
    """Args:
        enabled: match the memory to every batch (needs ``model.memory.enabled``).
        adaptive: match to Kalman-filtered moments (adaptive XBN) instead of the batch's.
        renormalize, per_batch, recount_every: see the module docstring.
        process_noise_mean, process_noise_var: the filter's random-walk variances.
    """

    def __init__(self, enabled: bool = False, adaptive: bool = False,
                 renormalize: bool = False, per_batch: bool = False,
                 process_noise_mean: float = 1e-5, process_noise_var: float = 1e-6,
                 recount_every: int = 100):
        if recount_every < 1:
            raise ConfigError("xbn.recount_every must be >= 1")
        self.enabled, self.adaptive = enabled, adaptive
        self.renormalize, self.per_batch = renormalize, per_batch
        self.q_mean, self.q_var = process_noise_mean, process_noise_var
        self.recount_every = recount_every
        self.kalman: Optional[MomentKalmanFilter] = None

    @property
    def state_key(self) -> str:
        return "CrossBatchNormalization"

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not self.enabled:
            return
        memory = pl_module.objective.memory
        if memory is None:
            raise ConfigError("xbn.enabled matches a cross-batch memory: set "
                              "model.memory.enabled: true")
        if self.adaptive and self.kalman is None:
            self.kalman = MomentKalmanFilter(memory.stored.shape[1] if len(memory)
                                             else memory.buffer.embeddings.shape[1],
                                             self.q_mean, self.q_var)
        memory.set_transform(self.match)

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.kalman is not None:
            self.kalman.to(pl_module.device)

    def state_dict(self) -> Dict[str, Any]:
        return {} if self.kalman is None else {"kalman": self.kalman.state_dict()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if self.kalman is not None and "kalman" in state_dict:
            self.kalman.load_state_dict(state_dict["kalman"])

    # --- the transform the memory calls -----------------------------------------------------
    @torch.no_grad()
    def target(self, batch: torch.Tensor):
        """(mean, population variance) to match: the batch's, or their filtered estimate."""
        if self.kalman is not None:
            return self.kalman.update(batch)
        return batch_moments(batch)

    @torch.no_grad()
    def match(self, memory, batch: torch.Tensor) -> None:
        target = self.target(batch)  # the filter sees every batch, even before rows are stored
        if len(memory) == 0:
            return
        if self.per_batch:
            stored, ids = memory.stored, memory.stored_batch_ids
            for batch_id in torch.unique(ids):
                rows = ids == batch_id
                stored[rows] = moment_match(stored[rows], target=target)
            memory.recount()
        else:
            mean_m, var_m = memory.moments()
            mean_b, var_b = (t.double() for t in target)
            scale = (var_b.clamp_min(0) + 1e-12).sqrt() / (var_m + 1e-12).sqrt()
            memory.affine_(scale, mean_b - mean_m * scale)
            if int(memory.iteration) % self.recount_every == 0:
                memory.recount()
        if self.renormalize:
            memory.renormalize_()
