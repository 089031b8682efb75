"""Configuration groups of the model, as dataclasses: LightningCLI validates every YAML key
against them (an unknown key is an error naming it)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from dml.errors import ConfigError


@dataclass
class BackboneConfig:
    """name: resnet50 | resnet18 | bn_inception | small_cnn | timm:<timm model name> (e.g.
    timm:vit_small_patch16_224.dino); frozen_bn freezes every BatchNorm (none in a ViT);
    timm_args: keyword arguments for ``timm.create_model`` (img_size, drop_path_rate, ...).

    channels_last: run a convolutional backbone and its inputs in the NHWC memory format (the
    layout tensor cores and cuDNN's fastest convolutions want); None = on when training on
    CUDA, off on a CPU (``model.compile`` is the module's option)."""

    name: str = "resnet50"
    pretrained: bool = True
    frozen_bn: bool = False
    width: int = 32  # small_cnn only
    channels_last: Optional[bool] = None
    timm_args: Dict[str, Any] = field(default_factory=dict)


@dataclass
class PoolingConfig:
    """name: gap | gmp | gem | gsp | cls (a ViT's class token); params go to the pooling class
    ({p: 3.0} for GeM; {num_prototypes, mu, gamma, iters, tol, reduction, init, init_batches}
    for GSP)."""

    name: str = "gap"
    params: Dict[str, Any] = field(default_factory=dict)


@dataclass
class LossConfig:
    """A pytorch-metric-learning loss by name (or none: no metric loss, e.g. IBC's
    cross-entropy alone), its parameters, and an optional miner.

    proxies_per_class K > 0 turns a pair loss into CCP's multi-proxy loss
    (``dml.losses.ccp.MultiProxyLoss``): proxy_weight * l(z, proxies) + pair_weight * l(z, z),
    on embeddings and proxies normalised by ``normalize`` (lipschitz: v / max(1, ||v||); l2).

    gather: under DDP, the loss sees the global batch: embeddings and labels are gathered from
    every process (gradients flow back to their owners) and every process computes the same
    loss, so the averaged gradient equals one process's on the whole batch. Default: each
    process's loss covers its local batch (P x M of its own classes).
    """

    name: str = "multi_similarity"
    params: Dict[str, Any] = field(default_factory=dict)
    miner: Optional[str] = None
    miner_params: Dict[str, Any] = field(default_factory=dict)
    gather: bool = False
    proxies_per_class: int = 0
    proxy_weight: float = 1.0
    pair_weight: float = 0.1
    normalize: str = "lipschitz"


@dataclass
class ZeroShotConfig:
    """GSP's zero-shot prototype loss: total = metric_weight * metric + weight * zero-shot
    (0.9 / 0.1 in the MLRC configs). Needs a pooling with attributes (gsp)."""

    weight: float = 0.0
    metric_weight: float = 1.0
    lam: float = 0.05
    scale: float = 9.5


@dataclass
class IBCConfig:
    """IBC's message passing over the batch (``dml.losses.ibc``): L layers of H heads (outputs
    concatenated with ``concat``), label-smoothed cross-entropy at temperature tau on the
    backbone embedding and on the MPN output. ``gather``: under DDP, pass messages over the
    global batch (default: each process's local batch). ``pseudo_test``: evaluate on each
    sample's MPN output over its ``pseudo_test_k``-reciprocal neighbours instead of the
    backbone embedding. ``mpn_weight`` 0 keeps only the backbone's cross-entropy (the ablation
    without message passing)."""

    enabled: bool = False
    layers: int = 1
    heads: int = 2
    dropout: float = 0.1
    ff_hidden: int = 2048
    concat: bool = False
    tau: float = 0.2
    label_smoothing: float = 0.1
    mpn_weight: float = 1.0
    gather: bool = False
    pseudo_test: bool = False
    pseudo_test_k: int = 4


@dataclass
class MemoryConfig:
    """XBM's cross-batch memory (``dml.losses.memory``): with ``enabled``, from
    ``start_iteration`` on the loss adds weight * L(batch, memory) over the last ``size``
    embeddings; ``enqueue``: the batch is stored before (the released XBM trainer) or after its
    memory term; ``store``: normalized or raw embeddings. XBN's moment matching of the stored
    embeddings is the ``xbn:`` callback (``dml.callbacks.CrossBatchNormalization``).

    The term's own pair loss (``loss``, ``loss_params``: a name of ``dml.losses.LOSSES``) and
    pair selection (``miner``, ``miner_params``: a name of ``dml.losses.factory.MINERS`` or a
    class path) replace the objective's metric loss and miner for the memory term; by default
    it uses those. ``implementation``: the class path of a subclass of
    ``dml.losses.CrossBatchMemoryLoss`` (a memory variant), built with the settings here and
    its own ``params``."""

    enabled: bool = False
    size: int = 55000
    start_iteration: int = 1000
    weight: float = 1.0
    enqueue: str = "before"
    store: str = "normalized"
    loss: Optional[str] = None
    loss_params: Dict[str, Any] = field(default_factory=dict)
    miner: Optional[str] = None
    miner_params: Dict[str, Any] = field(default_factory=dict)
    implementation: Optional[str] = None
    params: Dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimizerConfig:
    """lr for pooling and head, lr * backbone_lr_mult for the backbone, loss_lr (default: lr)
    for loss parameters (proxies, GSP's zero-shot class embeddings). layer_decay (timm
    backbones): layer l of L gets the backbone's rate times layer_decay^(L - 1 - l) (BEiT's
    layer-wise decay; the last layer the full rate). scheduler: none | step (milestones, gamma) |
    cosine. warmup_epochs > 0: the rate rises linearly from 0 over that many epochs, then
    follows the scheduler, both per optimizer step (``dml.lr_schedule``)."""

    name: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 1e-4
    backbone_lr_mult: float = 1.0
    layer_decay: Optional[float] = None
    loss_lr: Optional[float] = None
    scheduler: str = "none"
    milestones: List[int] = field(default_factory=list)
    gamma: float = 0.1
    warmup_epochs: float = 0.0


@dataclass
class EvalConfig:
    """nmi: also cluster the embeddings (costly at SOP scale). backend: auto | rank | faiss |
    torch (``dml.metrics.retrieval_metrics``). rerank: re-rankings scored beside the plain
    metrics at test time (``dml.reranking``: k_reciprocal, alpha_qe), each with its parameters
    in rerank_params (e.g. ``{k_reciprocal: {k1: 20, k2: 6, lam: 0.3}}``)."""

    nmi: bool = True
    nmi_seed: int = 0
    backend: str = "auto"
    rerank: List[str] = field(default_factory=list)
    rerank_params: Dict[str, Dict[str, float]] = field(default_factory=dict)

    def __post_init__(self):
        from dml.reranking import RERANKERS, settings

        if isinstance(self.rerank, str):
            self.rerank = [self.rerank]
        for name in self.rerank:
            if name not in RERANKERS:
                raise ConfigError(
                    f"model.evaluation.rerank: unknown re-ranking {name!r}; "
                    f"expected {' or '.join(RERANKERS)}"
                )
        for name, params in self.rerank_params.items():
            if name not in self.rerank:
                raise ConfigError(
                    f"model.evaluation.rerank_params.{name}: {name} is not in "
                    f"model.evaluation.rerank {list(self.rerank)}; add it there "
                    f"or drop its parameters"
                )
            try:
                settings(name, params)
            except ValueError as error:
                raise ConfigError(f"model.evaluation.rerank_params.{name}: {error}") from None


# The values each setting takes: (low, high, whether low itself is allowed); None for no bound.
# A value outside (NaN too) is a ConfigError naming the key, before anything is built.
POSITIVE, NON_NEGATIVE = (0, None, False), (0, None, True)
AT_LEAST_ONE, FRACTION = (1, None, True), (0, 1, True)
RANGES: Dict[str, Dict[str, tuple]] = {
    "BackboneConfig": {"width": AT_LEAST_ONE},
    "LossConfig": {
        "proxies_per_class": NON_NEGATIVE,
        "proxy_weight": NON_NEGATIVE,
        "pair_weight": NON_NEGATIVE,
    },
    "ZeroShotConfig": {
        "weight": NON_NEGATIVE,
        "metric_weight": NON_NEGATIVE,
        "lam": POSITIVE,
        "scale": POSITIVE,
    },
    "IBCConfig": {
        "layers": AT_LEAST_ONE,
        "heads": AT_LEAST_ONE,
        "dropout": FRACTION,
        "ff_hidden": AT_LEAST_ONE,
        "tau": POSITIVE,
        "label_smoothing": FRACTION,
        "mpn_weight": NON_NEGATIVE,
        "pseudo_test_k": AT_LEAST_ONE,
    },
    "MemoryConfig": {"size": AT_LEAST_ONE, "start_iteration": NON_NEGATIVE, "weight": NON_NEGATIVE},
    "OptimizerConfig": {
        "lr": POSITIVE,
        "weight_decay": NON_NEGATIVE,
        "backbone_lr_mult": NON_NEGATIVE,
        "layer_decay": (0, 1, False),
        "loss_lr": POSITIVE,
        "gamma": POSITIVE,
        "warmup_epochs": NON_NEGATIVE,
    },
}


def in_range(value, low, high, low_allowed: bool) -> bool:
    """low < value (<= if low_allowed) and value <= high; False for NaN."""
    above = value >= low if low_allowed else value > low
    return bool(above and (high is None or value <= high))


def check_range(key: str, value, bounds: tuple) -> None:
    """A ConfigError naming ``key`` when ``value`` is outside ``bounds`` (see RANGES)."""
    low, high, low_allowed = bounds
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not in_range(value, low, high, low_allowed):
        want = (
            f"{'>=' if low_allowed else '>'} {low}"
            if high is None
            else f"in {'[' if low_allowed else '('}{low}, {high}]"
        )
        raise ConfigError(f"{key}: expected a value {want}, got {value}")


def check_ranges(key: str, config) -> None:
    """Every setting of a config group (``key``: its place, e.g. model.optimizer) in range."""
    for name, bounds in RANGES.get(type(config).__name__, {}).items():
        check_range(f"{key}.{name}", getattr(config, name), bounds)
    if isinstance(config, OptimizerConfig):
        for m in config.milestones:
            check_range(f"{key}.milestones", m, NON_NEGATIVE)


def as_config(cls, value):
    """A config group as its dataclass (checkpoints and some callers hand over plain dicts)."""
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        try:
            return cls(**value)
        except TypeError as error:
            raise ConfigError(f"{cls.__name__}: {error}") from error
    raise TypeError(f"expected {cls.__name__} or dict, got {type(value).__name__}")


def check_params(cls, params: Dict[str, Any], key: str, skip=("self",)) -> None:
    """Raise a ConfigError naming ``key`` if ``params`` holds a name ``cls`` does not take."""
    accepted = [n for n in inspect.signature(cls).parameters if n not in skip]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(
            f"{key}: unknown parameter(s) {unknown} for {cls.__name__}; accepted: {accepted}"
        )
