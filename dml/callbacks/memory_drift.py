"""How far the cross-batch memory's stored rows are from what the network makes of the same
images now: the drift that XBN's moment matching is meant to correct (``memory_drift:``).

Every ``every`` steps of the memory (one per training batch), once the memory holds rows of
known images (``CrossBatchMemory.stored_sample_ids``), ``rows`` stored rows are drawn (a
generator seeded with ``seed`` and the step; the training's random state is saved and
restored around the measure), their images embedded again as a training step embeds them
(train mode, the training augmentation, ``candidate_loader``; batch-norm's running statistics
restored afterwards), and the module records (``DMLModule.record_diagnostics``, logged as
``train/memory/...``):

- ``memory/drift_cosine``: mean_i cos(m_i, f_now(x_i)) over the drawn rows, m_i the stored row
  as the memory holds it now (after XBN's transforms) in the space it stores (normalised
  embeddings, or the head's raw output with ``store: raw``);
- ``memory/drift_cosine_newest``: the same over the rows of the newest stored batch (embedded
  one optimiser step ago, embedded again as one batch, as then): the reference, what a new
  draw of the augmentation alone gives; the drift of older rows is the gap below it;
- ``memory/drift_age``: the mean age in steps of the drawn rows.

Nothing in training changes: no gradient, the module's buffers and the random state
restored. Every process measures the same memory; rank 0 logs.
"""

from __future__ import annotations

import random
from typing import Dict, Optional

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_warn

from dml.errors import ConfigError


class MemoryDrift(pl.Callback):
    """Args:
    enabled: measure (no effect without a memory or with ``model.diagnostics: false``).
    every: steps between measures.
    rows: stored rows drawn per measure (all, when fewer are known).
    batch_size: images embedded at once (default: as many as the newest stored batch, i.e.
        the training batch).
    seed: of the row draws.
    """

    def __init__(
        self,
        enabled: bool = True,
        every: int = 200,
        rows: int = 256,
        batch_size: Optional[int] = None,
        seed: int = 0,
    ):
        for key, value in (("every", every), ("rows", rows), ("batch_size", batch_size)):
            if value is not None and value < 1:
                raise ConfigError(f"memory_drift.{key}: expected a value >= 1, got {value}")
        self.enabled, self.every, self.rows = enabled, every, rows
        self.batch_size, self.seed = batch_size, seed

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.enabled or not getattr(pl_module, "diagnostics", False):
            return
        memory = getattr(getattr(pl_module, "objective", None), "memory", None)
        if memory is None or not hasattr(memory, "stored_sample_ids"):
            return
        # the memory's own step (one per batch, as the rows' batch_ids), not the optimiser's:
        # with gradient accumulation several batches share an optimiser step
        step = int(getattr(memory, "iteration", trainer.global_step))
        if step == 0 or step % self.every or step == getattr(self, "_measured", None):
            return
        self._measured = step
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "candidate_loader"):
            return
        values = self.measure(memory, dm, pl_module, step)
        if values:
            pl_module.record_diagnostics(values)

    @torch.no_grad()
    def measure(self, memory, dm, pl_module, step: int) -> Optional[Dict[str, torch.Tensor]]:
        """The drift quantities of the module docstring at the memory's step ``step``, or None
        when no stored row's image is known (or the stored indices no longer fit the data)."""
        if len(memory) == 0:
            return None
        ids, batch_ids = memory.stored_sample_ids, memory.stored_batch_ids
        is_newest = batch_ids == batch_ids.max()
        older = torch.nonzero((ids >= 0) & ~is_newest).flatten()
        newest = torch.nonzero((ids >= 0) & is_newest).flatten()
        if len(older) == 0 or len(newest) == 0:
            return None
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        older = older[torch.randperm(len(older), generator=g)[: self.rows].to(older.device)]
        labels = torch.as_tensor(dm.train_labels(), device=ids.device)
        picked = torch.cat([older, newest])
        inside = bool((ids[picked] < len(labels)).all())
        if not inside or not bool((labels[ids[picked]] == memory.stored_labels[picked]).all()):
            if not getattr(self, "_warned", False):
                self._warned = True
                rank_zero_warn(
                    "memory_drift: the stored rows' image indices do not fit the training "
                    "set (its images or labels changed since they were stored, e.g. a resume "
                    "with other data); the drift is not measured until they are overwritten"
                )
            return None
        chunk = self.batch_size or max(len(newest), 1)
        cosines = []
        for rows in (older, newest):  # the newest batch embedded as one batch, as it was
            now = self.embed_again(dm, pl_module, ids[rows].tolist(), memory.store, chunk)
            stored = memory.stored[rows].float().to(now.device)
            cosines.append(F.cosine_similarity(stored, now, dim=1).mean())
        return {
            "memory/drift_cosine": cosines[0],
            "memory/drift_cosine_newest": cosines[1],
            "memory/drift_age": (step - batch_ids[older]).float().mean(),
        }

    def embed_again(self, dm, pl_module, indices, store: str, chunk: int) -> torch.Tensor:
        """The training images at ``indices`` embedded now as a training step embeds them
        (train mode, training augmentation, batches of ``chunk``), in the memory's space; the
        module's buffers (batch-norm running statistics) and the random state of torch, numpy
        and random are restored afterwards."""
        py_state, np_state = random.getstate(), np.random.get_state()
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        buffers = {  # the network's (not the objective's memory, which embedding leaves alone)
            name: b.clone()
            for name, b in pl_module.named_buffers()
            if not name.startswith("objective.")
        }
        key = "raw_embeddings" if store == "raw" else "embeddings"
        try:
            with torch.random.fork_rng(devices=devices):
                rows = []
                for batch in dm.candidate_loader(indices, chunk):
                    images = dm.device_batch(batch, pl_module.device)[0]
                    rows.append(pl_module.embed(images)[key].float())
        finally:
            with torch.no_grad():
                for name, b in pl_module.named_buffers():
                    if name in buffers:
                        b.copy_(buffers[name])
            random.setstate(py_state)
            np.random.set_state(np_state)
        return torch.cat(rows)
