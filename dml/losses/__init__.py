"""Loss terms: pytorch-metric-learning losses by name, the methods' own losses beside them, and
the pieces of the objective (``dml.objective``): the cross-batch memory, CCP's multi-proxy loss
and proximal term, GSP's zero-shot loss, IBC's cross-entropies."""

from dml.losses.ccp import MultiProxyLoss, ProximalTerm
from dml.losses.factory import (
    LOSSES,
    MINERS,
    build_loss,
    build_miner,
    loss_has_parameters,
    proxy_rows,
)
from dml.losses.ibc import IntraBatchConnections
from dml.losses.memory import CrossBatchMemoryLoss
from dml.losses.xbm import XBMContrastiveLoss
from dml.losses.zero_shot import ZeroShotPrototypeLoss

__all__ = [
    "LOSSES",
    "MINERS",
    "build_loss",
    "build_miner",
    "loss_has_parameters",
    "proxy_rows",
    "CrossBatchMemoryLoss",
    "IntraBatchConnections",
    "MultiProxyLoss",
    "ProximalTerm",
    "XBMContrastiveLoss",
    "ZeroShotPrototypeLoss",
]
