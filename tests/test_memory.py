"""Cross-batch memory and XBN: moment matching, the Kalman filter, the ring buffer, resume."""
import pytest
import pytorch_lightning as pl
import torch

from dml.callbacks import CrossBatchMemory
from dml.data import SyntheticDataModule
from dml.memory import EmbeddingRingBuffer, MomentKalmanFilter, ScalarKalman, moment_match
from dml.module import BackboneConfig, DMLModule, LossConfig, OptimizerConfig


# --- moment matching ------------------------------------------------------------------------
def test_moment_match_gives_the_batch_moments():
    g = torch.Generator().manual_seed(0)
    memory = 3 * torch.randn(500, 16, generator=g, dtype=torch.float64) + 2
    batch = 0.5 * torch.randn(32, 16, generator=g, dtype=torch.float64) - 1
    out = moment_match(memory, batch)
    assert torch.allclose(out.mean(0), batch.mean(0), atol=1e-5)
    assert torch.allclose(out.std(0, unbiased=False), batch.std(0, unbiased=False), atol=1e-5)


def test_moment_match_is_identity_when_moments_agree():
    g = torch.Generator().manual_seed(1)
    memory = torch.randn(200, 8, generator=g, dtype=torch.float64)
    assert torch.allclose(moment_match(memory, memory.clone()), memory, atol=1e-10)


# --- Kalman filter --------------------------------------------------------------------------
def test_kalman_two_steps_by_hand():
    kf = ScalarKalman(dim=1, process_noise=0.5)
    # step 1 initialises: x = 2, P = R = 1
    assert kf.update(torch.tensor([2.0]), torch.tensor([1.0])).item() == pytest.approx(2.0)
    # step 2: P- = 1 + 0.5 = 1.5, K = 1.5 / (1.5 + 1) = 0.6, x = 2 + 0.6 (4 - 2) = 3.2,
    # P = 0.4 * 1.5 = 0.6
    assert kf.update(torch.tensor([4.0]), torch.tensor([1.0])).item() == pytest.approx(3.2)
    assert kf.p.item() == pytest.approx(0.6)


def test_kalman_without_process_noise_is_the_running_average():
    g = torch.Generator().manual_seed(2)
    ys = torch.randn(50, 4, generator=g, dtype=torch.float64)
    kf = ScalarKalman(dim=4, process_noise=0.0).double()
    for t, y in enumerate(ys, start=1):
        x = kf.update(y, torch.full((4,), 0.3, dtype=torch.float64))
        assert torch.allclose(x, ys[:t].mean(0), atol=1e-12)


def test_moment_filter_converges_on_a_stationary_stream():
    g = torch.Generator().manual_seed(3)
    true_mean, true_std = torch.linspace(-1, 1, 8), torch.linspace(0.5, 2, 8)
    kf = MomentKalmanFilter(8, process_noise_mean=1e-6, process_noise_var=1e-6)
    for _ in range(400):
        mean, var = kf.update(true_mean + true_std * torch.randn(16, 8, generator=g))
    assert torch.allclose(mean, true_mean, atol=0.05)
    assert torch.allclose(var.sqrt(), true_std, atol=0.05)


# --- ring buffer ----------------------------------------------------------------------------
def test_ring_buffer_order_wraparound_and_label_alignment():
    buf = EmbeddingRingBuffer(size=5, dim=1)
    for start in (0, 3, 6):  # batches of 3: 0 1 2 | 3 4 5 | 6 7 8
        values = torch.arange(start, start + 3)
        buf.enqueue(values[:, None].float(), values * 10)
    emb, labels = buf.valid()
    assert emb[:, 0].tolist() == [4, 5, 6, 7, 8]  # oldest first, the oldest 4 overwritten
    assert labels.tolist() == [40, 50, 60, 70, 80]
    assert len(buf) == 5 and int(buf.pointer) == 9 % 5
    big = torch.arange(100, 107)
    buf.enqueue(big[:, None].float(), big)  # larger than the buffer: newest 5 kept
    assert buf.valid()[1].tolist() == [102, 103, 104, 105, 106]


# --- the callback in training ---------------------------------------------------------------
def module():
    return DMLModule(backbone=BackboneConfig("small_cnn", pretrained=False, width=8),
                     embedding_dim=16, loss=LossConfig("multi_similarity"),
                     optimizer=OptimizerConfig(lr=1e-3), num_classes=12)


def data():
    return SyntheticDataModule(train_classes=12, test_classes=12, images_per_class=8,
                               classes_per_batch=4, samples_per_class=4)


class Record(pl.Callback):
    def __init__(self):
        self.losses, self.parts = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.parts.append(set(k for k in trainer.callback_metrics if k.startswith("train/loss_")))


def trainer(tmp_path, epochs, callbacks):
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                      default_root_dir=tmp_path, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False,
                      limit_val_batches=0, use_distributed_sampler=False, callbacks=callbacks)


