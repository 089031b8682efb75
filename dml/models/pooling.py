"""Global pooling of a feature map (B, C, H, W) into one vector per image (B, C).

- GAP: f = (1/n) sum_i x_i, n = H * W.
- GMP: f = max_i x_i (per channel).
- GeM: f = ((1/n) sum_i x_i^p)^(1/p), learnable p (Radenovic et al., 2018).

Every pooling module is called as ``pooling(feature_map, projection=head_linear)`` and returns a
``PoolingOutput``, so that learnable poolings (GSP, ``dml.models.gsp``) can compute their costs in
the embedding space and hand their per-location weights and per-image attributes to losses and
dashboards without re-running.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from torch import nn

from dml.config import check_params
from dml.errors import ConfigError


@dataclass
class PoolingOutput:
    """pooled: (B, C). weights: (B, H*W) per-location weights or None. attributes: (B, m) or None."""

    pooled: torch.Tensor
    weights: Optional[torch.Tensor] = None
    attributes: Optional[torch.Tensor] = None


class GAP(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()

    def forward(self, x: torch.Tensor, projection=None) -> PoolingOutput:
        return PoolingOutput(x.mean(dim=(2, 3)))


class GMP(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()

    def forward(self, x: torch.Tensor, projection=None) -> PoolingOutput:
        return PoolingOutput(x.amax(dim=(2, 3)))


class GeM(nn.Module):
    def __init__(self, in_channels: int, p: float = 3.0, learn_p: bool = True, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)), requires_grad=learn_p)
        self.eps = eps

    def forward(self, x: torch.Tensor, projection=None) -> PoolingOutput:
        pooled = x.clamp_min(self.eps).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)
        return PoolingOutput(pooled)


def _poolings() -> Dict[str, type]:
    from dml.models.gsp import GSP
    return {"gap": GAP, "gmp": GMP, "gem": GeM, "gsp": GSP}


POOLING_NAMES = ("gap", "gmp", "gem", "gsp")


def build_pooling(name: str, in_channels: int, params: Optional[Dict[str, Any]] = None,
                  embedding_dim: Optional[int] = None) -> nn.Module:
    params = dict(params or {})
    poolings = _poolings()
    if name not in poolings:
        raise ConfigError(f"model.pooling.name: unknown pooling {name!r}; expected one of "
                          f"{sorted(poolings)}")
    cls = poolings[name]
    check_params(cls, params, "model.pooling.params", skip=("self", "in_channels",
                                                            "embedding_dim"))
    if name == "gsp" and embedding_dim is not None:
        params["embedding_dim"] = embedding_dim
    return cls(in_channels, **params)
