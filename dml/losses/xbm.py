"""The contrastive loss of the XBM paper (Wang et al., CVPR 2020; docs/methods/xbn.md, "XBM").

As the released ``ret_benchmark/losses/contrastive_loss.py`` computes it, for the n anchors i of
the batch and the reference rows j (the batch itself, or the whole memory), with s_ij the
cosine similarity:

    l_i = sum_{j: y_j = y_i, s_ij < 1 - eps} (1 - s_ij)  +  sum_{j: y_j != y_i, s_ij > m} s_ij
    L   = (1 / n) sum_i l_i                                    (m = 0.5, eps = 1e-5)

Sums over the pairs, not means: against a memory the term grows with the memory, which is how
the memory comes to dominate the gradient (pytorch-metric-learning's ContrastiveLoss averages
over the non-zero terms and is not this loss). Self-pairs, and exact duplicates of the anchor,
drop out through the s < 1 - eps filter. A negative contributes s, not s - m.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dml.errors import ConfigError


class XBMContrastiveLoss(nn.Module):
    """Args:
        margin: m, negatives with similarity above it are pushed down (0.5).
        epsilon: positives with similarity >= 1 - epsilon are left out (1e-5).
        normalize: compare L2-normalised vectors (cosine, the default; the XBM memory stores
            normalised embeddings, an XBN-matched memory need not be), or the raw dot product.

    Called as pytorch-metric-learning losses are: ``loss(embeddings, labels, None, ref_emb,
    ref_labels)``; without ``ref_emb`` the batch is its own reference. It takes no miner.
    """

    def __init__(self, margin: float = 0.5, epsilon: float = 1e-5, normalize: bool = True):
        super().__init__()
        self.margin, self.epsilon, self.normalize = margin, epsilon, normalize

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple=None,
        ref_emb: Optional[torch.Tensor] = None,
        ref_labels: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if indices_tuple is not None:
            raise ConfigError(
                "model.loss.miner: xbm_contrastive sums over all pairs; it "
                "takes no miner (set model.loss.miner: null)"
            )
        z = F.normalize(embeddings, dim=1) if self.normalize else embeddings
        if ref_emb is None:
            ref, ref_labels = z, labels
        else:
            ref = F.normalize(ref_emb, dim=1) if self.normalize else ref_emb
        sim = z @ ref.T.to(z.dtype)
        same = labels[:, None] == ref_labels[None, :]
        positive = same & (sim < 1 - self.epsilon)
        negative = ~same & (sim > self.margin)
        per_anchor = ((1 - sim) * positive).sum(1) + (sim * negative).sum(1)
        return per_anchor.sum() / max(len(z), 1)
