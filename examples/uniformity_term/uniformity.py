"""A loss term in one file: the uniformity loss of Wang & Isola, "Understanding Contrastive
Representation Learning through Alignment and Uniformity on the Hypersphere" (ICML 2020).

For the n L2-normalised embeddings z_1..z_n of the batch (``embedded["embeddings"]``, the
objective's public key; normalised here again, which changes nothing for unit rows) and t > 0:

    L_uniform = log( 1/(n (n - 1)) sum_{i != j} exp(-t ||z_i - z_j||^2) )

the log of the mean Gaussian potential over the pairs of distinct rows: lowest (down to -4t)
when the rows spread over the sphere, 0 when they all coincide. t = 2 is the paper's. It is
computed as logsumexp over the off-diagonal pairs - log(n (n - 1)), so that a batch whose rows
are far apart does not underflow to log(0). With fewer than 2 rows there is no pair: the term
is a zero that keeps the graph (not NaN). The term returns ``{"uniformity": weight *
L_uniform}`` (logged as ``train/loss_uniformity``). Under DDP it sees each process's batch.

Use it with ``examples/uniformity_term/uniformity.yaml`` and this folder on ``PYTHONPATH``
(docs/extending.md).
"""

import math

import torch
from torch import nn


def uniformity(z: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """L_uniform of the rows of ``z`` (n, D), normalised first; a zero with a graph if n < 2."""
    n = z.shape[0]
    if n < 2:
        return z.sum() * 0.0
    z = nn.functional.normalize(z, dim=1)
    norms = (z * z).sum(1)
    squared = (norms[:, None] + norms[None, :] - 2 * z @ z.T).clamp_min(0)  # ||z_i - z_j||^2
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=z.device)
    return torch.logsumexp(-t * squared[off_diagonal], dim=0) - math.log(n * (n - 1))


class UniformityTerm(nn.Module):
    """An objective term (``model.terms``). Args: ``t`` (2, the paper's) and ``weight``."""

    def __init__(self, t: float = 2.0, weight: float = 1.0):
        super().__init__()
        if t <= 0:
            raise ValueError(f"UniformityTerm: t must be > 0, got {t}")
        self.t, self.weight = t, weight

    def forward(self, embedded, labels, objective):
        return {"uniformity": self.weight * uniformity(embedded["embeddings"], self.t)}
