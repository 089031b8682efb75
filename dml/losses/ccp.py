"""CCP's multi-proxy losses (Gurbuz, Can, Alatan; docs/methods/ccp.md).

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

``ProximalTerm`` is the objective's (lambda / 2) ||theta - theta_prev||^2. The projection rounds
(``dml.callbacks.ccp``) decide when a round ends; they move theta_prev and lambda through
``ProximalTerm.anchor`` and replace the proxies through ``MultiProxyLoss.pick`` / ``set_proxies``.
``greedy_k_center`` (the proxy selection) is re-exported here.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch
from pytorch_metric_learning import distances, losses, reducers
from torch import nn

from dml.errors import ConfigError
from dml.functional import lipschitz_normalize
from dml.selection import greedy_k_center, greedy_k_center_batched

__all__ = [
    "MultiProxyLoss",
    "PerAnchorSumReducer",
    "ProximalTerm",
    "c1_contrastive",
    "c2_contrastive",
    "greedy_k_center",
    "greedy_k_center_batched",
    "lipschitz_normalize",
    "unnormalized",
]


class PerAnchorSumReducer(reducers.BaseReducer):
    """Sum of the per-pair (or per-element) losses divided by the number of anchors."""

    def element_reduction(self, losses, loss_indices, embeddings, labels):
        return losses.sum() / max(len(embeddings), 1)

    pos_pair_reduction = neg_pair_reduction = triplet_reduction = element_reduction


def c1_contrastive(margin: float = 0.5, distance=None) -> losses.ContrastiveLoss:
    """C1: sum_pos (1 - s) + sum_neg [s - margin]_+, over the number of anchors."""
    return losses.ContrastiveLoss(
        pos_margin=1.0,
        neg_margin=margin,
        distance=distance if distance is not None else distances.CosineSimilarity(),
        reducer=PerAnchorSumReducer(),
    )


def c2_contrastive(
    pos_margin: float = 0.0, neg_margin: float = 0.5, distance=None
) -> losses.ContrastiveLoss:
    """C2: [d - m+]_+ and [m- - d]_+ on L2 distance, each averaged over its non-zero terms."""
    return losses.ContrastiveLoss(
        pos_margin=pos_margin,
        neg_margin=neg_margin,
        distance=distance if distance is not None else distances.LpDistance(),
    )


def unnormalized(distance):
    """The same distance without the input normalisation (cosine -> dot product)."""
    if isinstance(distance, distances.DotProductSimilarity):  # CosineSimilarity included
        return distances.DotProductSimilarity(normalize_embeddings=False)
    if isinstance(distance, distances.LpDistance):
        return distances.LpDistance(p=distance.p, power=distance.power, normalize_embeddings=False)
    raise ConfigError(
        f"model.loss: the Lipschitz normalisation needs a dot-product or Lp "
        f"distance, got {type(distance).__name__}"
    )


class MultiProxyLoss(nn.Module):
    """L = proxy_weight * l(n(z), n(P)) + pair_weight * l(n(z), n(z)) with K proxies per class.

    ``proxies`` (C*K, D) hold class c's K proxies in rows c*K .. c*K+K-1; ``proxy_labels`` the
    matching class ids. Input embeddings are the head's raw output: n() is applied here.
    ``initialized`` is set once the proxies were picked from sample embeddings (the CCP
    callback), so a resumed run does not pick them again.
    """

    takes_raw_embeddings = True

    def __init__(
        self,
        base: nn.Module,
        num_classes: int,
        per_class: int,
        embedding_dim: int,
        proxy_weight: float = 1.0,
        pair_weight: float = 0.1,
        normalize: str = "lipschitz",
    ):
        super().__init__()
        if per_class < 1:
            raise ConfigError(f"model.loss.proxies_per_class must be >= 1, got {per_class}")
        if num_classes is None or num_classes < 2:
            raise ConfigError(
                f"model.loss: proxies need the number of training classes (got {num_classes})"
            )
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
            torch.randn(num_classes * per_class, embedding_dim) * math.sqrt(2.0 / embedding_dim)
        )
        self.register_buffer("proxy_labels", torch.arange(num_classes).repeat_interleave(per_class))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def project(self, v: torch.Tensor) -> torch.Tensor:
        if self.normalize == "lipschitz":
            return lipschitz_normalize(v, dim=-1)
        return torch.nn.functional.normalize(v, dim=-1)

    def class_proxies(self) -> torch.Tensor:
        """The proxies as (C, K, D): class c's K proxies in row c."""
        return self.proxies.view(self.num_classes, self.per_class, -1)

    @torch.no_grad()
    def pick(self, pool: torch.Tensor, seeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """New proxies (C*K, D): for each class, K greedy k-center picks among its candidate
        embeddings ``pool`` (C, P, D), seeded with ``seeds`` (C*K, D; the origin if None)."""
        if seeds is None:
            seed_rows = torch.zeros(self.num_classes, 1, pool.shape[-1], device=pool.device)
        else:
            seed_rows = seeds.view(self.num_classes, self.per_class, -1).to(pool.device)
        picks = greedy_k_center_batched(pool, self.per_class, seed_rows)
        chosen = pool.gather(1, picks.unsqueeze(-1).expand(-1, -1, pool.shape[-1]))
        return chosen.reshape(-1, pool.shape[-1])

    @torch.no_grad()
    def set_proxies(self, rows: torch.Tensor) -> None:
        """Replace every proxy (C*K, D) and mark them picked (a resumed run keeps them)."""
        self.proxies.copy_(rows.to(self.proxies))
        self.initialized.fill_(True)

    def named_values(
        self, embeddings: torch.Tensor, labels: torch.Tensor, indices_tuple=None
    ) -> Dict[str, torch.Tensor]:
        """{"proxy": w_P * l(z, P), "pair": w_B * l(z, z)} (the pair term only if w_B > 0)."""
        z = self.project(embeddings)
        out = {
            "proxy": self.proxy_weight
            * self.base(z, labels, ref_emb=self.project(self.proxies), ref_labels=self.proxy_labels)
        }
        if self.pair_weight:
            out["pair"] = self.pair_weight * self.base(z, labels, indices_tuple)
        return out

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple=None,
        ref_emb: Optional[torch.Tensor] = None,
        ref_labels: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """With ``ref_emb`` (e.g. a cross-batch memory): the base loss against it; otherwise
        the sum of ``named_values``."""
        if ref_emb is not None:
            return self.base(
                self.project(embeddings), labels, indices_tuple, self.project(ref_emb), ref_labels
            )
        return sum(self.named_values(embeddings, labels, indices_tuple).values())


class ProximalTerm(nn.Module):
    """(lambda / 2) * sum ||theta - theta_prev||^2 over the network's trainable weights (CCP's
    proximal term; its gradient is lambda * (theta - theta_prev)).

    ``attach(parameters)`` gives it the network's named trainable parameters (a callable: the
    module's own, so that no part is left out); ``anchor(theta_prev, lam)`` moves the anchor
    (the CCP callback at a round's end). theta_prev is one flat buffer in the network's
    parameter order, empty until the first anchor; with lambda 0 the term is absent.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("theta_prev", torch.empty(0))
        self.register_buffer("lam", torch.zeros((), dtype=torch.float64))
        self._parameters_of: Optional[Callable[[], Iterator[Tuple[str, nn.Parameter]]]] = None

    def attach(self, parameters: Callable[[], Iterator[Tuple[str, nn.Parameter]]]) -> None:
        self._parameters_of = parameters

    def _params(self):
        if self._parameters_of is None:
            raise RuntimeError("ProximalTerm: attach() the network's parameters first")
        return list(self._parameters_of())

    @torch.no_grad()
    def anchor(self, theta: Dict[str, torch.Tensor], lam: float) -> None:
        """theta_prev <- ``theta`` (name -> tensor, every trainable network weight), lambda."""
        params = self._params()
        missing = [name for name, _ in params if name not in theta]
        if missing:
            raise ConfigError(
                f"ccp: theta_prev has no weights for {missing[:5]}; the network "
                f"changed since it was taken"
            )
        flat = torch.cat([theta[name].reshape(-1).to(p) for name, p in params])
        self.theta_prev = flat.to(self.lam.device)
        self.lam.fill_(float(lam))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "theta_prev"
        if key in state_dict:  # take the saved anchor's size (empty before the first round)
            self.theta_prev = torch.empty_like(state_dict[key], device=self.lam.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self) -> Optional[torch.Tensor]:
        if float(self.lam) <= 0 or self.theta_prev.numel() == 0:
            return None
        params = self._params()
        sizes = [p.numel() for _, p in params]
        if sum(sizes) != self.theta_prev.numel():
            raise ConfigError(
                f"ccp: theta_prev holds {self.theta_prev.numel()} values, the "
                f"network's trainable weights {sum(sizes)}; resume CCP with the "
                f"model configuration it was trained with"
            )
        anchors = torch.split(self.theta_prev, sizes)
        total = sum(
            ((p - a.view_as(p).to(p.dtype)) ** 2).sum() for (_, p), a in zip(params, anchors)
        )
        return 0.5 * float(self.lam) * total
