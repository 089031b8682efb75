"""The embedding head: a linear map to D dimensions, u = W f + b, and its L2 normalisation
z = u / ||u||. Both are returned: retrieval uses z; XBN can match moments of u."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn


class EmbeddingHead(nn.Module):
    def __init__(self, in_features: int, embedding_dim: int = 512):
        super().__init__()
        self.linear = nn.Linear(in_features, embedding_dim)
        nn.init.kaiming_normal_(self.linear.weight, mode="fan_out")
        nn.init.zeros_(self.linear.bias)

    def forward(self, pooled: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(raw u, normalised z), each (B, D)."""
        raw = self.linear(pooled)
        return raw, F.normalize(raw, dim=-1)
