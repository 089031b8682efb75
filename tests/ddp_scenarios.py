"""The DDP scenarios of tests/test_ddp.py: each builds its module and data from fixed seeds
and runs on whatever trainer it is given (2 processes in ddp_worker.py, 1 in the test)."""

import os

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from dml.callbacks import ChanceConstraintProjection, CrossBatchNormalization
from dml.data import SyntheticDataModule
from dml.module import (
    BackboneConfig,
    DMLModule,
    IBCConfig,
    LossConfig,
    MemoryConfig,
    OptimizerConfig,
)

BATCH = 16  # the global batch of the gradient checks: 4 classes x 4


def make_module(**kw):
    kw.setdefault("optimizer", OptimizerConfig(lr=3e-3))
    kw.setdefault("backbone", BackboneConfig("small_cnn", pretrained=False, width=8))
    return DMLModule(embedding_dim=16, num_classes=12, **kw)


def make_data(**kw):
    kw = {
        "train_classes": 12,
        "test_classes": 7,
        "images_per_class": 11,
        "classes_per_batch": 2,
        "samples_per_class": 4,
        "image_size": 32,
        **kw,
    }
    return SyntheticDataModule(**kw)


def ddp_trainer(out_dir, world, **kw):
    kw = {
        "max_epochs": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "use_distributed_sampler": False,
        "default_root_dir": out_dir,
        **kw,
    }
    if world > 1:
        kw.update(accelerator="cpu", devices=world, strategy="ddp")
    else:
        kw.update(accelerator="cpu", devices=1)
    return pl.Trainer(**kw)


class FixedBatch(Dataset):
    """The rows of one fixed batch that belong to this process: rank r of w gets rows
    [r * B / w, (r + 1) * B / w)."""

    def __init__(self, rank, world):
        g = torch.Generator().manual_seed(1)
        images = torch.rand(BATCH, 3, 32, 32, generator=g)
        labels = torch.arange(BATCH) // 4
        rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        self.images, self.labels = images[rows], labels[rows]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i], i


class GradientRecorder(pl.Callback):
    """The gradients the optimizer would apply (after DDP's all-reduce)."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads = {
            n: p.grad.detach().clone()
            for n, p in pl_module.named_parameters()
            if p.grad is not None
        }


def one_step_gradients(make_trainer, rank, world, module):
    recorder = GradientRecorder()
    loader = DataLoader(FixedBatch(rank, world), batch_size=BATCH // world, shuffle=False)
    make_trainer(callbacks=[recorder], limit_train_batches=1, limit_val_batches=0).fit(
        module, train_dataloaders=loader
    )
    return recorder.grads


def scenario_eval(make_trainer, rank, world, out_dir):
    module, data = make_module(), make_data()  # 77 test images: odd, padded under DDP
    make_trainer().validate(module, data, verbose=False)
    return module.last_metrics


def scenario_grad(make_trainer, rank, world, out_dir):
    # frozen BatchNorm: the forward pass does not depend on how the batch is split
    module = make_module(
        backbone=BackboneConfig("small_cnn", pretrained=False, width=8, frozen_bn=True),
        loss=LossConfig(
            name="contrastive", gather=True, params={"pos_margin": 0.0, "neg_margin": 1.0}
        ),
    )
    return one_step_gradients(make_trainer, rank, world, module)


def scenario_ibc_grad(make_trainer, rank, world, out_dir):
    module = make_module(
        backbone=BackboneConfig("small_cnn", pretrained=False, width=8, frozen_bn=True),
        loss=LossConfig(name="none"),
        ibc=IBCConfig(enabled=True, heads=2, ff_hidden=32, dropout=0.0, gather=True),
    )
    return one_step_gradients(make_trainer, rank, world, module)


def scenario_xbn(make_trainer, rank, world, out_dir):
    xbn = CrossBatchNormalization(enabled=True, adaptive=True)
    module = make_module(
        loss=LossConfig(name="xbm_contrastive"),
        memory=MemoryConfig(enabled=True, size=40, start_iteration=2),
    )
    make_trainer(callbacks=[xbn], limit_train_batches=6, limit_val_batches=0).fit(
        module, make_data()
    )
    memory = module.objective.memory
    return {
        "embeddings": memory.buffer.embeddings.clone(),
        "labels": memory.buffer.labels.clone(),
        "sum": memory.sum.clone(),
        "iteration": int(memory.iteration),
        "kalman": xbn.kalman.mean.x.clone(),
    }


def scenario_ccp(make_trainer, rank, world, out_dir):
    ccp = ChanceConstraintProjection(
        enabled=True, patience=1, min_delta=10.0, pool_passes=3, lam=1e-3
    )
    module = make_module(
        loss=LossConfig(
            name="c2", proxies_per_class=2, params={"pos_margin": 0.0, "neg_margin": 0.5}
        )
    )
    trainer = make_trainer(callbacks=[ccp], max_epochs=2, limit_train_batches=3)
    trainer.fit(module, make_data())
    trainer.save_checkpoint(os.path.join(out_dir, f"ccp_world{world}.ckpt"))
    return {
        "proxies": module.objective.proxies().detach().clone(),
        "round": ccp.round,
        "theta_prev": module.objective.proximal.theta_prev.detach().cpu().clone(),
    }


def skipping_cub(out_dir, rank, decode):
    """CUB-layout images (a copy per process) with one truncated test image."""
    from dml.data import CUBDataModule
    from dml.gpu_check import make_cub_layout

    root = make_cub_layout(
        os.path.join(out_dir, f"cub-{decode}-{rank}"),
        train_classes=4,
        test_classes=3,
        per_class=5,
        size=40,
    )
    bad = os.path.join(root, "CUB_200_2011", "images", "102.Bird_102", "Bird_102_0001.jpg")
    with open(bad, "rb") as f:
        head = f.read(200)
    with open(bad, "wb") as f:
        f.write(head)
    return CUBDataModule(
        root=root,
        crop=32,
        resize=36,
        verify=False,
        skip_unreadable=True,
        num_workers=0,
        eval_batch_size=4,
        decode=decode,
    )


def scenario_skipped(make_trainer, rank, world, out_dir):
    """Validation of 15 test images, one unreadable: under DDP the processes hold 7 and 8 rows
    (the sampler pads to 8 + 8, one of them skipped), gathered by index."""
    out = {}
    for decode in ("cpu", "device"):
        module, data = make_module(), skipping_cub(out_dir, rank, decode)
        make_trainer().validate(module, data, verbose=False)
        out[decode] = {
            "metrics": module.last_metrics,
            "rows": None
            if module.evaluator.last_sets is None
            else len(module.evaluator.last_sets.query.labels),
            "skipped": [os.path.basename(f) for f in data.unreadable_files()],
        }
    return out


SCENARIOS = {
    "eval": scenario_eval,
    "skipped": scenario_skipped,
    "grad": scenario_grad,
    "ibc_grad": scenario_ibc_grad,
    "xbn": scenario_xbn,
    "ccp": scenario_ccp,
}
