"""XBM and (adaptive) XBN as a Lightning callback: ``memory: {mode: xbm | xbn | adaptive_xbn}``.

At every training step, from ``start_iteration`` on (METHODS.md, "XBM" and "XBN"):
1. XBN only: the stored embeddings are transformed in place so that their per-dimension mean
   and standard deviation match the current batch's (``moment_match``), or, adaptive, the
   Kalman-filtered estimate of the current moments (``MomentKalmanFilter``);
2. the model's pair loss is computed between the batch and the memory,
   loss = L(batch, batch) + weight * L(batch, memory);
3. the batch (gathered from every process under DDP, so every rank holds the same memory) is
   enqueued. The batch is not yet in the memory at step 2, so no self-pair can occur.

Choices exposed as options, with the natural defaults:
- ``moments``: "normalized" (the L2-normalised embeddings are stored and matched: what the loss
  compares) or "raw" (the head's output before normalisation is stored and matched, and
  normalised after the transform).
- ``renormalize``: L2-normalise the matched normalized-space memory again (default true: cosine
  losses expect unit vectors; the moments then hold up to that projection).
- ``per_batch``: match each enqueued batch's moments separately instead of the whole memory's.

The memory, the filter state and the iteration counter are saved in checkpoints.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from dml.errors import ConfigError
from dml.memory.moments import MomentKalmanFilter, batch_moments, moment_match
from dml.memory.ring_buffer import EmbeddingRingBuffer

MODES = ("none", "xbm", "xbn", "adaptive_xbn")


class CrossBatchMemoryState(nn.Module):
    """Everything the callback must carry across a checkpoint, as buffers."""

    def __init__(self, size: int, dim: int, process_noise_mean: float,
                 process_noise_var: float):
        super().__init__()
        self.memory = EmbeddingRingBuffer(size, dim)
        self.register_buffer("batch_ids", torch.full((size,), -1, dtype=torch.long))
        self.kalman = MomentKalmanFilter(dim, process_noise_mean, process_noise_var)
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))


class CrossBatchMemory(pl.Callback):
    """Args:
        mode: none | xbm | xbn | adaptive_xbn.
        size: memory size in embeddings (55,000 in the XBM sample config).
        start_iteration: warm-up steps before the memory is filled and used (1,000).
        weight: w in L(batch, batch) + w * L(batch, memory) (1).
        moments: normalized | raw (see the module docstring).
        renormalize: L2-normalise after the transform.
        per_batch: moments per enqueued batch instead of the whole memory.
        process_noise_mean, process_noise_var: random-walk variances of the adaptive filter.
    """

    def __init__(self, mode: str = "none", size: int = 55000, start_iteration: int = 1000,
                 weight: float = 1.0, moments: str = "normalized", renormalize: bool = True,
                 per_batch: bool = False, process_noise_mean: float = 1e-5,
                 process_noise_var: float = 1e-6):
        if mode not in MODES:
            raise ConfigError(f"memory.mode: expected one of {MODES}, got {mode!r}")
        if moments not in ("normalized", "raw"):
            raise ConfigError(f"memory.moments: expected normalized or raw, got {moments!r}")
        if size < 1 or start_iteration < 0:
            raise ConfigError("memory.size must be >= 1 and memory.start_iteration >= 0")
        self.mode, self.size, self.start_iteration, self.weight = mode, size, start_iteration, weight
        self.moments, self.renormalize, self.per_batch = moments, renormalize, per_batch
        self.q_mean, self.q_var = process_noise_mean, process_noise_var
        self.state: Optional[CrossBatchMemoryState] = None

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def state_key(self) -> str:
        return "CrossBatchMemory"

    # --- wiring ------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if not self.enabled:
            return
        if self.state is None:
            self.state = CrossBatchMemoryState(self.size, pl_module.hparams.embedding_dim,
                                               self.q_mean, self.q_var)
        self.state.to(pl_module.device)
        pl_module.loss_contributors["memory"] = self

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.enabled:
            self.state.to(pl_module.device)

    def state_dict(self) -> Dict[str, Any]:
        return {} if self.state is None else {"state": self.state.state_dict()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if self.state is not None and "state" in state_dict:
            self.state.load_state_dict(state_dict["state"])

    # --- the step ------------------------------------------------------------------------
    def transform(self, stored: torch.Tensor, target) -> torch.Tensor:
        """XBN: the stored embeddings moment-matched to ``target`` = (mean, variance)."""
        if not self.per_batch:
            return moment_match(stored, target=target)
        out = stored.clone()
        ids = self.state.batch_ids[:len(stored)]
        for batch_id in torch.unique(ids):
            rows = ids == batch_id
            out[rows] = moment_match(stored[rows], target=target)
        return out

    def losses(self, module, out: Dict[str, Any], labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The memory term of the loss; enqueues the batch. Called by DMLModule.compute_losses."""
        state = self.state
        state.iteration.add_(1)
        if int(state.iteration) <= self.start_iteration:
            return {}
        z = out["embeddings"]
        stored_space = out["raw_embeddings"] if self.moments == "raw" else z
        parts = {}
        memory = state.memory
        target = None
        if self.mode == "xbn":
            target = batch_moments(stored_space.detach().float())
        elif self.mode == "adaptive_xbn":  # the filter sees every batch after the warm-up
            target = state.kalman.update(stored_space.detach().float())
        if len(memory) > 0:
            n = len(memory)
            stored = memory.embeddings[:n]  # slot order; the loss does not care
            if self.mode in ("xbn", "adaptive_xbn"):
                with torch.no_grad():
                    matched = self.transform(stored, target)
                    if self.moments == "normalized" and self.renormalize:
                        matched = F.normalize(matched, dim=1)
                    memory.embeddings[:n] = matched
                    stored = memory.embeddings[:n]
            reference = F.normalize(stored, dim=1) if self.moments == "raw" else stored
            ref_labels = memory.labels[:n]
            pairs = None
            if module.miner is not None:
                pairs = module.miner(z, labels, reference, ref_labels)
            parts["memory"] = self.weight * module.loss_fn(z, labels, pairs, reference,
                                                           ref_labels)
        self.enqueue(module, stored_space.detach().float(), labels)
        return parts

    @torch.no_grad()
    def enqueue(self, module, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        world = module.trainer.world_size if module._trainer is not None else 1
        if world > 1:  # every rank enqueues the global batch, in rank order
            embeddings = module.all_gather(embeddings).reshape(-1, embeddings.shape[-1])
            labels = module.all_gather(labels).reshape(-1)
        memory = self.state.memory
        start = int(memory.pointer)
        memory.enqueue(embeddings, labels)
        slots = (start + torch.arange(len(labels), device=labels.device)) % memory.size
        self.state.batch_ids[slots] = self.state.iteration.to(labels.device)
