"""Metric losses and miners chosen by name from pytorch-metric-learning.

Proxy- and classifier-based losses (ProxyAnchor, ProxyNCA, SoftTriple, normalized softmax) own
learnable parameters; ``loss_has_parameters`` tells the module to give them their own optimizer
group and learning rate.
"""

from __future__ import annotations

from typing import Any, Dict, NamedTuple, Optional

import torch
from pytorch_metric_learning import distances, losses, miners
from torch import nn

from dml.config import check_params
from dml.errors import ConfigError
from dml.losses.ccp import c1_contrastive, c2_contrastive
from dml.losses.xbm import XBMContrastiveLoss


class LossKind(NamedTuple):
    """A loss by name: its class (or builder) and whether it compares embeddings with proxies
    of its own (then it is built with ``num_classes`` and ``embedding_size``) rather than with
    each other (a pair loss, which a memory or CCP's multi-proxy wrapper can use)."""

    build: Any
    has_proxies: bool


# c1 / c2: CCP's two contrastive forms (dml.losses.ccp); xbm_contrastive: the XBM paper's
# (dml.losses.xbm); the rest are pytorch-metric-learning's.
LOSSES: Dict[str, LossKind] = {
    name: LossKind(*kind)
    for name, kind in {
        "contrastive": (losses.ContrastiveLoss, False),
        "xbm_contrastive": (XBMContrastiveLoss, False),
        "c1": (c1_contrastive, False),
        "c2": (c2_contrastive, False),
        "multi_similarity": (losses.MultiSimilarityLoss, False),
        "triplet": (losses.TripletMarginLoss, False),
        "proxy_anchor": (losses.ProxyAnchorLoss, True),
        "proxy_nca": (losses.ProxyNCALoss, True),
        "soft_triple": (losses.SoftTripleLoss, True),
        "normalized_softmax": (losses.NormalizedSoftmaxLoss, True),
    }.items()
}


def pair_losses() -> list:
    """The names of the losses that compare embeddings with each other (no proxies)."""
    return sorted(name for name, kind in LOSSES.items() if not kind.has_proxies)


def has_proxies(name: str) -> bool:
    """Whether loss ``name`` compares embeddings with proxies of its own."""
    return name in LOSSES and LOSSES[name].has_proxies


MINERS: Dict[str, type] = {
    "multi_similarity": miners.MultiSimilarityMiner,
    "triplet_margin": miners.TripletMarginMiner,
    "batch_hard": miners.BatchHardMiner,
    "pair_margin": miners.PairMarginMiner,
}


def build_loss(
    name: str, num_classes: int, embedding_dim: int, params: Optional[Dict[str, Any]] = None
) -> Optional[nn.Module]:
    """The loss ``name`` (None for "none")."""
    params = dict(params or {})
    if name == "none":
        if params:
            raise ConfigError(f"model.loss.params: loss none takes no parameters, got {params}")
        return None
    if "distance" in params:
        params["distance"] = build_distance(params["distance"])
    if name not in LOSSES:
        raise ConfigError(
            f"model.loss.name: unknown loss {name!r}; expected one of {sorted(LOSSES) + ['none']}"
        )
    cls, needs_classes = LOSSES[name]  # a proxy loss is built for the classes
    skip = ("self", "num_classes", "embedding_size", "kwargs")
    check_params(
        cls, {k: v for k, v in params.items() if k != "distance"}, "model.loss.params", skip=skip
    )
    if needs_classes:
        if num_classes is None or num_classes < 2:
            raise ConfigError(
                f"model.loss: {name} needs the number of training classes (got {num_classes})"
            )
        return cls(num_classes=num_classes, embedding_size=embedding_dim, **params)
    return cls(**params)


DISTANCES = {
    "cosine": distances.CosineSimilarity,
    "euclidean": distances.LpDistance,
    "dot": distances.DotProductSimilarity,
}


def build_distance(name: str):
    """``model.loss.params.distance`` as a name: cosine, euclidean or dot."""
    if name not in DISTANCES:
        raise ConfigError(
            f"model.loss.params.distance: unknown distance {name!r}; expected one "
            f"of {sorted(DISTANCES)}"
        )
    return DISTANCES[name]()


def build_miner(
    name: Optional[str], params: Optional[Dict[str, Any]] = None, key: str = "model.loss.miner"
):
    if name is None:
        return None
    params = dict(params or {})
    if name not in MINERS:
        raise ConfigError(
            f"{key}: unknown miner {name!r}; expected one of {sorted(MINERS)} or null"
        )
    check_params(MINERS[name], params, f"{key}_params", skip=("self", "kwargs"))
    return MINERS[name](**params)


def loss_has_parameters(loss: nn.Module) -> bool:
    return any(p.requires_grad for p in loss.parameters())


def proxy_rows(loss: nn.Module):
    """The loss's class representatives as rows (C', D), or None: ProxyAnchor / ProxyNCA
    proxies, SoftTriple centres, normalized-softmax classifier weights."""
    for name in ("proxies", "W", "fc"):
        weight = getattr(loss, name, None)
        if isinstance(weight, torch.Tensor) and weight.ndim == 2:
            return weight.detach() if name == "proxies" else weight.detach().T
    return None
