"""The learning-rate schedule: the rate of every optimizer step of a real (tiny) fit against the
formula written out, under each bound of the run's length (max_epochs, max_steps,
limit_train_batches, accumulate_grad_batches), and through a checkpoint resume."""

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

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.rates.append({g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups})


def fit(tmp_path, optimizer, epochs=3, ckpt_path=None, callbacks=(), **trainer_args):
    pl.seed_everything(0)
    module = DMLModule(
        backbone=BackboneConfig("small_cnn", pretrained=False, width=8),
        embedding_dim=16,
        num_classes=16,
        evaluation=EvalConfig(nmi=False),
        optimizer=optimizer,
    )
    data = SyntheticDataModule(
        train_classes=16, test_classes=8, images_per_class=8, batches_per_epoch=4
    )
    record = RecordLR()
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        callbacks=[record, *callbacks],
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
        **trainer_args,
    )
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return record.rates


def test_linear_warm_up_then_cosine_per_step(tmp_path):
    rates = fit(
        tmp_path,
        OptimizerConfig(lr=1e-2, backbone_lr_mult=0.1, scheduler="cosine", warmup_epochs=1),
    )
    warmup, total = 4, 12  # 4 steps an epoch, 3 epochs
    expected = [
        s / warmup
        if s < warmup
        else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
        for s in range(total)
    ]
    assert [r["head"] for r in rates] == pytest.approx([1e-2 * f for f in expected])
    assert [r["backbone"] for r in rates] == pytest.approx([1e-3 * f for f in expected])


def test_warm_up_then_steps_at_the_milestones(tmp_path):
    rates = fit(
        tmp_path,
        OptimizerConfig(lr=1.0, scheduler="step", milestones=[2], gamma=0.5, warmup_epochs=0.5),
    )
    assert [r["head"] for r in rates] == pytest.approx(
        [0.0, 0.5, 1, 1, 1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5]
    )


def test_a_resumed_run_goes_on_with_the_schedule(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    config = OptimizerConfig(lr=1e-2, scheduler="cosine", warmup_epochs=1)
    every_epoch = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_top_k=-1, filename="{epoch}")
    straight = fit(tmp_path / "a", config, callbacks=[every_epoch])
    resumed = fit(tmp_path / "b", config, ckpt_path=str(tmp_path / "ckpt" / "epoch=1.ckpt"))
    assert len(straight) == 12 and len(resumed) == 4  # the third epoch again
    assert [r["head"] for r in resumed] == pytest.approx([r["head"] for r in straight[8:]])
    # resumed after the end with one more epoch: the decay stretches to 16 steps from step 12
    # on (a schedule restored with the old total would train at lr 0)
    longer = fit(
        tmp_path / "c", config, epochs=4, ckpt_path=str(tmp_path / "ckpt" / "epoch=2.ckpt")
    )
    assert [r["head"] for r in longer] == pytest.approx(
        [1e-2 * 0.5 * (1 + math.cos(math.pi * (s - 4) / 12)) for s in range(12, 16)]
    )


def cosine(step, total, warmup=0):
    if step < warmup:
        return step / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))


@pytest.mark.parametrize(
    "bound, total, per_epoch",
    [
        ({}, 12, 4),  # 3 epochs of 4 batches
        ({"max_steps": 7}, 7, 4),  # the run stops at step 7, inside epoch 2
        ({"limit_train_batches": 3}, 9, 3),  # 3 batches an epoch
        ({"accumulate_grad_batches": 3}, 6, 2),  # 4 batches -> 2 optimizer steps an epoch
    ],
)
def test_the_schedule_spans_the_optimizer_steps_the_run_takes(tmp_path, bound, total, per_epoch):
    rates = fit(tmp_path / "c", OptimizerConfig(lr=1e-2, scheduler="cosine"), **bound)
    assert len(rates) == total
    assert [r["head"] for r in rates] == pytest.approx(
        [1e-2 * cosine(s, total) for s in range(total)]
    )
    # warm-up in epochs of optimizer steps; step milestones in epochs too
    rates = fit(
        tmp_path / "w", OptimizerConfig(lr=1e-2, scheduler="cosine", warmup_epochs=1), **bound
    )
    assert [r["head"] for r in rates] == pytest.approx(
        [1e-2 * cosine(s, total, per_epoch) for s in range(total)]
    )
    rates = fit(
        tmp_path / "s",
        OptimizerConfig(lr=1.0, scheduler="step", milestones=[1, 2], gamma=0.5),
        **bound,
    )
    assert [r["head"] for r in rates] == pytest.approx(
        [0.5 ** (s // per_epoch) for s in range(total)]
    )


def test_cosine_needs_a_run_length(tmp_path):
    from dml.errors import ConfigError

    with pytest.raises(ConfigError, match="trainer.max_epochs or trainer.max_steps"):
        fit(tmp_path, OptimizerConfig(scheduler="cosine"), epochs=-1)


def test_a_resumed_cosine_run_with_more_epochs_decays_over_the_new_length(tmp_path):
    """Without a warm-up too (the epoch-wise scheduler this replaced kept the period of the run
    it resumed, and the rate rose again after the old end)."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    config = OptimizerConfig(lr=1e-2, scheduler="cosine")
    every_epoch = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_top_k=-1, filename="{epoch}")
    straight = fit(tmp_path / "a", config, epochs=2, callbacks=[every_epoch])
    assert [r["head"] for r in straight] == pytest.approx([1e-2 * cosine(s, 8) for s in range(8)])
    longer = fit(
        tmp_path / "b", config, epochs=5, ckpt_path=str(tmp_path / "ckpt" / "epoch=1.ckpt")
    )
    assert [r["head"] for r in longer] == pytest.approx(
        [1e-2 * cosine(s, 20) for s in range(8, 20)]
    )


def test_a_checkpoint_of_the_epoch_wise_scheduler_resumes_at_its_step(tmp_path):
    """Checkpoints written before the per-step schedule hold a CosineAnnealingLR state counting
    epochs: they load, and the run goes on at the optimizer step it stopped at."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    config = OptimizerConfig(lr=1e-2, scheduler="cosine")
    every_epoch = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_top_k=-1, filename="{epoch}")
    fit(tmp_path / "a", config, epochs=2, callbacks=[every_epoch])
    path = tmp_path / "ckpt" / "epoch=0.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    base = checkpoint["lr_schedulers"][0]["base_lrs"]
    checkpoint["lr_schedulers"] = [
        {
            "T_max": 2,
            "eta_min": 0.0,
            "base_lrs": base,
            "last_epoch": 1,
            "_step_count": 2,
            "_last_lr": base,
        }
    ]
    torch.save(checkpoint, path)
    resumed = fit(tmp_path / "b", config, epochs=3, ckpt_path=str(path))
    assert [r["head"] for r in resumed] == pytest.approx(
        [1e-2 * cosine(s, 12) for s in range(4, 12)]
    )
