"""XBM and (adaptive) XBN as a Lightning callback: ``memory: {mode: xbm | xbn | adaptive_xbn}``.

At every training step, from ``start_iteration`` on (METHODS.md, "XBM" and "XBN"):
1. XBN only: the stored embeddings are transformed in place so that their per-dimension mean
   and standard deviation match the current batch's (``moment_match``), or, adaptive, the
   Kalman-filtered estimate of the current moments (``MomentKalmanFilter``);
2. with ``enqueue: before`` (the default, the released XBM trainer's order) the batch is
   enqueued, then the model's pair loss is computed between the batch and the memory,
   loss = L(batch, batch) + weight * L(batch, memory), so that the memory term also sees the
   batch's own detached rows (self-pairs drop out of XBM's loss through its s < 1 - eps
   filter); with ``enqueue: after`` the memory term sees the earlier batches only and the
   batch is enqueued after it.
Under DDP the batch of steps 1 and 2 is the global one (gathered from every process, in rank
order), so every rank holds the same memory; the loss covers the local batch.

Choices exposed as options, with the natural defaults:
- ``moments``: "normalized" (the L2-normalised embeddings are stored and matched: what the loss
  compares) or "raw" (the head's output before normalisation is stored and matched, and
  normalised after the transform).
- ``renormalize``: L2-normalise the matched memory again (default false: the pair losses
  compare by cosine or normalised L2 distance, pytorch-metric-learning's distances normalise
  their inputs, and the stored memory keeps exactly the matched moments. True stores unit
  vectors, the moments then hold up to that projection, at the price of recounting the
  memory's moments every step).
- ``per_batch``: match each enqueued batch's moments separately instead of the whole memory's.

The memory's per-dimension sums (S1 = sum z, S2 = sum z^2, float64) are kept up to date
exactly, so that matching costs one fused pass over the memory and no reduction: an enqueue
adds the new rows and removes the overwritten ones, and the transform z' = a z + c maps them to
S1' = a S1 + M c and S2' = a^2 S2 + 2 a c S1 + M c^2. They are recounted from the memory every
``recount_every`` steps (bounding float drift) and after every step with ``renormalize`` or
``per_batch``.

The memory, its sums, the filter state and the iteration counter are saved in checkpoints.
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
        self.register_buffer("sum", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("sumsq", torch.zeros(dim, dtype=torch.float64))
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
        recount_every: steps between exact recounts of the memory's running sums.
        enqueue: before (the released XBM trainer) or after the memory term.
    """

    def __init__(self, mode: str = "none", size: int = 55000, start_iteration: int = 1000,
                 weight: float = 1.0, moments: str = "normalized", renormalize: bool = False,
                 per_batch: bool = False, process_noise_mean: float = 1e-5,
                 process_noise_var: float = 1e-6, recount_every: int = 100,
                 enqueue: str = "before"):
        if mode not in MODES:
            raise ConfigError(f"memory.mode: expected one of {MODES}, got {mode!r}")
        if moments not in ("normalized", "raw"):
            raise ConfigError(f"memory.moments: expected normalized or raw, got {moments!r}")
        if enqueue not in ("before", "after"):
            raise ConfigError(f"memory.enqueue: expected before or after, got {enqueue!r}")
        if size < 1 or start_iteration < 0:
            raise ConfigError("memory.size must be >= 1 and memory.start_iteration >= 0")
        self.mode, self.size, self.start_iteration, self.weight = mode, size, start_iteration, weight
        self.moments, self.renormalize, self.per_batch = moments, renormalize, per_batch
        self.q_mean, self.q_var = process_noise_mean, process_noise_var
        self.recount_every = recount_every
        self.enqueue_first = enqueue == "before"
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
        if pl_module.loss_fn is None:
            raise ConfigError(f"memory.mode {self.mode} needs a pair loss to compare the batch "
                              f"with the memory; model.loss.name is none")
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
    @torch.no_grad()
    def recount(self) -> None:
        """The running sums recomputed from the stored embeddings."""
        n = len(self.state.memory)
        stored = self.state.memory.embeddings[:n].double()
        self.state.sum.copy_(stored.sum(0))
        self.state.sumsq.copy_((stored * stored).sum(0))

    @torch.no_grad()
    def memory_moments(self):
        n = len(self.state.memory)
        mean = self.state.sum / n
        return mean, (self.state.sumsq / n - mean * mean).clamp_min(0)

    @torch.no_grad()
    def transform(self, stored: torch.Tensor, target) -> torch.Tensor:
        """XBN, in place: the stored embeddings (the first M slots) moment-matched to
        ``target`` = (mean, variance), then renormalised if asked."""
        state = self.state
        if self.per_batch:
            ids = state.batch_ids[:len(stored)]
            for batch_id in torch.unique(ids):
                rows = ids == batch_id
                stored[rows] = moment_match(stored[rows], target=target)
        else:
            mean_m, var_m = self.memory_moments()
            mu_b, var_b = (t.double() for t in target)
            a = (var_b.clamp_min(0) + 1e-12).sqrt() / (var_m + 1e-12).sqrt()
            c = mu_b - mean_m * a
            stored.mul_(a.to(stored.dtype)).add_(c.to(stored.dtype))
            m = len(stored)
            s1 = state.sum.clone()
            state.sum.copy_(a * s1 + m * c)
            state.sumsq.copy_(a * a * state.sumsq + 2 * a * c * s1 + m * c * c)
        if self.moments == "normalized" and self.renormalize:
            stored.div_(torch.linalg.vector_norm(stored, dim=1, keepdim=True).clamp_min(1e-12))
        if self.renormalize or self.per_batch or \
                int(state.iteration) % max(self.recount_every, 1) == 0:
            self.recount()
        return stored

    def losses(self, module, out: Dict[str, Any], labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The memory term of the loss; enqueues the batch. Called by DMLModule.compute_losses."""
        state = self.state
        state.iteration.add_(1)
        if int(state.iteration) <= self.start_iteration:
            return {}
        z = out["embeddings"]
        stored_space = out["raw_embeddings"] if self.moments == "raw" else z
        # the global batch under DDP: every rank matches to and enqueues the same embeddings
        batch, batch_labels = self.gather(module, stored_space.detach().float(), labels)
        if not bool(torch.isfinite(batch).all()):
            # a diverged batch: its loss is non-finite too (the module stops or skips the
            # step); matching to it or storing it would poison the memory for good
            return {}
        parts = {}
        memory = state.memory
        target = None
        if self.mode == "xbn":
            target = batch_moments(batch)
        elif self.mode == "adaptive_xbn":  # the filter sees every batch after the warm-up
            target = state.kalman.update(batch)
        if len(memory) > 0 and self.mode in ("xbn", "adaptive_xbn"):
            # the stored rows (earlier batches), in place: a view of the buffer
            self.transform(memory.embeddings[:len(memory)], target)
        if self.enqueue_first:
            self.enqueue(batch, batch_labels)
        if len(memory) > 0:
            n = len(memory)
            stored = memory.embeddings[:n]  # slot order; the loss does not care
            reference = F.normalize(stored, dim=1) if self.moments == "raw" else stored
            ref_labels = memory.labels[:n]
            pairs = None
            if module.miner is not None:
                pairs = module.miner(z, labels, reference, ref_labels)
            parts["memory"] = self.weight * module.loss_fn(z, labels, pairs, reference,
                                                           ref_labels)
        if not self.enqueue_first:
            self.enqueue(batch, batch_labels)
        return parts

    @staticmethod
    @torch.no_grad()
    def gather(module, embeddings: torch.Tensor, labels: torch.Tensor):
        """The global batch in rank order (the local one on a single process)."""
        world = module.trainer.world_size if module._trainer is not None else 1
        if world == 1:
            return embeddings, labels
        return (module.all_gather(embeddings).reshape(-1, embeddings.shape[-1]),
                module.all_gather(labels).reshape(-1))

    @torch.no_grad()
    def enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        state = self.state
        memory = state.memory
        if len(labels) > memory.size:
            embeddings, labels = embeddings[-memory.size:], labels[-memory.size:]
        start = int(memory.pointer)
        slots = (start + torch.arange(len(labels), device=labels.device)) % memory.size
        full = slots < int(memory.count)  # slots whose old entry is overwritten
        old = memory.embeddings[slots[full]].double()
        new = embeddings.double()
        state.sum.add_(new.sum(0) - old.sum(0))
        state.sumsq.add_((new * new).sum(0) - (old * old).sum(0))
        memory.enqueue(embeddings, labels)
        state.batch_ids[slots] = state.iteration.to(labels.device)
