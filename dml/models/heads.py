"""The embedding head: a linear map to D dimensions, then L2 normalisation, z = Wf / ||Wf||."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class EmbeddingHead(nn.Module):
    def __init__(self, in_features: int, embedding_dim: int = 512, normalize: bool = True):
        super().__init__()
        self.linear = nn.Linear(in_features, embedding_dim)
        self.normalize = normalize
        nn.init.kaiming_normal_(self.linear.weight, mode="fan_out")
        nn.init.zeros_(self.linear.bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        z = self.linear(pooled)
        return F.normalize(z, dim=-1) if self.normalize else z
