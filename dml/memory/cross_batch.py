"""XBM's cross-batch memory (Wang et al., CVPR 2020): the stored rows and everything about them,
with one writer.

``CrossBatchMemory`` owns the ring buffer of detached embeddings and labels
(``EmbeddingRingBuffer``), the step that wrote each row, and the exact per-dimension sums
S1 = sum_i z_i and S2 = sum_i z_i^2 of the stored rows, from which ``moments`` gives their mean
and population variance. Nothing else writes them. Whoever wants the stored rows changed (XBN's
moment matching, ``dml.callbacks.CrossBatchNormalization``) registers a **transform** with
``add_transform``; at every step ``transform(batch)`` calls the transforms in registration order,
each ``transform(memory, batch)`` reading the memory and returning an update, which the memory
applies:

- ``Affine(scale, shift)``: z <- scale * z + shift per dimension; the sums follow exactly,
  S1' = a S1 + M c, S2' = a^2 S2 + 2 a c S1 + M c^2 (``recount``: recomputed from the rows
  instead, which bounds float drift);
- ``NewRows(rows)``: every stored row replaced (the sums recounted);
- ``None``: nothing to change.

Each stored row also keeps the step that enqueued it (``stored_batch_ids``) and the index of its
image in the training set (``stored_sample_ids``, -1 where unknown), so that an observer can
embed the same images again and measure how far the stored rows drifted
(``dml.callbacks.MemoryDrift``).

Buffers, so the memory is in the model's checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Union

import torch
from torch import nn

from dml.memory.ring_buffer import EmbeddingRingBuffer


@dataclass
class Affine:
    """z <- scale * z + shift per dimension, on every stored row."""

    scale: torch.Tensor
    shift: torch.Tensor
    recount: bool = False


@dataclass
class NewRows:
    """Every stored row replaced by ``rows`` (slot order, as ``CrossBatchMemory.stored``)."""

    rows: torch.Tensor


Update = Optional[Union[Affine, NewRows]]
Transform = Callable[["CrossBatchMemory", torch.Tensor], Update]


class CrossBatchMemory(nn.Module):
    """Args:
    dim: embedding dimension.
    size: rows kept; the oldest are overwritten first.
    """

    def __init__(self, dim: int, size: int):
        super().__init__()
        self.buffer = EmbeddingRingBuffer(size, dim)
        self.register_buffer("batch_ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("sample_ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("sum", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("sumsq", torch.zeros(dim, dtype=torch.float64))
        self.transforms: List[Transform] = []

    # --- reading ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.buffer)

    @property
    def dim(self) -> int:
        return int(self.buffer.embeddings.shape[1])

    @property
    def stored(self) -> torch.Tensor:
        """The stored rows, slot order (read them; changes go through a transform)."""
        return self.buffer.embeddings[: len(self.buffer)]

    @property
    def stored_labels(self) -> torch.Tensor:
        return self.buffer.labels[: len(self.buffer)]

    @property
    def stored_batch_ids(self) -> torch.Tensor:
        """The step that enqueued each stored row."""
        return self.batch_ids[: len(self.buffer)]

    @property
    def stored_sample_ids(self) -> torch.Tensor:
        """The training-set index of each stored row's image (-1: not known)."""
        return self.sample_ids[: len(self.buffer)]

    @torch.no_grad()
    def moments(self):
        """Per-dimension mean and population variance of the stored rows (float64), from the
        running sums: S1 / M and S2 / M - (S1 / M)^2."""
        n = max(len(self.buffer), 1)
        mean = self.sum / n
        return mean, (self.sumsq / n - mean * mean).clamp_min(0)

    # --- the one writer --------------------------------------------------------------------
    def add_transform(self, transform: Transform) -> None:
        """Register ``transform(memory, batch) -> Affine | NewRows | None``, called at every
        step after the ones registered before it."""
        if transform not in self.transforms:
            self.transforms.append(transform)

    @torch.no_grad()
    def transform(self, batch: torch.Tensor) -> None:
        """Each registered transform in turn, its update written (``batch``: the global batch,
        in the stored space)."""
        for transform in self.transforms:
            self.apply(transform(self, batch))

    @torch.no_grad()
    def apply(self, update: Update) -> None:
        if update is None or len(self) == 0:
            return
        if isinstance(update, NewRows):
            self.stored.copy_(update.rows.to(self.stored.dtype))
            self.recount()
            return
        stored = self.stored
        a, c = update.scale.double(), update.shift.double()
        stored.mul_(a.to(stored.dtype)).add_(c.to(stored.dtype))
        if update.recount:
            self.recount()
            return
        m, s1 = len(stored), self.sum.clone()
        self.sum.copy_(a * s1 + m * c)
        self.sumsq.copy_(a * a * self.sumsq + 2 * a * c * s1 + m * c * c)

    @torch.no_grad()
    def recount(self) -> None:
        """The running sums recomputed from the stored rows (bounds float drift)."""
        stored = self.stored.double()
        self.sum.copy_(stored.sum(0))
        self.sumsq.copy_((stored * stored).sum(0))

    @torch.no_grad()
    def enqueue(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        step: int = -1,
        sample_ids: Optional[torch.Tensor] = None,
    ) -> None:
        """Store a batch (the newest ``size`` rows of it), overwriting the oldest rows; the
        sums lose the overwritten rows and gain the new ones. ``sample_ids``: the rows'
        training-set indices (None: unknown, stored as -1)."""
        buffer = self.buffer
        if sample_ids is None:
            sample_ids = torch.full_like(labels, -1)
        if len(labels) > buffer.size:
            embeddings, labels = embeddings[-buffer.size :], labels[-buffer.size :]
            sample_ids = sample_ids[-buffer.size :]
        slots = buffer.next_slots(len(labels))
        old = buffer.embeddings[slots[slots < int(buffer.count)]].double()
        new = embeddings.detach().double()
        self.sum.add_(new.sum(0) - old.sum(0))
        self.sumsq.add_((new * new).sum(0) - (old * old).sum(0))
        buffer.enqueue(embeddings, labels)
        self.batch_ids[slots] = step
        self.sample_ids[slots] = sample_ids.to(self.sample_ids.device, torch.long)
