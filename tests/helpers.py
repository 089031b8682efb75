"""Small models, data and trainers the tests share (tests/ is on the path: conftest.py lives
here)."""

import pytorch_lightning as pl
import torch
from torch import nn

from dml.data import SyntheticDataModule
from dml.models import Pooling, PoolingOutput
from dml.module import BackboneConfig, DMLModule, OptimizerConfig


def small_module(**kw):
    kw.setdefault("optimizer", OptimizerConfig(lr=3e-3))
    kw.setdefault("backbone", BackboneConfig("small_cnn", pretrained=False, width=16))
    kw.setdefault("embedding_dim", 32)
    kw.setdefault("num_classes", 24)
    return DMLModule(**kw)


def small_data(**kw):
    kw = {
        "train_classes": 24,
        "test_classes": 24,
        "images_per_class": 20,
        "classes_per_batch": 8,
        "samples_per_class": 4,
        **kw,
    }
    return SyntheticDataModule(**kw)


def trainer(tmp_path, epochs, **kw):
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=-1,
        use_distributed_sampler=False,
        **kw,
    )


class CenterTerm(nn.Module):
    """An example objective term (``model.terms``): center loss, mean squared distance of each
    embedding to its class's learnable center (Wen et al., 2016)."""

    def __init__(self, num_classes: int, embedding_dim: int, weight: float = 0.1):
        super().__init__()
        self.centers = nn.Parameter(torch.zeros(num_classes, embedding_dim))
        self.weight = weight

    def forward(self, embedded, labels, objective):
        z = embedded["embeddings"]
        return {"center": self.weight * ((z - self.centers[labels]) ** 2).sum(1).mean()}


class CenterPool(Pooling):
    """An example pooling given by class path: the feature map's centre location."""

    def __init__(self, in_channels: int):
        super().__init__()

    def forward(self, x, projection=None):
        return PoolingOutput(x[:, :, x.shape[2] // 2, x.shape[3] // 2])
