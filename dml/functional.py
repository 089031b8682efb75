"""Small functions shared by models and losses (a neutral module, so that neither imports the
other)."""

from __future__ import annotations

import torch


def lipschitz_normalize(v: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """n(v) = v if ||v|| <= 1 else v / ||v||: a 1-Lipschitz projection onto the unit ball (GSP's
    costs, CCP's embeddings and proxies)."""
    return v / v.norm(dim=dim, keepdim=True).clamp_min(1.0)
