"""Metric losses: pytorch-metric-learning by name; the methods' own losses live beside it."""
from dml.losses.factory import (LOSSES, MINERS, build_loss, build_miner, loss_has_parameters,
                                proxy_rows)
from dml.losses.ccp import MultiProxyLoss
from dml.losses.xbm import XBMContrastiveLoss
from dml.losses.zero_shot import ZeroShotPrototypeLoss

__all__ = ["LOSSES", "MINERS", "build_loss", "build_miner", "loss_has_parameters", "proxy_rows",
           "MultiProxyLoss", "XBMContrastiveLoss", "ZeroShotPrototypeLoss"]
