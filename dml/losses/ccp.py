"""CCP's multi-proxy losses (Gurbuz, Can, Alatan; METHODS.md, "CCP").

Each class c owns K proxies p_{c,1..K}; a pair loss l is computed between the batch and all
C x K labelled proxies (the proxies are labelled reference embeddings of pytorch-metric-
learning's ``loss(z, y, ref_emb=P, ref_labels=y_P)``, exact for pair, triplet and MS losses,
whose anchors are the batch samples), plus the same loss within the batch:

    L = w_P * l(n(z), n(P)) + w_B * l(n(z), n(z))        (w_P = 1.0, w_B = 0.1)

with the Lipschitz normalisation n(v) = v if ||v|| <= 1 else v / ||v||. The distances then
compare the normalised vectors as they are (no second normalisation inside the distance): the
"cosine" losses (C1, MS) use the dot product, C2 and triplet the L2 distance. On unit vectors
these equal cosine similarity and normalised L2 distance.

The base losses, by name (``BASE_LOSSES``):
- ``c1``: contrastive on similarity s, sum over pairs of (1 - s) [positive] and
  [s - m]_+ [negative], divided by the number of anchors (the released code's "original
  contrastive", m = 0.5);
- ``c2``: contrastive on L2 distance d with margins, mean over the non-zero terms of
  [d - m+]_+ plus that of [m- - d]_+ (pytorch-metric-learning's ContrastiveLoss);
- ``multi_similarity`` (alpha, beta, lambda = ``base``) and ``triplet`` (margin): as in
  pytorch-metric-learning.

The proximal term and the projection rounds that re-initialise the proxies are in
``dml.callbacks.ccp``; ``greedy_k_center`` (the proxy selection) is re-exported here.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
from pytorch_metric_learning import distances, losses, reducers
from torch import nn

from dml.errors import ConfigError
from dml.models.gsp import lipschitz_normalize
from dml.selection import greedy_k_center, greedy_k_center_batched

__all__ = ["MultiProxyLoss", "PerAnchorSumReducer", "c1_contrastive", "c2_contrastive",
           "greedy_k_center", "greedy_k_center_batched", "lipschitz_normalize", "unnormalized"]


class PerAnchorSumReducer(reducers.BaseReducer):
    """Sum of the per-pair (or per-element) losses divided by the number of anchors."""

    def element_reduction(self, losses, loss_indices, embeddings, labels):
        return losses.sum() / max(len(embeddings), 1)

    pos_pair_reduction = neg_pair_reduction = triplet_reduction = element_reduction


def c1_contrastive(margin: float = 0.5, distance=None) -> losses.ContrastiveLoss:
    """C1: sum_pos (1 - s) + sum_neg [s - margin]_+, over the number of anchors."""
    return losses.ContrastiveLoss(
        pos_margin=1.0, neg_margin=margin,
        distance=distance if distance is not None else distances.CosineSimilarity(),
        reducer=PerAnchorSumReducer())


def c2_contrastive(pos_margin: float = 0.0, neg_margin: float = 0.5,
                   distance=None) -> losses.ContrastiveLoss:
    """C2: [d - m+]_+ and [m- - d]_+ on L2 distance, each averaged over its non-zero terms."""
    return losses.ContrastiveLoss(
        pos_margin=pos_margin, neg_margin=neg_margin,
        distance=distance if distance is not None else distances.LpDistance())


def unnormalized(distance):
    """The same distance without the input normalisation (cosine -> dot product)."""
    if isinstance(distance, distances.DotProductSimilarity):  # CosineSimilarity included
        return distances.DotProductSimilarity(normalize_embeddings=False)
    if isinstance(distance, distances.LpDistance):
        return distances.LpDistance(p=distance.p, power=distance.power,
                                    normalize_embeddings=False)
    raise ConfigError(f"model.loss: the Lipschitz normalisation needs a dot-product or Lp "
                      f"distance, got {type(distance).__name__}")


class MultiProxyLoss(nn.Module):
    """L = proxy_weight * l(n(z), n(P)) + pair_weight * l(n(z), n(z)) with K proxies per class.

    ``proxies`` (C*K, D) hold class c's K proxies in rows c*K .. c*K+K-1; ``proxy_labels`` the
    matching class ids. Input embeddings are the head's raw output: n() is applied here.
    ``initialized`` is set once the proxies were picked from sample embeddings (the CCP
    callback), so a resumed run does not pick them again.
    """

    takes_raw_embeddings = True

    def __init__(self, base: nn.Module, num_classes: int, per_class: int, embedding_dim: int,
                 proxy_weight: float = 1.0, pair_weight: float = 0.1,
                 normalize: str = "lipschitz"):
        super().__init__()
        if per_class < 1:
            raise ConfigError(f"model.loss.proxies_per_class must be >= 1, got {per_class}")
        if num_classes is None or num_classes < 2:
            raise ConfigError(f"model.loss: proxies need the number of training classes "
                              f"(got {num_classes})")
        if normalize not in ("lipschitz", "l2"):
            raise ConfigError(f"model.loss.normalize: expected lipschitz or l2, got {normalize!r}")
        self.base = base
        if normalize == "lipschitz":
            base.distance = unnormalized(base.distance)
        self.normalize = normalize
        self.num_classes, self.per_class = num_classes, per_class
        self.proxy_weight, self.pair_weight = proxy_weight, pair_weight
        # He-normal start, as in the released code; replaced by sample embeddings before
        # training when the CCP callback is on.
        self.proxies = nn.Parameter(
            torch.randn(num_classes * per_class, embedding_dim) * math.sqrt(2.0 / embedding_dim))
        self.register_buffer("proxy_labels",
                             torch.arange(num_classes).repeat_interleave(per_class))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def project(self, v: torch.Tensor) -> torch.Tensor:
        if self.normalize == "lipschitz":
            return lipschitz_normalize(v, dim=-1)
        return torch.nn.functional.normalize(v, dim=-1)

    def class_proxies(self) -> torch.Tensor:
        """The proxies as (C, K, D): class c's K proxies in row c."""
        return self.proxies.view(self.num_classes, self.per_class, -1)

    def parts(self, embeddings: torch.Tensor, labels: torch.Tensor,
              indices_tuple=None) -> Dict[str, torch.Tensor]:
        """{"proxy": w_P * l(z, P), "pair": w_B * l(z, z)} (the pair term only if w_B > 0)."""
        z = self.project(embeddings)
        out = {"proxy": self.proxy_weight * self.base(
            z, labels, ref_emb=self.project(self.proxies), ref_labels=self.proxy_labels)}
        if self.pair_weight:
            out["pair"] = self.pair_weight * self.base(z, labels, indices_tuple)
        return out

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, indices_tuple=None,
                ref_emb: Optional[torch.Tensor] = None,
                ref_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """With ``ref_emb`` (e.g. a cross-batch memory): the base loss against it; otherwise
        the sum of ``parts``."""
        if ref_emb is not None:
            return self.base(self.project(embeddings), labels, indices_tuple,
                             self.project(ref_emb), ref_labels)
        return sum(self.parts(embeddings, labels, indices_tuple).values())
