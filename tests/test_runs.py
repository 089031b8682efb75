"""Runs that cannot be lost: NaN stops naming the step, last.ckpt follows every epoch, files are
written atomically, a kill -9 resumes to the same next losses, runs get their own folders,
resume checks its config, figures never stop training, the DDP CLI exits cleanly."""

import csv
import glob
import os
import re
import subprocess
import sys

import pytest
import torch

from dml.callbacks import checkpoint as checkpoint_module
from dml.child_runs import step_losses
from dml.cli import main as cli_main
from dml.compose import config_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["--config", "experiments/trainer.yaml", "--config", "experiments/data/synthetic.yaml"]
TINY = [
    "--data.init_args.train_classes",
    "16",
    "--data.init_args.test_classes",
    "8",
    "--data.init_args.images_per_class",
    "12",
    "--model.backbone.width",
    "8",
    "--trainer.enable_progress_bar",
    "false",
    "--model.evaluation.nmi",
    "false",
    "--trainer.log_every_n_steps",
    "1",
]


def method(name, dataset="synthetic"):
    """The method's layers on top of BASE (dml.compose's rule, less trainer and data)."""
    return config_args(dataset, name)[4:]


def dml(*args, timeout=300):
    """``python -m dml`` in a fresh process (the tests' helpers importable), W&B off."""
    env = dict(
        os.environ,
        WANDB_MODE="disabled",
        PYTHONPATH=os.pathsep.join([os.path.join(REPO, "tests"), REPO]),
    )
    return subprocess.run(
        [sys.executable, "-m", "dml", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_folders(root):
    return sorted(os.path.dirname(p) for p in glob.glob(os.path.join(str(root), "*", "run.json")))


def epoch_of(path):
    return torch.load(path, map_location="cpu", weights_only=True)["epoch"]


# --- NaN ---------------------------------------------------------------------------------
def test_a_nan_run_exits_non_zero_naming_the_step(tmp_path):
    # the SOP/In-Shop settings (no NMI) and no dashboard: nothing else would notice the NaN
    out = dml(
        "fit",
        *BASE,
        *method("baseline"),
        *TINY,
        "--model.optimizer.lr",
        "1e6",
        "--dashboard.enabled",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path),
    )
    assert out.returncode == 2, out.stderr[-2000:]
    error = out.stderr.strip().splitlines()[-1]
    # lr 1e6 first sends BatchNorm's running variances to inf (the loss is still finite),
    # then the loss to NaN: whichever comes first stops the run, naming the step
    assert re.match(
        r"error: non-finite (loss at step \d+ \(epoch \d+, batch \d+\): "
        r"loss_metric = nan|model state after step \d+ \(epoch \d+\): \S+)",
        error,
    )
    assert "learning rates: backbone 1e+06, head 1e+06" in error
    assert "Traceback" not in out.stderr
    (run,) = run_folders(tmp_path)
    for path in glob.glob(os.path.join(run, "checkpoints", "*.ckpt")):  # only finite states
        weights = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        assert all(torch.isfinite(w).all() for w in weights.values()), path


def test_a_non_finite_buffer_is_never_checkpointed(tmp_path, capsys):
    # run_helpers.BlowUpAt: a BatchNorm running variance goes to inf at the end of epoch 1
    with pytest.raises(SystemExit):
        cli_main(
            [
                "fit",
                *BASE,
                *method("baseline"),
                *TINY,
                "--trainer.max_epochs",
                "3",
                "--dashboard.enabled",
                "false",
                "--trainer.default_root_dir",
                str(tmp_path),
                "--trainer.logger",
                "false",
                "--trainer.callbacks+=run_helpers.BlowUpAt",
            ]
        )
    err = capsys.readouterr().err
    assert "non-finite model state after step 12 (epoch 1): backbone." in err
    (run,) = run_folders(tmp_path)
    assert epoch_of(os.path.join(run, "checkpoints", "last.ckpt")) == 0


def poison_metric(monkeypatch, bad_steps, factor=float("nan")):
    """Objective.forward multiplying the metric term by ``factor`` at the training steps (calls,
    from 0) in ``bad_steps``; returns the list of steps computed so far."""
    from dml.objective import Objective

    compute = Objective.forward
    steps = []

    def poisoned(self, embedded, labels):
        terms = compute(self, embedded, labels)
        if len(steps) in bad_steps:
            terms["metric"] = terms["metric"] * factor
        steps.append(len(steps))
        return terms

    monkeypatch.setattr(Objective, "forward", poisoned)
    return steps


def test_nan_stops_the_run_and_leaves_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    poison_metric(monkeypatch, range(8, 1000))  # finite until step 8 (epoch 1, batch 2)
    with pytest.raises(SystemExit) as exc:
        cli_main(
            [
                "fit",
                *BASE,
                *method("baseline"),
                *TINY,
                "--dashboard.enabled",
                "false",
                "--trainer.default_root_dir",
                str(tmp_path),
                "--trainer.logger",
                "false",
            ]
        )
    assert exc.value.code == 2
    assert "non-finite loss at step 8 (epoch 1, batch 2)" in capsys.readouterr().err
    (run,) = run_folders(tmp_path)
    last = os.path.join(run, "checkpoints", "last.ckpt")
    assert epoch_of(last) == 0  # epoch 0's state, loadable
    assert not [f for f in os.listdir(os.path.join(run, "checkpoints")) if "partial" in f]


def test_nan_in_the_last_step_of_an_epoch_is_caught_before_its_validation(
    tmp_path, monkeypatch, capsys
):
    # The losses are read every 50 steps (no host-device sync per step): a NaN in an epoch's
    # last step must be caught by the read before validation and checkpoints.
    steps = poison_metric(monkeypatch, {11})  # epoch 1's last step (6 batches an epoch)
    with pytest.raises(SystemExit):
        cli_main(
            [
                "fit",
                *BASE,
                *method("baseline"),
                *TINY,
                "--dashboard.enabled",
                "false",
                "--trainer.default_root_dir",
                str(tmp_path),
                "--trainer.logger",
                "false",
            ]
        )
    assert "non-finite loss at step 11 (epoch 1, batch 5)" in capsys.readouterr().err
    assert len(steps) == 12  # stopped there: nothing trained on after the NaN step
    (run,) = run_folders(tmp_path)
    assert epoch_of(os.path.join(run, "checkpoints", "last.ckpt")) == 0


def test_a_nan_inside_an_epoch_stops_the_run_within_the_guards_read_interval(
    tmp_path, monkeypatch, capsys
):
    from dml.loss_watch import LossWatch

    original = LossWatch.__init__
    monkeypatch.setattr(LossWatch, "__init__", lambda self, every=50: original(self, every=2))
    steps = poison_metric(monkeypatch, range(7, 1000))  # from step 7 (epoch 1, batch 1) on
    with pytest.raises(SystemExit):
        cli_main(
            [
                "fit",
                *BASE,
                *method("baseline"),
                *TINY,
                "--dashboard.enabled",
                "false",
                "--trainer.default_root_dir",
                str(tmp_path),
                "--trainer.logger",
                "false",
            ]
        )
    assert (
        "non-finite loss at step 7 (epoch 1, batch 1): loss_metric = nan" in capsys.readouterr().err
    )
    assert len(steps) == 8  # read after every 2nd step: steps 6-7 read at step 7, not epoch end


def test_skip_instead_of_stop_is_an_option(tmp_path, monkeypatch):
    poison_metric(monkeypatch, {3}, float("inf"))  # the step at global step 3
    with pytest.warns(UserWarning, match="non-finite loss at step 3.*step skipped"):
        cli = cli_main(
            [
                "fit",
                *BASE,
                *method("baseline"),
                *TINY,
                "--trainer.max_epochs",
                "1",
                "--dashboard.enabled",
                "false",
                "--model.nonfinite_loss",
                "skip",
                "--trainer.default_root_dir",
                str(tmp_path),
                "--trainer.logger",
                "false",
            ]
        )
    assert cli.model.skipped_steps == 1 and cli.trainer.current_epoch == 1
    assert all(torch.isfinite(p).all() for p in cli.model.parameters())


# --- checkpoints ----------------------------------------------------------------------------
def test_last_ckpt_is_the_last_epoch_whatever_the_monitor_did(tmp_path):
    import pytorch_lightning as pl

    from dml.callbacks import RunCheckpoint
    from dml.data import SyntheticDataModule
    from dml.module import BackboneConfig, DMLModule, EvalConfig

    pl.seed_everything(0)
    module = DMLModule(
        backbone=BackboneConfig("small_cnn", pretrained=False, width=8),
        embedding_dim=16,
        num_classes=16,
        evaluation=EvalConfig(nmi=False),
    )
    data = SyntheticDataModule(train_classes=16, test_classes=8, images_per_class=12)
    # mode min: MAP@R rises with training, so the "best" is epoch 0 and the monitored
    # checkpoint is never saved again, the case where Lightning leaves last.ckpt behind
    ckpt = RunCheckpoint(
        dirpath=str(tmp_path), monitor="val/MAP@R", mode="min", filename="best-{epoch:03d}"
    )
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        callbacks=[ckpt],
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, data)
    assert sorted(os.listdir(tmp_path)) == ["best-epoch=000.ckpt", "last.ckpt"]
    assert epoch_of(tmp_path / "last.ckpt") == 2


