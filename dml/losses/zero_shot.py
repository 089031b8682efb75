"""GSP's zero-shot prototype loss (docs/methods/gsp.md, "Zero-shot prototype loss").

The batch is split into two halves holding disjoint classes (by label, not by position). On
one half, ridge regression maps attribute vectors A (n1, m) to the learnable embeddings
Y = E[labels] (n1, d) of their classes:
    w = A^T (A A^T + lambda I)^-1 Y          (m, d), lambda = 0.05,
and predicts the other half's class embeddings Y^ = A' w. Logits s * <E_c, Y^> over all C
classes (s = 9.5, margin 0, both vectors unnormalised as in the released code) and the
negative log-probability of the true class; both directions, averaged.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn


def split_by_label(labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two boolean masks over the batch: classes alternate between halves in sorted order."""
    classes = torch.unique(labels)  # sorted
    first = classes[0::2]
    in_first = torch.isin(labels, first)
    return in_first, ~in_first


def ridge_weights(a: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """w = A^T (A A^T + lambda I)^-1 Y, the ridge solution in its kernel (dual) form."""
    gram = a @ a.T + lam * torch.eye(len(a), device=a.device, dtype=a.dtype)
    return a.T @ torch.linalg.solve(gram, y)


class ZeroShotPrototypeLoss(nn.Module):
    def __init__(self, num_classes: int, embedding_dim: int, lam: float = 0.05, scale: float = 9.5):
        super().__init__()
        self.class_embeddings = nn.Parameter(
            torch.randn(num_classes, embedding_dim) / embedding_dim**0.5
        )
        self.lam, self.scale = lam, scale

    def _one_way(self, a_fit, y_fit, a_eval, labels_eval):
        w = ridge_weights(a_fit, y_fit, self.lam)
        logits = self.scale * (a_eval @ w) @ self.class_embeddings.T
        return F.cross_entropy(logits, labels_eval)

    def forward(self, attributes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        attributes = attributes.float()
        first, second = split_by_label(labels)
        if not first.any() or not second.any():
            return attributes.sum() * 0.0  # one class in the batch: nothing to predict
        e = self.class_embeddings
        loss_12 = self._one_way(
            attributes[first], e[labels[first]], attributes[second], labels[second]
        )
        loss_21 = self._one_way(
            attributes[second], e[labels[second]], attributes[first], labels[first]
        )
        return 0.5 * (loss_12 + loss_21)
