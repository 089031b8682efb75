"""XBM's cross-batch memory as an objective term: warm-up, wrap-around, exact running sums,
the transform hook, a resume that gives the same next losses, composition with GSP."""

import pytest
import pytorch_lightning as pl
import torch

from dml.data import SyntheticDataModule
from dml.errors import ConfigError
from dml.losses import CrossBatchMemoryLoss, XBMContrastiveLoss
from dml.losses.factory import LOSSES
from dml.memory import Affine
from dml.module import (
    BackboneConfig,
    DMLModule,
    LossConfig,
    MemoryConfig,
    OptimizerConfig,
    PoolingConfig,
    ZeroShotConfig,
)


def module(memory=None, **kw):
    kw.setdefault("loss", LossConfig("xbm_contrastive"))
    return DMLModule(
        backbone=BackboneConfig("small_cnn", pretrained=False, width=8),
        embedding_dim=16,
        optimizer=OptimizerConfig(lr=1e-3),
        num_classes=12,
        memory=memory or MemoryConfig(enabled=True, size=40, start_iteration=3),
        **kw,
    )


def data():
    return SyntheticDataModule(
        train_classes=12,
        test_classes=12,
        images_per_class=8,
        classes_per_batch=4,
        samples_per_class=4,
    )


class Record(pl.Callback):
    def __init__(self):
        self.losses, self.parts = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.parts.append(set(k for k in trainer.callback_metrics if k.startswith("train/loss_")))


def trainer(tmp_path, epochs, callbacks=()):
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        use_distributed_sampler=False,
        log_every_n_steps=1,  # Record reads each step's logged terms
        callbacks=list(callbacks),
    )


def test_warm_up_then_memory_term_and_exact_running_sums(tmp_path):
    pl.seed_everything(0)
    rec, m = Record(), module()
    trainer(tmp_path, 1, [rec]).fit(m, data())  # 6 steps of 16
    memory = m.objective.memory
    assert "train/loss_memory" not in rec.parts[2] and "train/loss_memory" in rec.parts[-1]
    assert int(memory.iteration) == 6
    # steps 4, 5, 6 enqueue 16 each: 48 > 40, so the buffer is full and has wrapped
    assert len(memory) == 40 and int(memory.buffer.pointer) == 8
    stored = memory.buffer.embeddings.double()
    assert torch.allclose(memory.sum, stored.sum(0), atol=1e-4)
    assert torch.allclose(memory.sumsq, (stored * stored).sum(0), atol=1e-4)


def test_affine_keeps_the_running_sums_exact_and_the_hook_runs_before_the_term():
    memory = CrossBatchMemoryLoss(3, size=10, start_iteration=0)
    g = torch.Generator().manual_seed(0)
    memory.enqueue(torch.randn(7, 3, generator=g), torch.arange(7))
    memory.apply(Affine(torch.tensor([2.0, 0.5, 1.0]), torch.tensor([1.0, -1.0, 0.0])))
    stored = memory.stored.double()
    assert torch.allclose(memory.sum, stored.sum(0), atol=1e-10)
    assert torch.allclose(memory.sumsq, (stored**2).sum(0), atol=1e-10)
    mean, var = memory.moments()
    assert torch.allclose(mean, stored.mean(0), atol=1e-10)
    assert torch.allclose(var, stored.var(0, unbiased=False), atol=1e-10)
    seen = []
    memory.add_transform(lambda mem, batch: seen.append((len(mem), batch.shape)))
    z = torch.nn.functional.normalize(torch.randn(4, 3, generator=g), dim=1)
    memory.loss = XBMContrastiveLoss()
    terms = memory({"embeddings": z, "raw_embeddings": z}, torch.arange(4))
    assert seen == [(7, (4, 3))]  # before the batch is enqueued
    assert len(memory) == 10 and set(terms) == {"memory"}


def test_bad_memory_settings_name_the_key():
    with pytest.raises(ConfigError, match="model.memory.enqueue"):
        CrossBatchMemoryLoss(4, enqueue="later")
    with pytest.raises(ConfigError, match="model.memory.enabled needs a pair loss"):
        module(loss=LossConfig("none"), ibc={"enabled": True})


@pytest.mark.parametrize("name", sorted(n for n, (_, proxies) in LOSSES.items() if proxies))
def test_a_proxy_loss_with_the_memory_is_a_config_error_not_a_crash_at_the_memory_step(name):
    # PML's proxy losses refuse ref_emb; before this check the run died at start_iteration
    with pytest.raises(
        ConfigError, match=f"model.memory.enabled: {name} compares embeddings with its own proxies"
    ):
        module(loss=LossConfig(name))


@pytest.mark.parametrize(
    "loss",
    [LossConfig(n) for n in sorted(LOSSES) if not LOSSES[n][1]]
    + [LossConfig("c2", proxies_per_class=2)],
    ids=lambda c: c.name + ("+ccp" if c.proxies_per_class else ""),
)
def test_every_pair_loss_and_ccp_train_with_the_memory_term(tmp_path, loss):
    pl.seed_everything(0)
    rec, m = Record(), module(MemoryConfig(enabled=True, size=32, start_iteration=2), loss=loss)
    trainer(tmp_path, 1, [rec]).fit(m, data())
    assert "train/loss_memory" in rec.parts[-1] and int(m.objective.memory.iteration) == 6
    assert all(torch.isfinite(torch.tensor(rec.losses)))


def test_resume_gives_the_same_next_step_loss(tmp_path):
    def run(epochs, ckpt=None, save=None):
        pl.seed_everything(0)
        rec = Record()
        t = trainer(tmp_path, epochs, [rec])
        m = module(MemoryConfig(enabled=True, size=40, start_iteration=2))
        t.fit(m, data(), ckpt_path=ckpt)
        if save:
            t.save_checkpoint(save)
        return rec.losses, m.objective.memory

    straight, mem_straight = run(2)
    first, _ = run(1, save=tmp_path / "one.ckpt")
    resumed, mem_resumed = run(2, ckpt=str(tmp_path / "one.ckpt"))
    assert first == straight[:6]
    assert resumed[0] == pytest.approx(straight[6], rel=1e-6)  # the next step after resume
    assert resumed == pytest.approx(straight[6:], rel=1e-5)
    assert torch.allclose(mem_resumed.buffer.embeddings, mem_straight.buffer.embeddings)
    assert int(mem_resumed.iteration) == int(mem_straight.iteration) == 12


def test_gsp_zero_shot_and_the_memory_compose(tmp_path):
    pl.seed_everything(0)
    m = module(
        MemoryConfig(enabled=True, size=32, start_iteration=2),
        pooling=PoolingConfig("gsp", {"num_prototypes": 4}),
        zero_shot=ZeroShotConfig(weight=0.1, metric_weight=0.9),
    )
    rec = Record()
    trainer(tmp_path, 1, [rec]).fit(m, data())
    assert {"train/loss_metric", "train/loss_zero_shot", "train/loss_memory"} <= rec.parts[-1]
    assert all(torch.isfinite(torch.tensor(rec.losses)))
    assert bool(m.pooling.initialized)
