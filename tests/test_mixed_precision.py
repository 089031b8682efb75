"""The GPU path's settings, tested on a CPU: bf16 mixed precision for every method config (the
network in bfloat16, the objective and GSP's transport in float32), the default precision,
channels-last and torch.compile (same losses as the plain run), and the loader worker default.
"""

import os

import pytest
import pytorch_lightning as pl
import torch
from helpers import small_data, small_module, trainer
from test_configs import METHODS, TINY_RUN

import dml.models.gsp as gsp
from dml.cli import DMLCLI, default_precision
from dml.compose import config_args
from dml.config import BackboneConfig
from dml.data import DMLDataModule
from dml.data.datamodule import default_num_workers
from dml.module import DMLModule


class Record(pl.Callback):
    """Each step's loss, the dtype the backbone produced and the dtypes of the objective's
    terms."""

    def __init__(self):
        self.losses, self.backbone_dtypes, self.term_dtypes = [], set(), set()

    def on_fit_start(self, trainer, pl_module):
        pl_module.backbone.register_forward_hook(  # training steps (not GSP's no-grad init)
            lambda m, i, out: (
                self.backbone_dtypes.add(out.dtype) if torch.is_grad_enabled() else None
            )
        )
        pl_module.objective.register_forward_hook(
            lambda m, i, out: self.term_dtypes.update(v.dtype for v in out.values())
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_under_bf16_with_a_float32_objective(method, monkeypatch):
    costs_dtypes = []
    solve = gsp.partial_transport

    def recording_transport(costs, *args, **kwargs):
        costs_dtypes.append(costs.dtype)
        return solve(costs, *args, **kwargs)

    monkeypatch.setattr(gsp, "partial_transport", recording_transport)
    record = Record()
    cli = DMLCLI(
        DMLModule,
        DMLDataModule,
        subclass_mode_data=True,
        run=False,
        save_config_callback=None,
        args=config_args("synthetic", method)
        + TINY_RUN
        + [
            "--trainer.precision",
            "bf16-mixed",
            "--trainer.max_steps",
            "4",
            "--trainer.accelerator",
            "cpu",
        ],
    )
    cli.trainer.callbacks.append(record)
    before = {n: p.detach().clone() for n, p in cli.model.named_parameters() if p.requires_grad}
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 4 and len(record.losses) == 4
    assert all(torch.isfinite(torch.tensor(record.losses))), record.losses
    assert record.backbone_dtypes == {torch.bfloat16}  # mixed precision is really on
    assert record.term_dtypes == {torch.float32}
    if cli.model.pooling.__class__.__name__ == "GSP":
        assert costs_dtypes and set(costs_dtypes) == {torch.float32}
    unchanged = [
        n
        for n, p in cli.model.named_parameters()
        if n in before and torch.equal(p.detach(), before[n])
    ]
    assert not unchanged, unchanged


def test_the_default_precision_is_bf16_on_a_cuda_gpu_with_bfloat16_and_fp32_elsewhere():
    assert default_precision("auto", cuda_available=True, bf16_supported=True) == "bf16-mixed"
    assert default_precision("gpu", cuda_available=True, bf16_supported=True) == "bf16-mixed"
    assert default_precision("auto", cuda_available=True, bf16_supported=False) == "32-true"
    assert default_precision("cpu", cuda_available=True, bf16_supported=True) == "32-true"
    assert default_precision("auto", cuda_available=False) == "32-true"
    cli = DMLCLI(
        DMLModule,
        DMLDataModule,
        subclass_mode_data=True,
        run=False,
        save_config_callback=None,
        args=config_args("synthetic", "baseline") + TINY_RUN,
    )
    expected = (
        "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"
    )
    assert cli.config.trainer.precision == expected


class Losses(pl.Callback):
    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(outputs["loss"]))


def losses_of(tmp_path, steps=4, **kwargs):
    pl.seed_everything(0)
    module, record = small_module(**kwargs), Losses()
    trainer(
        tmp_path,
        1,
        callbacks=[record],
        limit_val_batches=0,
        enable_checkpointing=False,
        max_steps=steps,
    ).fit(module, small_data())
    return record.values, module


def test_channels_last_gives_the_plain_runs_losses(tmp_path):
    plain, module = losses_of(tmp_path)
    assert not module.uses_channels_last  # the default on a CPU
    nhwc, module = losses_of(
        tmp_path,
        backbone=BackboneConfig("small_cnn", pretrained=False, width=16, channels_last=True),
    )
    assert module.uses_channels_last
    convs = [p for p in module.backbone.parameters() if p.ndim == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    seen = []
    module.backbone.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    module.embed(torch.randn(2, 3, 32, 32))  # an NCHW batch reaches the backbone as NHWC
    assert seen == [True]
    assert nhwc == pytest.approx(plain, rel=1e-4)
    assert plain[-1] != plain[0]  # the steps trained


def test_compiled_and_eager_backbones_give_the_same_losses_and_checkpoint_keys(tmp_path):
    from torch._dynamo.utils import counters

    eager, plain_module = losses_of(tmp_path, steps=3)
    counters.clear()
    compiled, module = losses_of(tmp_path, steps=3, compile=True)
    assert module.compiled_backbone is not None
    assert counters["stats"]["calls_captured"] > 0  # the training steps ran the compiled graph
    assert compiled == pytest.approx(eager, rel=1e-4)
    assert list(module.state_dict()) == list(plain_module.state_dict())  # no _orig_mod. names


def test_a_bad_compile_mode_names_the_key():
    from dml.errors import ConfigError

    with pytest.raises(ConfigError, match="model.compile"):
        small_module(compile="fastest")


def test_loader_workers_default_to_the_cores_per_process(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert default_num_workers(1) == 8  # 15 free cores, capped at 8
    assert default_num_workers(4) == 3  # 4 cores per process, one for the process itself
    assert default_num_workers(16) == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    data = small_data(num_workers=None)
    assert data.workers() == 1
    assert small_data().workers() == 0  # in-memory data: no workers unless asked