def test_the_cli_writes_checkpoints_atomically_unless_a_plugin_says_otherwise():
    """The CLI hands every trainer ``AtomicCheckpointIO``; a checkpoint IO named in
    ``trainer.plugins`` is kept (no callback replaces it)."""
    from pytorch_lightning.plugins.io import TorchCheckpointIO

    from dml.cli import DMLCLI
    from dml.data import DMLDataModule
    from dml.module import DMLModule

    def checkpoint_io(*args):
        cli = DMLCLI(
            DMLModule,
            DMLDataModule,
            subclass_mode_data=True,
            run=False,
            args=config_args("synthetic", "baseline") + ["--trainer.logger", "false", *args],
        )
        return type(cli.trainer.strategy.checkpoint_io)

    assert checkpoint_io() is checkpoint_module.AtomicCheckpointIO
    custom = '{"class_path": "pytorch_lightning.plugins.io.TorchCheckpointIO"}'
    assert checkpoint_io("--trainer.plugins", custom) is TorchCheckpointIO


def test_a_failed_write_leaves_no_file_under_the_checkpoint_name(tmp_path, monkeypatch):
    target = tmp_path / "best-epoch=000.ckpt"
    target.write_bytes(b"the previous, complete checkpoint")

    def disk_full(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", disk_full)
    with pytest.raises(OSError, match=r"no space left on the device writing .*best-epoch=000"):
        checkpoint_module.AtomicCheckpointIO().save_checkpoint({"x": 1}, str(target))
    assert os.listdir(tmp_path) == ["best-epoch=000.ckpt"]  # no partial file left either
    assert target.read_bytes() == b"the previous, complete checkpoint"


# --- kill -9 and resume -----------------------------------------------------------------------
def test_kill_9_mid_epoch_then_resume_gives_the_uninterrupted_losses(tmp_path):
    # CCP (a round ends at every validation: rounds, lambda, theta_prev, proxies change) with
    # an adaptive XBN memory (the memory in the model, the Kalman filter in the callback):
    # every piece of state a resume must bring back. 6 steps an epoch.
    args = [
        "fit",
        *BASE,
        *method("ccp_c2"),
        *TINY,
        "--model.memory.enabled",
        "true",
        "--model.memory.size",
        "128",
        "--model.memory.start_iteration",
        "3",
        "--xbn.enabled",
        "true",
        "--xbn.adaptive",
        "true",
        "--ccp.patience",
        "1",
        "--ccp.min_delta",
        "1.0",
        "--trainer.max_epochs",
        "3",
        "--dashboard.enabled",
        "false",
    ]
    full = dml(*args, "--trainer.default_root_dir", str(tmp_path / "a"))
    assert full.returncode == 0, full.stderr[-3000:]
    marker = tmp_path / "killed"
    killed = dml(
        *args,
        "--trainer.default_root_dir",
        str(tmp_path / "b"),
        '--trainer.callbacks+={"class_path": "run_helpers.KillAt", '
        f'"init_args": {{"step": 15, "marker": "{marker}"}}}}',
    )
    assert killed.returncode == -9 and marker.exists()
    (run,) = run_folders(tmp_path / "b")
    assert epoch_of(os.path.join(run, "checkpoints", "last.ckpt")) == 1  # epoch 2 unfinished
    # `make resume`, with this interpreter and without (re)building the environment
    resumed = subprocess.run(
        ["make", "-s", "-o", ".venv/.installed", "resume", f"RUN={run}", f"PY={sys.executable}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=os.path.join(REPO, "tests")),
    )
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    lines = [x for x in resumed.stdout.splitlines() if x.strip()]
    first = [x for x in lines if "resumed" in x or "untrained" in x][0]
    assert first.startswith("resumed at epoch 2, step 12 from ")
    for state in (
        "optimizer",
        "ChanceConstraintProjection",
        "CrossBatchNormalization",
        "RNG states",
    ):
        assert state in first
    (reference,) = run_folders(tmp_path / "a")
    expected, got = step_losses(reference), step_losses(run)
    assert sorted(expected) == sorted(got) and len(expected) >= 18
    for step in range(12, 18):  # epoch 2, after the resume
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step
    # what the killed process logged after its checkpoint (steps 12-14) is not there twice
    with open(os.path.join(run, "metrics.csv")) as f:
        logged = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert sorted(logged) == list(range(18))
    assert os.path.exists(os.path.join(run, "config.1.yaml"))  # the first config kept


def test_two_runs_started_at_once_get_their_own_folders(tmp_path):
    args = [
        "fit",
        *BASE,
        *method("baseline"),
        *TINY,
        "--trainer.max_epochs",
        "2",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--run_name",
        "same",
    ]
    env = dict(os.environ, WANDB_MODE="disabled")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "dml", *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    folders = run_folders(tmp_path)
    assert len(folders) == 2
    for folder in folders:
        assert sorted(os.listdir(os.path.join(folder, "checkpoints"))) == [
            "best-epoch=001.ckpt",
            "last.ckpt",
        ]
        assert epoch_of(os.path.join(folder, "checkpoints", "last.ckpt")) == 1
        assert {"config.yaml", "metrics.csv", "run.json", "figures"} <= set(os.listdir(folder))
        assert sorted(step_losses(folder)) == list(range(12))  # one run's, not interleaved


def one_epoch_run(tmp_path, name: str):
    """(run folder, its last.ckpt) of one epoch of method ``name`` on the tiny data."""
    cli_main(
        [
            "fit",
            *BASE,
            *method(name),
            *TINY,
            "--trainer.max_epochs",
            "1",
            "--dashboard.enabled",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.logger",
            "false",
        ]
    )
    (run,) = run_folders(tmp_path)
    return run, os.path.join(run, "checkpoints", "last.ckpt")


def test_resume_with_a_changed_method_is_an_error_naming_the_keys(tmp_path, capsys):
    run, last = one_epoch_run(tmp_path, "xbn")
    with pytest.raises(SystemExit):
        cli_main(
            [
                "fit",
                "--config",
                os.path.join(run, "config.yaml"),
                *method("ccp_c2"),
                "--ckpt_path",
                last,
            ]
        )
    err = capsys.readouterr().err
    assert "the config differs from the checkpoint's in ccp.enabled, " in err
    assert "model.loss.name" in err and "model.loss.proxies_per_class" in err
    with pytest.raises(SystemExit):  # the memory switched off: its saved state would be lost
        cli_main(
            [
                "fit",
                "--config",
                os.path.join(run, "config.yaml"),
                "--ckpt_path",
                last,
                "--model.memory.enabled",
                "false",
            ]
        )
    assert (
        "differs from the checkpoint's in model.memory.enabled (model.memory.enabled: "
        "True in the checkpoint, False now)" in capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        cli_main(
            [
                "fit",
                "--config",
                os.path.join(run, "config.yaml"),
                "--ckpt_path",
                last,
                "--model.optimizer.lr",
                "0.1",
            ]
        )
    assert "model.optimizer.lr: 0.003 in the checkpoint, 0.1 now" in capsys.readouterr().err
    # allowed on purpose: the new learning rate is used, not the checkpoint's
    cli = cli_main(
        [
            "fit",
            "--config",
            os.path.join(run, "config.yaml"),
            "--ckpt_path",
            last,
            "--model.optimizer.lr",
            "0.1",
            "--resume_changes",
            "model.optimizer.lr",
            "--trainer.max_epochs",
            "2",
        ]
    )
    assert {g["lr"] for g in cli.trainer.optimizers[0].param_groups} == {0.1}
    assert run_folders(tmp_path) == [run] and cli.trainer.current_epoch == 2


def test_a_checkpoint_older_than_a_config_key_resumes_at_that_keys_default(tmp_path, capsys):
    from dml.cli import CONFIG_KEY

    run, last = one_epoch_run(tmp_path, "baseline")
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    for key in ("warmup_epochs", "layer_decay"):  # as written before these keys existed
        del checkpoint[CONFIG_KEY]["model"]["optimizer"][key]
    del checkpoint[CONFIG_KEY]["model"]["backbone"]["timm_args"]
    torch.save(checkpoint, last)
    with pytest.raises(SystemExit):  # a key it predates, set to other than its default
        cli_main(
            [
                "fit",
                "--config",
                os.path.join(run, "config.yaml"),
                "--ckpt_path",
                last,
                "--model.optimizer.warmup_epochs",
                "1",
            ]
        )
    assert (
        "model.optimizer.warmup_epochs: '<absent>' in the checkpoint, 1.0 now"
        in capsys.readouterr().err
    )
    cli = cli_main(
        [
            "fit",
            "--config",
            os.path.join(run, "config.yaml"),
            "--ckpt_path",
            last,
            "--trainer.max_epochs",
            "2",
        ]
    )
    assert cli.trainer.current_epoch == 2


# --- figures, console ----------------------------------------------------------------------------
def test_a_figure_that_raises_does_not_stop_training(tmp_path, monkeypatch):
    import dml.visualization as vis

    def broken(*args, **kwargs):
        raise RuntimeError("no display")

    monkeypatch.setattr(vis, "retrieval_grid", broken)
    with pytest.warns(UserWarning, match="the retrieval figure of epoch001 failed"):
        cli = cli_main(
            [
                "fit",
                *BASE,
                *method("baseline"),
                *TINY,
                "--trainer.max_epochs",
                "2",
                "--dashboard.every_n_epochs",
                "2",
                "--trainer.default_root_dir",
                str(tmp_path),
                "--trainer.logger",
                "false",
            ]
        )
    assert cli.trainer.current_epoch == 2
    (run,) = run_folders(tmp_path)
    assert sorted(os.listdir(os.path.join(run, "figures"))) == [
        "projection_epoch001.png",
        "training_epoch001.png",
        "worst_classes_epoch001.csv",
    ]  # the grids failed


def test_the_epoch_line_is_whole_under_the_progress_bar(tmp_path, capfd):
    cli_main(
        [
            "fit",
            *BASE,
            *method("baseline"),
            *TINY,
            "--trainer.max_epochs",
            "1",
            "--trainer.enable_progress_bar",
            "true",
            "--dashboard.enabled",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.logger",
            "false",
        ]
    )
    # a terminal redraws the bars around the line (\r and cursor moves); what is left must be
    # the whole line
    out = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", capfd.readouterr().out).replace("\r", "\n")
    lines = [x.strip() for x in out.split("\n")]
    epoch = [x for x in lines if "| R@1" in x]
    assert epoch and all(
        x.startswith(("untrained model |", "epoch   0 |", "best epoch 0")) for x in epoch
    )
    assert any(
        x.startswith("epoch   0 | val: test split | R@1") and x.endswith(tuple("0123456789"))
        for x in epoch
    )


def metric_lines(stdout):
    return [x for x in stdout.splitlines() if "| R@1" in x]


def parse_metrics(line):
    """{name: percent} from a printed metrics line."""
    return {k: float(v) for k, v in re.findall(r"(R@\d+|MAP@R|R-Precision|NMI) +([\d.]+)", line)}


@pytest.mark.parametrize("fold", [None, 1])
def test_every_printed_number_names_its_split_and_the_run_ends_with_its_best_epoch(tmp_path, fold):
    args = ["--data.init_args.mlrc_fold", str(fold)] if fold is not None else []
    out = dml(
        "fit",
        *BASE,
        *method("baseline"),
        *TINY,
        "--trainer.max_epochs",
        "3",
        "--dashboard.enabled",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.enable_progress_bar",
        "false",
        *args,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    split = "test split" if fold is None else f"MLRC fold {fold}"
    lines = metric_lines(out.stdout)
    assert len(lines) == 5  # untrained, 3 epochs, the summary
    assert all(f"| val: {split} |" in x for x in lines)
    notice = [x for x in out.stdout.splitlines() if x.startswith("validation: ")]
    assert len(notice) == 1
    assert ("test-set model selection" in notice[0]) == (fold is None)
    # the summary: the epoch whose MAP@R the checkpoint callback kept, its metrics, its file
    (run,) = run_folders(tmp_path)
    with open(os.path.join(run, "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/MAP@R")]
    by_epoch = {int(r["epoch"]): r for r in rows}
    best = max(sorted(by_epoch), key=lambda e: float(by_epoch[e]["val/MAP@R"]))
    summary = lines[-1]
    assert summary.startswith(f"best epoch {best} by val/MAP@R | val: {split} | ")
    assert summary.split(" | ")[2] == lines[1 + best].split(" | ")[2]  # that epoch's line
    expected = {
        k: round(100 * float(by_epoch[best][f"val/{k}"]), 1) for k in parse_metrics(summary)
    }
    assert parse_metrics(summary) == pytest.approx(expected, abs=0.051)
    path = summary.split(" | checkpoint ")[1]
    assert os.path.isfile(path) and path.startswith(run)
    assert epoch_of(path) == best


def test_test_prints_percent_with_its_split_and_no_fraction_table(tmp_path):
    assert (
        dml(
            "fit",
            *BASE,
            *method("baseline"),
            *TINY,
            "--trainer.max_epochs",
            "1",
            "--dashboard.enabled",
            "false",
            "--trainer.logger",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
        ).returncode
        == 0
    )
    (run,) = run_folders(tmp_path)
    out = dml(
        "test",
        "--config",
        os.path.join(run, "config.yaml"),
        "--ckpt_path",
        os.path.join(run, "checkpoints", "last.ckpt"),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path / "test"),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (line,) = metric_lines(out.stdout)
    assert line.startswith("test: test split | R@1 ")
    assert not re.search(r"0\.\d{5,}", out.stdout + out.stderr)  # no 16-digit fractions


def test_a_key_misspelled_in_a_config_file_names_the_file(tmp_path, capsys):
    bad = tmp_path / "method.yaml"
    bad.write_text("model:\n  optimizer:\n    lrr: 0.1\n")
    with pytest.raises(SystemExit):
        cli_main(["fit", *BASE, "--config", str(bad)])
    err = capsys.readouterr().err
    assert f"error: {bad}: " in err and "model.optimizer.lrr" in err
    bad.write_text("xbn:\n  recount_every: 0\n")
    with pytest.raises(SystemExit):
        cli_main(
            [
                "fit",
                *BASE,
                "--config",
                str(bad),
                "--trainer.default_root_dir",
                str(tmp_path / "runs"),
            ]
        )
    assert f"error: {bad}: xbn.recount_every must be >= 1" in capsys.readouterr().err
    assert run_folders(tmp_path / "runs") == []  # a run that never started leaves no folder


# --- several processes -------------------------------------------------------------------------
def test_ddp_cli_with_the_default_trainer_config_draws_and_resumes(tmp_path):
    """`make train DEVICES=2`: 2 gloo processes, dashboard on (drawn at the last epoch), then a
    resume on 2 processes; both must exit, within the time limit."""
    args = [
        "fit",
        *BASE,
        *method("baseline"),
        *TINY,
        "--trainer.devices",
        "2",
        "--trainer.accelerator",
        "cpu",
        "--trainer.max_epochs",
        "2",
        "--trainer.default_root_dir",
        str(tmp_path),
    ]
    first = dml(*args, timeout=240)
    assert first.returncode == 0, first.stderr[-3000:]
    (run,) = run_folders(tmp_path)
    assert sorted(os.listdir(os.path.join(run, "figures"))) == [
        "projection_epoch001.png",
        "retrieval_epoch001.png",
        "training_epoch001.png",
        "worst_classes_epoch001.csv",
        "worst_epoch001.png",
    ]
    again = dml(
        "fit",
        "--config",
        os.path.join(run, "config.yaml"),
        "--ckpt_path",
        os.path.join(run, "checkpoints", "last.ckpt"),
        "--trainer.max_epochs",
        "3",
        timeout=240,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed at epoch 2, step " in again.stdout + again.stderr
    assert epoch_of(os.path.join(run, "checkpoints", "last.ckpt")) == 2
    assert run_folders(tmp_path) == [run]


# --- a run folder owns its outputs ---------------------------------------------------------------
def make_resume(run, *args):
    """`make resume RUN=<run>` with this interpreter, without (re)building the environment."""
    return subprocess.run(
        [
            "make",
            "-s",
            "-o",
            ".venv/.installed",
            "resume",
            f"RUN={run}",
            f"PY={sys.executable}",
            *args,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=os.path.join(REPO, "tests")),
    )


def snapshot(folder):
    """{relative path: (size, mtime_ns)} of every file under ``folder``."""
    out = {}
    for base, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(base, name)
            out[os.path.relpath(path, folder)] = (os.path.getsize(path), os.stat(path).st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def two_epoch_run(tmp_path_factory):
    """One run folder trained for 2 epochs; each test works on its own copy (a copied run is a
    run: that is what the copy test below establishes)."""
    root = tmp_path_factory.mktemp("trained")
    out = dml(
        "fit",
        *BASE,
        *method("baseline"),
        *TINY,
        "--trainer.max_epochs",
        "2",
        "--dashboard.enabled",
        "false",
        "--trainer.logger",
        "false",
        "--trainer.default_root_dir",
        str(root),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (run,) = run_folders(root)
    return run


def own_copy(run, root):
    import shutil

    target = os.path.join(str(root), os.path.basename(run))
    shutil.copytree(run, target)
    return target


@pytest.mark.parametrize("how", ["copy", "move", "move-old-config"])
def test_a_copied_or_moved_run_folder_resumes_into_itself_only(tmp_path, how, two_epoch_run):
    """`make resume` of a copy writes nothing into the original; of a moved folder (with a
    space in its name) recreates nothing at the old path. "old-config": a config.yaml that
    names the checkpoint folder by its absolute path, as runs before this version wrote it."""
    import shutil

    import yaml

    original = own_copy(two_epoch_run, tmp_path / "runs")
    if how == "move-old-config":
        config_file = os.path.join(original, "config.yaml")
        config = yaml.safe_load(open(config_file))
        config["trainer"]["callbacks"][0]["init_args"]["dirpath"] = os.path.join(
            original, "checkpoints"
        )
        yaml.safe_dump(config, open(config_file, "w"))
    before = snapshot(original)
    target = str(tmp_path / "elsewhere" / "my run")
    os.makedirs(os.path.dirname(target))
    (shutil.copytree if how == "copy" else shutil.move)(original, target)
    out = make_resume(target, "ARGS=--trainer.max_epochs 4")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    if how == "copy":
        assert snapshot(original) == before  # not one byte of the original changed
    else:
        assert not os.path.exists(original)  # nothing recreated at the old path
    assert run_folders(tmp_path / "runs") == ([original] if how == "copy" else [])
    checkpoints = sorted(os.listdir(os.path.join(target, "checkpoints")))
    assert (
        "last.ckpt" in checkpoints
        and epoch_of(os.path.join(target, "checkpoints", "last.ckpt")) == 3
    )
    best = [c for c in checkpoints if c.startswith("best-")]
    assert len(best) == 1  # the folder's own best, replaced in the folder when it improved
    assert not glob.glob(str(tmp_path / "elsewhere" / "*.ckpt"))


def test_a_second_process_cannot_train_in_a_held_run_folder(tmp_path, two_epoch_run):
    from dml import runs

    run = own_copy(two_epoch_run, tmp_path)
    runs.lock_run_dir(run)  # as the process training in it holds it
    before = snapshot(run)
    try:
        out = make_resume(run, "ARGS=--trainer.max_epochs 3")
    finally:
        runs.unlock_run_dirs()
    assert out.returncode == 2
    error = out.stderr.strip().splitlines()
    assert any(
        line.startswith("error: run folder ")
        and f"process {os.getpid()}" in line
        and "is in use" in line
        for line in error
    ), out.stderr[-2000:]
    assert snapshot(run) == before  # nothing written
    out = make_resume(run, "ARGS=--trainer.max_epochs 3")  # once it is free, it resumes
    assert out.returncode == 0, out.stderr[-3000:]
    assert epoch_of(os.path.join(run, "checkpoints", "last.ckpt")) == 2


def test_a_mapping_where_the_default_is_none_is_compared_entry_by_entry():
    """``model.terms`` defaults to None and is a mapping in a run that has terms: the default
    is not a value of the mapping's entries (a resume of such a run is not refused), an empty
    mapping is none, and a changed entry is named."""
    from dml.runs import protected_differences

    terms = {"u": {"class_path": "a.B", "init_args": {"weight": 0.1}}}
    defaults = {"model": {"terms": None}}
    assert (
        protected_differences(
            {"model": {"terms": terms}}, {"model": {"terms": terms}}, defaults=defaults
        )
        == []
    )
    assert (
        protected_differences(
            {"model": {"terms": {}}}, {"model": {"terms": None}}, defaults=defaults
        )
        == []
    )
    changed = {"u": {"class_path": "a.B", "init_args": {"weight": 0.2}}}
    assert protected_differences(
        {"model": {"terms": terms}}, {"model": {"terms": changed}}, defaults=defaults
    ) == ["model.terms.u.init_args.weight"]
    assert protected_differences({"model": {}}, {"model": {"terms": terms}}, defaults=defaults) == [
        "model.terms",
        "model.terms.u.class_path",
        "model.terms.u.init_args.weight",
    ]


def test_diagnostics_may_change_on_resume_and_a_checkpoint_without_them_is_not_refused():
    """``model.diagnostics`` only adds logged values: switching it is no change to what is
    trained, and a checkpoint written before the key existed resumes with its default."""
    from dml.runs import protected_differences

    saved = {"model": {"embedding_dim": 64}}
    assert (
        protected_differences(
            saved,
            {"model": {"embedding_dim": 64, "diagnostics": False}},
            defaults={"model": {"diagnostics": True}},
        )
        == []
    )
    assert protected_differences(
        saved,
        {"model": {"embedding_dim": 32, "diagnostics": True}},
        defaults={"model": {"diagnostics": True}},
    ) == ["model.embedding_dim"]
