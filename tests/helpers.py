"""Small models, data and trainers the tests share (tests/ is on the path: conftest.py lives
here)."""
import pytorch_lightning as pl

from dml.data import SyntheticDataModule
from dml.module import BackboneConfig, DMLModule, OptimizerConfig


def small_module(**kw):
    kw.setdefault("optimizer", OptimizerConfig(lr=3e-3))
    kw.setdefault("backbone", BackboneConfig("small_cnn", pretrained=False, width=16))
    kw.setdefault("embedding_dim", 32)
    kw.setdefault("num_classes", 24)
    return DMLModule(**kw)


def small_data(**kw):
    kw = {"train_classes": 24, "test_classes": 24, "images_per_class": 20,
          "classes_per_batch": 8, "samples_per_class": 4, **kw}
    return SyntheticDataModule(**kw)


def trainer(tmp_path, epochs, **kw):
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                      default_root_dir=tmp_path, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=-1,
                      use_distributed_sampler=False, **kw)
