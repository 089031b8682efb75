"""A cross-batch memory (XBM, Wang et al. 2020): a ring buffer of detached embeddings and labels.

pytorch-metric-learning's ``CrossBatchMemory`` wraps a loss and owns its queue; here the stored
embeddings must be transformed in place at every step (XBN's moment matching) and be gathered
across processes, so the project keeps its own buffer. Its tensors are registered buffers:
they move with the module and are saved in checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn


class EmbeddingRingBuffer(nn.Module):
    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1:
            raise ValueError(f"memory size must be >= 1, got {size}")
        self.register_buffer("embeddings", torch.zeros(size, dim))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))
        # slot of the next write; number of valid entries
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return len(self.labels)

    def __len__(self) -> int:
        return int(self.count)

    def next_slots(self, n: int) -> torch.Tensor:
        """The slots the next ``n`` rows go to (n <= size): after the newest, wrapping around."""
        return (self.pointer + torch.arange(n, device=self.labels.device)) % self.size

    @torch.no_grad()
    def enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Write a batch after the newest entries, overwriting the oldest when full; returns
        the slots written."""
        embeddings, labels = embeddings.detach(), labels.detach()
        if len(embeddings) > self.size:  # only the newest `size` fit
            embeddings, labels = embeddings[-self.size :], labels[-self.size :]
        n = len(embeddings)
        slots = self.next_slots(n)
        self.embeddings[slots] = embeddings.to(self.embeddings.dtype)
        self.labels[slots] = labels.to(self.labels.device)
        self.pointer.copy_((self.pointer + n) % self.size)
        self.count.copy_(torch.clamp(self.count + n, max=self.size))
        return slots

    def valid(self):
        """(embeddings, labels) of the stored entries, oldest first."""
        n = int(self.count)
        if n < self.size:
            return self.embeddings[:n], self.labels[:n]
        order = (self.pointer + torch.arange(self.size, device=self.labels.device)) % self.size
        return self.embeddings[order], self.labels[order]
