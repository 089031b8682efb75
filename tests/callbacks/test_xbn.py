"""XBN's callback: through the memory's one hook, the stored rows take the batch's moments (or
the filtered ones), per batch or whole; the filter sees every batch; its state survives a
resume; XBN without a memory is an error."""

import pytest
import pytorch_lightning as pl
import torch

from dml.callbacks import CrossBatchNormalization
from dml.data import SyntheticDataModule
from dml.errors import ConfigError
from dml.losses import CrossBatchMemoryLoss
from dml.module import BackboneConfig, DMLModule, LossConfig, MemoryConfig, OptimizerConfig


def module(memory=True):
    return DMLModule(
        backbone=BackboneConfig("small_cnn", pretrained=False, width=8),
        embedding_dim=16,
        loss=LossConfig("xbm_contrastive"),
        optimizer=OptimizerConfig(lr=1e-3),
        num_classes=12,
        memory=MemoryConfig(enabled=memory, size=40, start_iteration=2),
    )


def data():
    return SyntheticDataModule(
        train_classes=12,
        test_classes=12,
        images_per_class=8,
        classes_per_batch=4,
        samples_per_class=4,
    )


def trainer(tmp_path, epochs, callbacks):
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
        callbacks=callbacks,
    )


def filled_memory(rows=30, dim=3, seed=0):
    memory = CrossBatchMemoryLoss(dim, size=40, start_iteration=0)
    g = torch.Generator().manual_seed(seed)
    for b in range(3):
        memory.enqueue(
            torch.randn(rows // 3, dim, generator=g) * (b + 1) + b, torch.arange(rows // 3), step=b
        )
    return memory


def match(memory, batch, **options):
    """XBN's transform run by the memory, as at a training step."""
    CrossBatchNormalization(enabled=True, **options).attach(memory)
    memory.transform(batch)


def test_the_stored_rows_take_the_batch_moments_in_place():
    memory = filled_memory()
    batch = torch.randn(16, 3, generator=torch.Generator().manual_seed(1)) * 0.5 - 2
    pointer = memory.stored.data_ptr()
    match(memory, batch, recount_every=1000)
    stored = memory.stored
    assert stored.data_ptr() == pointer  # in place
    assert torch.allclose(stored.mean(0), batch.mean(0), atol=1e-5)
    assert torch.allclose(stored.var(0, unbiased=False), batch.var(0, unbiased=False), atol=1e-5)
    assert torch.allclose(memory.sum, stored.double().sum(0), atol=1e-6)  # sums kept exact


def test_per_batch_matching_matches_every_enqueued_batch():
    memory = filled_memory()
    match(memory, torch.randn(16, 3, generator=torch.Generator().manual_seed(2)), per_batch=True)
    target = memory.stored[memory.stored_batch_ids == 0]
    for b in range(3):
        rows = memory.stored[memory.stored_batch_ids == b]
        assert torch.allclose(rows.mean(0), target.mean(0), atol=1e-5)
        assert torch.allclose(rows.var(0, unbiased=False), target.var(0, unbiased=False), atol=1e-4)


def test_adaptive_filters_every_batch_after_the_warm_up(tmp_path):
    pl.seed_everything(0)
    xbn = CrossBatchNormalization(enabled=True, adaptive=True)
    m = module()
    trainer(tmp_path, 1, [xbn]).fit(m, data())  # 6 steps, warm-up 2
    assert int(xbn.kalman.mean.steps) == 4  # steps 3-6, the first before any row is stored
    memory = m.objective.memory
    assert len(memory) == 40
    stored = memory.buffer.embeddings.double()
    assert torch.allclose(memory.sum, stored.sum(0), atol=1e-4)


def test_adaptive_state_survives_a_resume(tmp_path):
    def run(epochs, ckpt=None, save=None):
        pl.seed_everything(0)
        xbn = CrossBatchNormalization(enabled=True, adaptive=True)
        t = trainer(tmp_path, epochs, [xbn])
        m = module()
        t.fit(m, data(), ckpt_path=ckpt)
        if save:
            t.save_checkpoint(save)
        return xbn, m

    straight, m_straight = run(2)
    run(1, save=tmp_path / "one.ckpt")
    resumed, m_resumed = run(2, ckpt=str(tmp_path / "one.ckpt"))
    assert torch.allclose(resumed.kalman.var.x, straight.kalman.var.x)
    assert int(resumed.kalman.mean.steps) == int(straight.kalman.mean.steps) == 10
    assert torch.allclose(
        m_resumed.objective.memory.buffer.embeddings,
        m_straight.objective.memory.buffer.embeddings,
        atol=1e-6,
    )


def test_xbn_without_a_memory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="model.memory.enabled: true"):
        trainer(tmp_path, 1, [CrossBatchNormalization(enabled=True)]).fit(module(False), data())
