"""The embedding head: a linear map to D dimensions, u = W f + b, and its L2 normalisation
z = u / ||u||. Both are returned: retrieval uses z; XBN can match moments of u.

``model.embedding_dim: null`` means no head (``PooledFeatures``): u = f, the pooled backbone
feature itself (2048-d for a ResNet-50, 384 for a ViT-S), and z = f / ||f||. ``python -m dml
test --zero-shot`` evaluates a backbone that way, untrained (docs/evaluation.md).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


class EmbeddingHead(nn.Module):
    def __init__(self, in_features: int, embedding_dim: int = 512):
        super().__init__()
        self.linear = nn.Linear(in_features, embedding_dim)
        nn.init.kaiming_normal_(self.linear.weight, mode="fan_out")
        nn.init.zeros_(self.linear.bias)

    @property
    def in_features(self) -> int:
        return int(self.linear.in_features)

    @property
    def out_features(self) -> int:
        """D, the embedding's width."""
        return int(self.linear.out_features)

    def forward(self, pooled: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(raw u, normalised z), each (B, D)."""
        raw = self.linear(pooled)
        return raw, F.normalize(raw, dim=-1)


class PooledFeatures(nn.Module):
    """No head (``model.embedding_dim: null``): the embedding is the pooled feature, u = f,
    z = f / ||f||, of the backbone's width. It has no weights and no ``linear`` map (``linear``
    is None: a pooling that projects through the head, GSP, cannot go with it)."""

    linear: Optional[nn.Linear] = None

    def __init__(self, in_features: int):
        super().__init__()
        self.in_features = self.out_features = int(in_features)

    def forward(self, pooled: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(raw u = f, normalised z = f / ||f||), each (B, C)."""
        return pooled, F.normalize(pooled, dim=-1)
