"""XBM's cross-batch memory as a loss term (Wang et al., CVPR 2020; METHODS.md, "XBM").

``CrossBatchMemoryLoss`` wraps the objective's pair loss and owns everything the memory needs:
the ring buffer of detached embeddings and labels (``dml.memory.EmbeddingRingBuffer``), the
gather of the global batch under DDP (``dml.distributed``), the warm-up, the enqueue order and
the exact per-dimension sums of what it stores. From ``start_iteration`` on, each step:

1. the global batch (the embeddings of every process, in rank order) is gathered;
2. the transform hook, if one is set, may change the stored rows in place (XBN's moment
   matching, ``dml.callbacks.CrossBatchNormalization``), through ``affine_``, ``renormalize_``
   and ``moments``, which keep the running sums exact;
3. with ``enqueue: before`` (the released XBM trainer) the batch is enqueued, then the term
   weight * L(batch, memory) is computed; with ``after`` the term sees the earlier batches
   only and the batch is enqueued after it.

Every process holds the same memory; the term covers the process's local batch. A batch with
NaN or inf is neither matched to nor stored (the non-finite loss guard stops or skips that step).
Buffers, so the memory is in the model's checkpoint.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dml.distributed import gather_rows
from dml.errors import ConfigError
from dml.memory.ring_buffer import EmbeddingRingBuffer

Transform = Callable[["CrossBatchMemoryLoss", torch.Tensor], None]


class CrossBatchMemoryLoss(nn.Module):
    """Args:
        dim: embedding dimension.
        size: rows kept (55,000 in the XBM sample config).
        start_iteration: warm-up steps without the memory (1,000).
        weight: w of the memory term.
        enqueue: before | after the memory term.
        store: normalized (the L2-normalised embeddings, what the losses compare) or raw (the
            head's output, normalised after any transform).
    """

    def __init__(self, dim: int, size: int = 55000, start_iteration: int = 1000,
                 weight: float = 1.0, enqueue: str = "before", store: str = "normalized"):
        super().__init__()
        if size < 1 or start_iteration < 0:
            raise ConfigError("model.memory.size must be >= 1 and start_iteration >= 0")
        if enqueue not in ("before", "after"):
            raise ConfigError(f"model.memory.enqueue: expected before or after, got {enqueue!r}")
        if store not in ("normalized", "raw"):
            raise ConfigError(f"model.memory.store: expected normalized or raw, got {store!r}")
        self.start_iteration, self.weight = start_iteration, weight
        self.enqueue_first, self.store = enqueue == "before", store
        self.buffer = EmbeddingRingBuffer(size, dim)
        self.register_buffer("batch_ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("sum", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("sumsq", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self.transform: Optional[Transform] = None

    # --- services for a transform (XBN) ------------------------------------------------------
    def set_transform(self, transform: Optional[Transform]) -> None:
        """``transform(memory, batch)``: called before each memory term with the global batch
        (in the stored space); it may change the stored rows through the methods below."""
        self.transform = transform

    def __len__(self) -> int:
        return len(self.buffer)

    @property
    def stored(self) -> torch.Tensor:
        """The stored rows (a view of the buffer, slot order)."""
        return self.buffer.embeddings[:len(self.buffer)]

    @property
    def stored_batch_ids(self) -> torch.Tensor:
        """The step that enqueued each stored row."""
        return self.batch_ids[:len(self.buffer)]

    @torch.no_grad()
    def moments(self):
        """Per-dimension mean and population variance of the stored rows (float64), from the
        running sums."""
        n = max(len(self.buffer), 1)
        mean = self.sum / n
        return mean, (self.sumsq / n - mean * mean).clamp_min(0)

    @torch.no_grad()
    def affine_(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """Stored rows z <- scale * z + shift per dimension, in place; with S1 = sum z and
        S2 = sum z^2 the sums follow exactly: S1' = a S1 + M c, S2' = a^2 S2 + 2 a c S1 + M c^2."""
        stored = self.stored
        a, c = scale.double(), shift.double()
        stored.mul_(a.to(stored.dtype)).add_(c.to(stored.dtype))
        m, s1 = len(stored), self.sum.clone()
        self.sum.copy_(a * s1 + m * c)
        self.sumsq.copy_(a * a * self.sumsq + 2 * a * c * s1 + m * c * c)

    @torch.no_grad()
    def renormalize_(self) -> None:
        """Stored rows L2-normalised again (the sums recounted)."""
        stored = self.stored
        stored.div_(torch.linalg.vector_norm(stored, dim=1, keepdim=True).clamp_min(1e-12))
        self.recount()

    @torch.no_grad()
    def recount(self) -> None:
        """The running sums recomputed from the stored rows (bounds float drift)."""
        stored = self.stored.double()
        self.sum.copy_(stored.sum(0))
        self.sumsq.copy_((stored * stored).sum(0))

    @torch.no_grad()
    def enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        buffer = self.buffer
        if len(labels) > buffer.size:
            embeddings, labels = embeddings[-buffer.size:], labels[-buffer.size:]
        slots = (int(buffer.pointer) + torch.arange(len(labels), device=labels.device)) \
            % buffer.size
        old = buffer.embeddings[slots[slots < int(buffer.count)]].double()
        new = embeddings.double()
        self.sum.add_(new.sum(0) - old.sum(0))
        self.sumsq.add_((new * new).sum(0) - (old * old).sum(0))
        buffer.enqueue(embeddings, labels)
        self.batch_ids[slots] = self.iteration.to(labels.device)

    # --- the term ------------------------------------------------------------------------------
    def forward(self, loss_fn: nn.Module, miner, embeddings: torch.Tensor,
                raw_embeddings: torch.Tensor, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """{"memory": weight * L(batch, memory)} after the warm-up, {} before."""
        self.iteration.add_(1)
        if int(self.iteration) <= self.start_iteration:
            return {}
        space = raw_embeddings if self.store == "raw" else embeddings
        batch = gather_rows(space.detach().float())
        batch_labels = gather_rows(labels)
        if not bool(torch.isfinite(batch).all()):
            return {}
        if self.transform is not None:
            self.transform(self, batch)
        if self.enqueue_first:
            self.enqueue(batch, batch_labels)
        parts = {}
        if len(self) > 0:
            reference = self.stored
            if self.store == "raw":
                reference = F.normalize(reference, dim=1)
            ref_labels = self.buffer.labels[:len(self)]
            pairs = miner(embeddings, labels, reference, ref_labels) if miner is not None \
                else None
            parts["memory"] = self.weight * loss_fn(embeddings, labels, pairs, reference,
                                                    ref_labels)
        if not self.enqueue_first:
            self.enqueue(batch, batch_labels)
        return parts
