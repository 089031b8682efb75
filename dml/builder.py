"""Builds the model's parts from its config, and holds every check that spans parts.

image -> backbone -> pooling -> head -> objective (all loss terms) -> optimizer

The head is ``EmbeddingHead`` (a linear map to ``model.embedding_dim``), or none
(``PooledFeatures``, ``model.embedding_dim: null``: the pooled feature is the embedding).

``build_parts(...)`` returns the backbone, the pooling, the head and the objective
(``dml.objective.Objective``); ``DMLModule`` is handed them. Poolings are chosen by name in
``POOLINGS`` or by class path (``model.pooling.name: mypackage.MyPooling``); losses by name in
``dml.losses.factory.LOSSES``; extra objective terms by class path (``model.terms``).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Dict, Optional

from torch import nn

from dml.config import (
    BackboneConfig,
    IBCConfig,
    LossConfig,
    MemoryConfig,
    PoolingConfig,
    ZeroShotConfig,
    check_params,
)
from dml.errors import ConfigError
from dml.losses import (
    CrossBatchMemoryLoss,
    IntraBatchConnections,
    MultiProxyLoss,
    ProximalTerm,
    ZeroShotPrototypeLoss,
    build_loss,
    build_miner,
)
from dml.losses.factory import MINERS, has_proxies, pair_losses
from dml.models import (
    GAP,
    GMP,
    GSP,
    Backbone,
    ClassToken,
    EmbeddingHead,
    GeM,
    MessagePassingNetwork,
    PooledFeatures,
)
from dml.objective import Objective

POOLINGS: Dict[str, type] = {"gap": GAP, "gmp": GMP, "gem": GeM, "gsp": GSP, "cls": ClassToken}


@dataclass
class ModelParts:
    backbone: nn.Module
    pooling: nn.Module
    head: nn.Module
    objective: Objective


def build_pooling(
    name: str,
    in_channels: int,
    params: Optional[Dict[str, Any]] = None,
    embedding_dim: Optional[int] = None,
) -> nn.Module:
    """A pooling by name; ``embedding_dim`` goes to poolings that take it (GSP)."""
    params = dict(params or {})
    if name in POOLINGS:
        cls = POOLINGS[name]
    elif "." in name:
        cls = import_class(name, "model.pooling.name")
    else:
        raise ConfigError(
            f"model.pooling.name: unknown pooling {name!r}; expected one of "
            f"{sorted(POOLINGS)} or a class path (package.module.Class)"
        )
    check_params(cls, params, "model.pooling.params", skip=("self", "in_channels", "embedding_dim"))
    if embedding_dim is not None and "embedding_dim" in inspect.signature(cls).parameters:
        params["embedding_dim"] = embedding_dim
    return cls(in_channels, **params)


def import_class(path: str, key: str) -> type:
    """``package.module.Class`` -> the class, or a ConfigError naming ``key``."""
    module_name, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError(f"{key}: cannot import {path!r} ({error})") from error


def terms_by_name(specs: Any) -> Dict[str, Optional[Dict[str, Any]]]:
    """``model.terms`` as a mapping {name: {class_path, init_args}}; the list of checkpoints
    written before terms had names (``[{class_path, init_args, name}]``) is read as one, each
    named by its ``name`` or class."""
    if specs is None:
        return {}
    if isinstance(specs, dict):
        for name in specs:
            if not isinstance(name, str) or not name.isidentifier():
                raise ConfigError(
                    f"model.terms: a term's name must be a word (letters, digits, _), got {name!r}"
                )
        return dict(specs)
    if isinstance(specs, (list, tuple)):  # the layout before names
        named: Dict[str, Optional[Dict[str, Any]]] = {}
        for spec in specs:
            spec = dict(spec) if isinstance(spec, dict) else {"class_path": spec}
            name = spec.pop("name", None) or str(spec.get("class_path", "")).rpartition(".")[2]
            named[name] = spec
        return named
    raise ConfigError(
        f"model.terms: expected a mapping {{name: {{class_path: "
        f"package.module.Class, init_args: {{...}}}}}}, got {specs!r}"
    )


def build_terms(specs: Any, embedding_dim: int, num_classes: Optional[int]) -> Dict[str, nn.Module]:
    """Objective terms by class path, by name:
    ``model.terms: {name: {class_path: package.module.Class, init_args: {...}}}``; a later
    config file or ``--model.terms.<name>.init_args.<arg>`` adds a term or sets one argument,
    ``model.terms.<name>: null`` removes one. A term is an ``nn.Module`` whose
    ``forward(embedded, labels, objective)`` returns named loss values; ``embedding_dim`` and
    ``num_classes`` are passed when its ``__init__`` takes them; its parameters train in its
    ``param_group`` ("loss" unless it says otherwise)."""
    terms: Dict[str, nn.Module] = {}
    for name, spec in terms_by_name(specs).items():
        key = f"model.terms.{name}"
        if spec is None:  # removed by a later config
            continue
        if not isinstance(spec, dict) or "class_path" not in spec:
            raise ConfigError(
                f"{key}: expected {{class_path: package.module.Class, "
                f"init_args: {{...}}}}, got {spec!r}"
            )
        unknown = sorted(set(spec) - {"class_path", "init_args"})
        if unknown:
            raise ConfigError(f"{key}: unknown key(s) {unknown}; expected class_path, init_args")
        cls = import_class(spec["class_path"], f"{key}.class_path")
        args = dict(spec.get("init_args") or {})
        accepted = inspect.signature(cls).parameters
        for arg, value in (("embedding_dim", embedding_dim), ("num_classes", num_classes)):
            if arg in accepted and arg not in args:
                args[arg] = value
        check_params(cls, args, f"{key}.init_args")
        terms[name] = cls(**args)
    return terms


def build_memory(
    memory: MemoryConfig, embedding_dim: int, num_classes: Optional[int]
) -> CrossBatchMemoryLoss:
    """The memory term: ``CrossBatchMemoryLoss`` or the subclass ``model.memory.implementation``
    names, with its own loss and miner when the config names them."""
    cls = CrossBatchMemoryLoss
    if memory.implementation:
        cls = import_class(memory.implementation, "model.memory.implementation")
        if not (isinstance(cls, type) and issubclass(cls, CrossBatchMemoryLoss)):
            raise ConfigError(
                f"model.memory.implementation: {memory.implementation} is not a "
                f"subclass of dml.losses.CrossBatchMemoryLoss"
            )
    elif memory.params:
        raise ConfigError(
            "model.memory.params: only a memory class of model.memory.implementation takes params"
        )
    check_params(
        cls,
        memory.params,
        "model.memory.params",
        skip=(
            "self",
            "dim",
            "size",
            "start_iteration",
            "weight",
            "enqueue",
            "store",
            "loss",
            "miner",
        ),
    )
    loss = None
    if memory.loss:
        if memory.loss not in pair_losses():
            raise ConfigError(
                f"model.memory.loss: {memory.loss!r} is not a pair loss; "
                f"expected one of {pair_losses()}"
            )
        loss = build_loss(memory.loss, num_classes, embedding_dim, memory.loss_params)
    miner = None
    if memory.miner:
        if memory.miner in MINERS:
            miner = build_miner(memory.miner, memory.miner_params, "model.memory.miner")
        elif "." in memory.miner:
            miner_cls = import_class(memory.miner, "model.memory.miner")
            check_params(miner_cls, memory.miner_params, "model.memory.miner_params")
            miner = miner_cls(**memory.miner_params)
        else:
            raise ConfigError(
                f"model.memory.miner: unknown miner {memory.miner!r}; expected one "
                f"of {sorted(MINERS)} or a class path"
            )
    return cls(
        embedding_dim,
        memory.size,
        memory.start_iteration,
        memory.weight,
        memory.enqueue,
        memory.store,
        loss=loss,
        miner=miner,
        **memory.params,
    )


def build_parts(
    backbone: BackboneConfig,
    pooling: PoolingConfig,
    embedding_dim: Optional[int],
    loss: LossConfig,
    zero_shot: ZeroShotConfig,
    ibc: IBCConfig,
    memory: MemoryConfig,
    num_classes: Optional[int],
    terms: Optional[Dict[str, Any]] = None,
) -> ModelParts:
    """``embedding_dim`` None: no head (``PooledFeatures``), the embedding is the pooled
    backbone feature, of the backbone's width (what ``test --zero-shot`` evaluates); the
    objective is built for that width."""
    net = Backbone(
        backbone.name, backbone.pretrained, backbone.frozen_bn, backbone.width, backbone.timm_args
    )
    dim = net.out_channels if embedding_dim is None else embedding_dim
    pool = build_pooling(pooling.name, net.out_channels, pooling.params, dim)
    if getattr(pool, "uses_class_token", False) and not net.has_class_token:
        raise ConfigError(
            f"model.pooling.name: {pooling.name} pools the class token; backbone "
            f"{backbone.name!r} has none (a timm ViT has one)"
        )
    if embedding_dim is None and getattr(pool, "uses_projection", False):
        raise ConfigError(
            f"model.pooling.name: {pooling.name} computes its costs through the "
            f"embedding head's linear map, and model.embedding_dim: null (no "
            f"head, as test --zero-shot sets) has none; pool with gap, gmp, gem "
            f"or cls, or give an embedding_dim"
        )
    head = (
        PooledFeatures(net.out_channels)
        if embedding_dim is None
        else EmbeddingHead(net.out_channels, embedding_dim)
    )
    objective = build_objective(
        loss, zero_shot, ibc, memory, pool, dim, num_classes, build_terms(terms, dim, num_classes)
    )
    return ModelParts(net, pool, head, objective)


def build_objective(
    loss: LossConfig,
    zero_shot: ZeroShotConfig,
    ibc: IBCConfig,
    memory: MemoryConfig,
    pooling: nn.Module,
    embedding_dim: int,
    num_classes: Optional[int],
    terms: Optional[Dict[str, nn.Module]] = None,
) -> Objective:
    metric = build_loss(loss.name, num_classes, embedding_dim, loss.params)
    miner = build_miner(loss.miner, loss.miner_params)
    if miner is not None and loss.name == "xbm_contrastive":
        raise ConfigError(
            "model.loss.miner: xbm_contrastive sums over all pairs; it takes no "
            "miner (set model.loss.miner: null)"
        )
    proximal = None
    if loss.proxies_per_class > 0:
        if metric is None or has_proxies(loss.name) or loss.name == "xbm_contrastive":
            why = (
                "already has its own proxies"
                if has_proxies(loss.name)
                else "is not a pytorch-metric-learning pair loss (CCP compares with proxies "
                "through its distance and reference rows)"
                if metric is not None
                else "is no loss"
            )
            raise ConfigError(
                f"model.loss.proxies_per_class: {loss.name} {why}; multi-proxy "
                f"CCP needs one of c1, c2, multi_similarity, triplet, contrastive"
            )
        metric = MultiProxyLoss(
            metric,
            num_classes,
            loss.proxies_per_class,
            embedding_dim,
            loss.proxy_weight,
            loss.pair_weight,
            loss.normalize,
        )
        proximal = ProximalTerm()
    zero_shot_loss = None
    if zero_shot.weight > 0:
        if not getattr(pooling, "produces_attributes", False):
            raise ConfigError(
                "model.zero_shot.weight > 0 needs attribute vectors: a pooling "
                "that produces them (model.pooling.name: gsp)"
            )
        if num_classes is None:
            raise ConfigError("model.zero_shot needs the number of training classes")
        zero_shot_loss = ZeroShotPrototypeLoss(
            num_classes, embedding_dim, zero_shot.lam, zero_shot.scale
        )
    ibc_term = None
    if ibc.enabled:
        if num_classes is None or num_classes < 2:
            raise ConfigError("model.ibc needs the number of training classes")
        mpn = MessagePassingNetwork(
            embedding_dim, ibc.layers, ibc.heads, ibc.dropout, ibc.ff_hidden, ibc.concat
        )
        ibc_term = IntraBatchConnections(
            mpn, embedding_dim, num_classes, ibc.tau, ibc.label_smoothing, ibc.mpn_weight
        )
    memory_loss = None
    if memory.enabled:
        if metric is None:
            raise ConfigError(
                "model.memory.enabled needs a pair loss to compare the batch "
                "with the memory; model.loss.name is none"
            )
        if has_proxies(loss.name) and loss.proxies_per_class == 0:
            pair = pair_losses()
            raise ConfigError(
                f"model.memory.enabled: {loss.name} compares embeddings with its "
                f"own proxies, not with stored embeddings; the memory needs a pair "
                f"loss as model.loss.name (one of {pair}), optionally with "
                f"model.loss.proxies_per_class > 0 (CCP)"
            )
        memory_loss = build_memory(memory, embedding_dim, num_classes)
    if metric is None and ibc_term is None and zero_shot_loss is None and not terms:
        raise ConfigError(
            "model.loss.name: none leaves nothing to train; enable model.ibc or "
            "model.zero_shot, add model.terms, or name a loss"
        )
    return Objective(
        metric_loss=metric,
        miner=miner,
        metric_weight=zero_shot.metric_weight,
        gather=loss.gather,
        memory=memory_loss,
        ibc=ibc_term,
        ibc_gather=ibc.gather,
        zero_shot=zero_shot_loss,
        zero_shot_weight=zero_shot.weight,
        proximal=proximal,
        terms=terms,
    )


def check_batch_composition(
    loss: LossConfig,
    memory: MemoryConfig,
    ibc: IBCConfig,
    zero_shot_weight: float,
    has_terms: bool,
    classes_per_batch: int,
    samples_per_class: int,
) -> None:
    """A ConfigError where the batch's P x M composition leaves a pair loss nothing to learn
    from: one image per class (no positive pair: multi-similarity and triplet are exactly 0,
    a contrastive loss only pushes apart) or one class per batch (no negative pair), with no
    proxies, memory or other term to supply them."""
    pair_only = (
        loss.name != "none"
        and not has_proxies(loss.name)
        and loss.proxies_per_class == 0
        and not memory.enabled
        and not ibc.enabled
        and zero_shot_weight == 0
        and not has_terms
    )
    if not pair_only:
        return
    if samples_per_class < 2:
        raise ConfigError(
            f"data.init_args.samples_per_class: {samples_per_class} image per class in a batch "
            f"gives {loss.name} no positive pair (the loss is 0 or only pushes apart); use "
            f"samples_per_class >= 2, a proxy loss, or the cross-batch memory"
        )
    if classes_per_batch < 2:
        raise ConfigError(
            f"data.init_args.classes_per_batch: one class in a batch gives {loss.name} no "
            f"negative pair; use classes_per_batch >= 2"
        )