@pytest.mark.parametrize("mode", ["xbm", "xbn", "adaptive_xbn"])
def test_warm_up_then_memory_loss(tmp_path, mode):
    pl.seed_everything(0)
    memory = CrossBatchMemory(mode=mode, size=40, start_iteration=3, recount_every=1000)
    rec = Record()
    m = module()
    trainer(tmp_path, 1, [memory, rec]).fit(m, data())  # 6 steps of 16
    assert "train/loss_memory" in rec.parts[-1]
    assert int(memory.state.iteration) == 6
    # steps 4, 5, 6 enqueue 16 each: 48 > 40, so the buffer is full and has wrapped
    assert len(memory.state.memory) == 40 and int(memory.state.memory.pointer) == 8
    if mode == "adaptive_xbn":
        assert int(memory.state.kalman.mean.steps) == 3
    # the running sums kept through enqueues, wrap-around and transforms equal a recount
    stored = memory.state.memory.embeddings.double()
    assert torch.allclose(memory.state.sum, stored.sum(0), atol=1e-4)
    assert torch.allclose(memory.state.sumsq, (stored * stored).sum(0), atol=1e-4)


def test_xbn_memory_matches_the_batch_moments(tmp_path):
    pl.seed_everything(0)
    memory = CrossBatchMemory(mode="xbn", size=64, start_iteration=0, recount_every=1000)
    m = module()
    trainer(tmp_path, 1, [memory]).fit(m, data())
    # one more step by hand: the stored memory, in place, takes a new batch's moments
    batch = torch.randn(16, 16)
    stored = memory.state.memory.embeddings
    out = memory.transform(stored, (batch.mean(0), batch.var(0, unbiased=False)))
    assert out.data_ptr() == stored.data_ptr()  # in place
    assert torch.allclose(stored.mean(0), batch.mean(0), atol=1e-5)
    assert torch.allclose(stored.std(0, unbiased=False), batch.std(0, unbiased=False), atol=1e-5)
    assert torch.allclose(memory.state.sum, stored.double().sum(0), atol=1e-4)


def test_per_batch_matching_matches_every_enqueued_batch():
    cb = CrossBatchMemory(mode="xbn", size=12, per_batch=True, renormalize=False)
    from dml.callbacks.cross_batch_memory import CrossBatchMemoryState
    cb.state = CrossBatchMemoryState(12, 3, 0.0, 0.0)
    g = torch.Generator().manual_seed(0)
    stored = torch.cat([torch.randn(4, 3, generator=g) * s + s for s in (1.0, 3.0, 5.0)])
    cb.state.batch_ids.copy_(torch.arange(3).repeat_interleave(4))
    target = (torch.zeros(3), torch.ones(3))
    out = cb.transform(stored, target)
    for b in range(3):
        rows = out[4 * b:4 * b + 4]
        assert torch.allclose(rows.mean(0), torch.zeros(3), atol=1e-5)
        assert torch.allclose(rows.var(0, unbiased=False), torch.ones(3), atol=1e-4)


@pytest.mark.parametrize("mode", ["xbm", "adaptive_xbn"])
def test_resume_gives_the_same_next_step_loss(tmp_path, mode):
    def run(epochs, ckpt=None, save=None):
        pl.seed_everything(0)
        rec = Record()
        memory = CrossBatchMemory(mode=mode, size=40, start_iteration=2)
        t = trainer(tmp_path, epochs, [memory, rec])
        m = module()
        t.fit(m, data(), ckpt_path=ckpt)
        if save:
            t.save_checkpoint(save)
        return rec.losses, memory

    straight, mem_straight = run(2)
    first, _ = run(1, save=tmp_path / "one.ckpt")
    resumed, mem_resumed = run(2, ckpt=str(tmp_path / "one.ckpt"))
    assert first == straight[:6]
    assert resumed[0] == pytest.approx(straight[6], rel=1e-6)  # the next step after resume
    assert resumed == pytest.approx(straight[6:], rel=1e-5)
    assert torch.allclose(mem_resumed.state.memory.embeddings, mem_straight.state.memory.embeddings)
    assert int(mem_resumed.state.iteration) == int(mem_straight.state.iteration) == 12


def test_bad_mode_is_a_config_error():
    from dml.errors import ConfigError
    with pytest.raises(ConfigError, match="memory.mode"):
        CrossBatchMemory(mode="xbnn")


def test_gsp_zero_shot_and_xbn_compose(tmp_path):
    from dml.module import PoolingConfig, ZeroShotConfig
    pl.seed_everything(0)
    m = DMLModule(backbone=BackboneConfig("small_cnn", pretrained=False, width=8),
                  pooling=PoolingConfig("gsp", {"num_prototypes": 4}), embedding_dim=16,
                  loss=LossConfig("contrastive", {"pos_margin": 1.0, "neg_margin": 0.5,
                                                  "distance": "cosine"}),
                  zero_shot=ZeroShotConfig(weight=0.1, metric_weight=0.9),
                  optimizer=OptimizerConfig(lr=1e-3), num_classes=12)
    rec = Record()
    memory = CrossBatchMemory(mode="adaptive_xbn", size=32, start_iteration=2)
    trainer(tmp_path, 1, [memory, rec]).fit(m, data())
    assert {"train/loss_metric", "train/loss_zero_shot", "train/loss_memory"} <= rec.parts[-1]
    assert all(torch.isfinite(torch.tensor(rec.losses)))
    assert bool(m.pooling.initialized)
