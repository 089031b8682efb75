"""XBM's contrastive loss against its formula written out as the released code loops over it,
and the memory's enqueue order."""

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_metric_learning import distances, losses

from dml.cli import DMLCLI
from dml.compose import config_args
from dml.data import DMLDataModule, SyntheticDataModule
from dml.errors import ConfigError
from dml.losses import XBMContrastiveLoss
from dml.module import BackboneConfig, DMLModule, LossConfig, MemoryConfig, OptimizerConfig


def written_out(z, y, ref, ref_y, margin=0.5, eps=1e-5):
    """For each anchor: sum of (1 - s) over positives with s < 1 - eps, plus sum of s over
    negatives with s > margin; the mean over anchors (ret_benchmark/losses/contrastive_loss.py)."""
    sim = z @ ref.T
    total = 0.0
    for i in range(len(z)):
        term = 0.0
        for j in range(len(ref)):
            s = sim[i, j]
            if y[i] == ref_y[j] and s < 1 - eps:
                term = term + (1 - s)
            elif y[i] != ref_y[j] and s > margin:
                term = term + s
        total = total + term
    return total / len(z)


def unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


@pytest.mark.parametrize("with_memory", [False, True])
def test_value_and_gradient_equal_the_written_out_formula(with_memory):
    # raw (unnormalised) outputs: the released model L2-normalises them before its loss, this
    # loss normalises them itself; the gradient reaching the raw outputs must be the same
    g = torch.Generator().manual_seed(0)
    raw = (torch.randn(12, 6, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    if with_memory:  # earlier normalised embeddings, one an exact copy of an anchor (s = 1)
        ref = torch.cat([unit(30, 6, 1), F.normalize(raw.detach()[:1], dim=1)])
        ref_y = torch.cat(
            [torch.randint(0, 5, (30,), generator=torch.Generator().manual_seed(2)), y[:1]]
        )
    loss = XBMContrastiveLoss()
    ours = loss(raw, y, None, ref, ref_y) if with_memory else loss(raw, y)
    (g_ours,) = torch.autograd.grad(ours, raw)
    z = F.normalize(raw, dim=1)
    expected = written_out(z, y, ref, ref_y) if with_memory else written_out(z, y, z, y)
    (g_expected,) = torch.autograd.grad(expected, raw)
    assert float(ours) == pytest.approx(float(expected), abs=1e-12)
    assert torch.allclose(g_ours, g_expected, atol=1e-12)
    assert float(ours) > 0 and float(g_ours.abs().max()) > 0  # active pairs: not vacuous


def test_the_memory_term_is_a_sum_over_the_memory_not_a_mean():
    z = unit(8, 5, 3).requires_grad_(True)
    y = torch.arange(8) % 4
    memory, memory_y = unit(40, 5, 4), torch.arange(40) % 4
    xbm = XBMContrastiveLoss()
    once = xbm(z, y, None, memory, memory_y)
    twice = xbm(z, y, None, memory.repeat(2, 1), memory_y.repeat(2))
    assert float(twice) == pytest.approx(2 * float(once), rel=1e-12)
    (g_once,) = torch.autograd.grad(once, z)
    (g_twice,) = torch.autograd.grad(twice, z)
    assert torch.allclose(g_twice, 2 * g_once, atol=1e-12)  # the gradient grows with it
    # pytorch-metric-learning's contrastive loss averages over non-zero terms: not this loss
    pml = losses.ContrastiveLoss(
        pos_margin=1.0, neg_margin=0.5, distance=distances.CosineSimilarity()
    )
    assert float(pml(z, y, None, memory.repeat(2, 1), memory_y.repeat(2))) == pytest.approx(
        float(pml(z, y, None, memory, memory_y)), rel=1e-9
    )


def test_a_miner_is_refused():
    with pytest.raises(ConfigError, match="takes no miner"):
        DMLModule(
            backbone=BackboneConfig("small_cnn", pretrained=False, width=8),
            embedding_dim=16,
            num_classes=4,
            loss=LossConfig("xbm_contrastive", miner="multi_similarity"),
        )


@pytest.mark.parametrize(
    "method", ["contrastive", "gsp_contrastive", "none_memory", "xbm", "xbn", "adaptive_xbn"]
)
def test_the_xbm_family_configs_use_this_loss(method):
    cli = DMLCLI(
        DMLModule,
        DMLDataModule,
        subclass_mode_data=True,
        run=False,
        save_config_callback=None,
        args=config_args("synthetic", method) + ["--trainer.logger", "false"],
    )
    assert isinstance(cli.model.objective.metric_loss, XBMContrastiveLoss)
    assert cli.model.objective.miner is None


class LossParts(pl.Callback):
    def __init__(self):
        self.parts = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.parts.append(
            {
                k: float(v)
                for k, v in trainer.callback_metrics.items()
                if k.startswith("train/loss_")
            }
        )


@pytest.mark.parametrize("enqueue", ["before", "after"])
def test_enqueue_order(tmp_path, enqueue):
    """Released order (before): at the first memory step the memory holds the batch alone, so
    the memory term equals the batch term. After: that step has no memory term yet."""
    pl.seed_everything(0)
    module = DMLModule(
        backbone=BackboneConfig("small_cnn", pretrained=False, width=8),
        embedding_dim=16,
        loss=LossConfig("xbm_contrastive", {"margin": 0.5}),
        optimizer=OptimizerConfig(lr=1e-3),
        num_classes=12,
        memory=MemoryConfig(enabled=True, size=64, start_iteration=2, enqueue=enqueue),
    )
    data = SyntheticDataModule(
        train_classes=12,
        test_classes=12,
        images_per_class=8,
        classes_per_batch=4,
        samples_per_class=4,
    )
    parts = LossParts()
    pl.Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=False,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        use_distributed_sampler=False,
        log_every_n_steps=1,
        callbacks=[parts],
    ).fit(module, data)  # terms every step
    third = parts.parts[2]  # the first step past start_iteration
    if enqueue == "before":
        assert third["train/loss_memory"] == pytest.approx(third["train/loss_metric"], rel=1e-6)
    else:
        assert "train/loss_memory" not in third
        assert "train/loss_memory" in parts.parts[3]
    assert len(module.objective.memory) == 32  # two batches of 16 enqueued either way
