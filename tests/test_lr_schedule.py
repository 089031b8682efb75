"""The warm-up schedule: the learning rate of every step of a real (tiny) fit against the
formula written out, and its state through a checkpoint resume."""
import math

import pytest
import pytorch_lightning as pl
import torch

from dml.config import BackboneConfig, EvalConfig, OptimizerConfig
from dml.data import SyntheticDataModule
from dml.module import DMLModule


class RecordLR(pl.Callback):
    def __init__(self):
        self.rates = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rates.append({g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups})


def fit(tmp_path, optimizer, epochs=3, ckpt_path=None, callbacks=()):
    pl.seed_everything(0)
    module = DMLModule(backbone=BackboneConfig("small_cnn", pretrained=False, width=8),
                       embedding_dim=16, num_classes=16, evaluation=EvalConfig(nmi=False),
                       optimizer=optimizer)
    data = SyntheticDataModule(train_classes=16, test_classes=8, images_per_class=8,
                               batches_per_epoch=4)
    record = RecordLR()
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                         callbacks=[record, *callbacks], enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False,
                         num_sanity_val_steps=0, limit_val_batches=0,
                         default_root_dir=str(tmp_path))
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return record.rates


def test_linear_warm_up_then_cosine_per_step(tmp_path):
    rates = fit(tmp_path, OptimizerConfig(lr=1e-2, backbone_lr_mult=0.1, scheduler="cosine",
                                             warmup_epochs=1))
    warmup, total = 4, 12  # 4 steps an epoch, 3 epochs
    expected = [s / warmup if s < warmup else
                0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
                for s in range(total)]
    assert [r["head"] for r in rates] == pytest.approx([1e-2 * f for f in expected])
    assert [r["backbone"] for r in rates] == pytest.approx([1e-3 * f for f in expected])


def test_warm_up_then_steps_at_the_milestones(tmp_path):
    rates = fit(tmp_path, OptimizerConfig(lr=1.0, scheduler="step", milestones=[2],
                                             gamma=0.5, warmup_epochs=0.5))
    assert [r["head"] for r in rates] == pytest.approx(
        [0.0, 0.5, 1, 1, 1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5])


def test_a_resumed_run_goes_on_with_the_schedule(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    config = OptimizerConfig(lr=1e-2, scheduler="cosine", warmup_epochs=1)
    every_epoch = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_top_k=-1,
                                  filename="{epoch}")
    straight = fit(tmp_path / "a", config, callbacks=[every_epoch])
    resumed = fit(tmp_path / "b", config, ckpt_path=str(tmp_path / "ckpt" / "epoch=1.ckpt"))
    assert len(straight) == 12 and len(resumed) == 4  # the third epoch again
    assert [r["head"] for r in resumed] == pytest.approx([r["head"] for r in straight[8:]])
    # resumed after the end with one more epoch: the decay stretches to 16 steps from step 12
    # on (a schedule restored with the old total would train at lr 0)
    longer = fit(tmp_path / "c", config, epochs=4,
                 ckpt_path=str(tmp_path / "ckpt" / "epoch=2.ckpt"))
    assert [r["head"] for r in longer] == pytest.approx(
        [1e-2 * 0.5 * (1 + math.cos(math.pi * (s - 4) / 12)) for s in range(12, 16)])
