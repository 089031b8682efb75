"""Settings and inputs that would train or score something else than asked: each is one line
naming the key or file, exit status 2, and nothing half-written."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_runs import BASE, TINY, method, run_folders

from dml.callbacks import checkpoint as checkpoint_module
from dml.cli import main as cli_main
from dml.data import CUBDataModule, MetadataError, SOPDataModule
from dml.errors import DiskFullError
from dml.metrics import nmi, retrieval_metrics

TRAIN = [
    *BASE,
    *method("baseline"),
    *TINY,
    "--trainer.max_epochs",
    "1",
    "--dashboard.enabled",
    "false",
    "--trainer.logger",
    "false",
]


def one_line_error(capsys, tmp_path, *args):
    with pytest.raises(SystemExit) as stop:
        cli_main(["fit", *TRAIN, "--trainer.default_root_dir", str(tmp_path), *args])
    assert stop.value.code == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1
    return lines[0]


@pytest.mark.parametrize(
    "args, says",
    [
        (["--model.embedding_dim", "0"], "model.embedding_dim: expected a value >= 1, got 0"),
        (["--model.embedding_dim", "-5"], "model.embedding_dim: expected a value >= 1, got -5"),
        (["--model.optimizer.lr", "-1"], "model.optimizer.lr: expected a value > 0, got -1.0"),
        (["--model.optimizer.lr", "nan"], "model.optimizer.lr"),
        (["--model.optimizer.weight_decay", "-0.1"], "model.optimizer.weight_decay: expected"),
        (["--model.memory.size", "-3"], "model.memory.size: expected a value >= 1, got -3"),
        (["--model.ibc.tau", "0"], "model.ibc.tau: expected a value > 0, got 0.0"),
        (["--data.init_args.eval_batch_size", "0"], "data.init_args.eval_batch_size: expected"),
        (
            ["--data.init_args.samples_per_class", "1"],
            "data.init_args.samples_per_class: 1 image per class in a batch gives multi_similarity "
            "no positive pair",
        ),
        (["--trainer.max_epoch", "2"], "unrecognized arguments: --trainer.max_epoch"),
        (["--trainer.max_epochs", "0"], "trainer.max_epochs: expected a value >= 1, got 0"),
        (["--trainer.accumulate_grad_batches", "0"], "trainer.accumulate_grad_batches: expected"),
        (["--data.init_args.image_size", "0"], "data.init_args.image_size: expected a value >= 8"),
        (
            [
                "--model.loss.name",
                "xbm_contrastive",
                "--model.loss.params",
                "{margin: 0.5}",
                "--model.loss.miner",
                "null",
                "--model.loss.proxies_per_class",
                "2",
            ],
            "model.loss.proxies_per_class: xbm_contrastive is not a pytorch-metric-learning "
            "pair loss",
        ),
        (
            [
                "--model.loss.name",
                "proxy_anchor",
                "--model.loss.params",
                "{}",
                "--model.loss.proxies_per_class",
                "2",
            ],
            "model.loss.proxies_per_class: proxy_anchor already has its own proxies",
        ),
    ],
)
def test_an_invalid_setting_is_one_line_naming_the_key(tmp_path, capsys, args, says):
    line = one_line_error(capsys, tmp_path, *args)
    assert says in line
    # the value came from the command line: no config file is blamed for it
    assert not line.startswith("error: experiments/")
    assert run_folders(tmp_path) == [] and not any(tmp_path.iterdir())  # no folder left


def test_a_proxy_loss_trains_with_one_image_per_class(tmp_path):
    cli_main(
        [
            "fit",
            *BASE,
            *method("proxy_anchor"),
            *TINY,
            "--trainer.max_epochs",
            "1",
            "--dashboard.enabled",
            "false",
            "--trainer.logger",
            "false",
            "--data.init_args.samples_per_class",
            "1",
            "--trainer.default_root_dir",
            str(tmp_path),
        ]
    )
    assert len(run_folders(tmp_path)) == 1


def test_a_yaml_syntax_error_names_the_file_line_and_column(tmp_path, capsys):
    bad = tmp_path / "method.yaml"
    bad.write_text("model:\n  optimizer: {lr: 0.1\n")
    line = one_line_error(capsys, tmp_path, "--config", str(bad))
    assert line.startswith(f"error: {bad}: not valid YAML at line 3, column 1: ")
    bad.write_text("- a list\n- not a mapping\n")
    line = one_line_error(capsys, tmp_path, "--config", str(bad))
    assert (
        line == f"error: {bad}: expected a mapping of config keys (model:, data:, "
        f"trainer:, ...), got a list"
    )


def test_labels_that_are_not_integers_are_an_error_not_merged_classes():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 8)).astype(np.float32)
    fractions = np.repeat([0.1, 0.2, 0.3, 0.4], 10)  # int() would make them one class
    with pytest.raises(ValueError, match="labels must be integer class ids; got 40"):
        retrieval_metrics(x, fractions)
    with pytest.raises(ValueError, match="gallery_labels must be integer"):
        retrieval_metrics(x, np.arange(40) % 4, gallery_embeddings=x, gallery_labels=fractions)
    with pytest.raises(ValueError, match="labels must be integer"):
        nmi(x, fractions)
    with pytest.raises(ValueError, match="must be integers, got torch.bool"):
        retrieval_metrics(x, np.arange(40) % 2 == 0)
    whole = np.repeat([0.0, 1.0, 2.0, 3.0], 10)  # whole numbers stored as floats are fine
    assert retrieval_metrics(x, whole) == retrieval_metrics(x, whole.astype(np.int64))


def write_cub(root, images, labels):
    base = root / "CUB_200_2011"
    base.mkdir(parents=True, exist_ok=True)
    (base / "images.txt").write_text("".join(f"{i} {p}\n" for i, p in images))
    (base / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, c in labels))
    (base / "classes.txt").write_text("1 001.a\n")


@pytest.mark.parametrize(
    "images, labels, says",
    [
        (
            [(1, "a/1.jpg"), (2, "a/2.jpg")],
            [(1, 1), (2, 0)],
            "image_class_labels.txt, line 2: class_id must be in 1..200, got 0",
        ),
        (
            [(1, "a/1.jpg"), (2, "a/2.jpg")],
            [(1, 250), (2, 1)],
            "image_class_labels.txt, line 1: class_id must be in 1..200, got 250",
        ),
        (
            [(1, "a/1.jpg"), (1, "a/2.jpg")],
            [(1, 1)],
            "images.txt, line 2: image_id 1 appears twice",
        ),
        (
            [(1, "a/1.jpg"), (2, "a/2.jpg")],
            [(1, 1), (2, 1), (2, 3)],
            "image_class_labels.txt, line 3: image_id 2 appears twice",
        ),
    ],
)
def test_cub_metadata_out_of_range_or_duplicated_is_named_with_verify_off(
    tmp_path, images, labels, says
):
    write_cub(tmp_path, images, labels)
    with pytest.raises(MetadataError, match=says):
        _ = CUBDataModule(root=str(tmp_path), verify=False).splits


def test_sop_class_ids_outside_their_split_are_named(tmp_path):
    base = tmp_path / "Stanford_Online_Products"
    base.mkdir()
    header = "image_id class_id super_class_id path\n"
    (base / "Ebay_train.txt").write_text(header + "1 1 1 a/1.JPG\n2 11319 1 a/2.JPG\n")
    (base / "Ebay_test.txt").write_text(header + "1 11319 1 b/1.JPG\n")
    with pytest.raises(
        MetadataError, match="Ebay_train.txt, line 3: class_id must be in 1..11318, got 11319"
    ):
        _ = SOPDataModule(root=str(tmp_path), verify=False).splits


# --- a full disk, and the leftovers of a killed write ----------------------------------------
def save_to_a_full_disk(monkeypatch):
    """torch.save as on a full disk: the bytes go to /dev/full, which answers ENOSPC."""
    real = torch.save

    def full(obj, f):
        with open("/dev/full", "wb") as sink:
            real(obj, sink)
            sink.flush()

    monkeypatch.setattr(checkpoint_module.torch, "save", full)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")
def test_a_full_disk_is_one_line_naming_the_file_and_keeps_the_old_one(
    tmp_path, monkeypatch, capsys
):
    path = tmp_path / "last.ckpt"
    checkpoint_module.atomic_torch_save({"epoch": 1}, str(path))
    save_to_a_full_disk(monkeypatch)
    with pytest.raises(DiskFullError, match=f"no space left on the device writing {path}"):
        checkpoint_module.atomic_torch_save({"epoch": 2}, str(path))
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["last.ckpt"]  # no temporary file left
    # through the command line: the run stops with one line
    save_to_a_full_disk(monkeypatch)
    line = one_line_error(capsys, tmp_path / "runs")
    assert line.startswith("error: no space left on the device writing ") and line.endswith(
        "Free space, then resume the run"
    )


def test_torch_saves_full_disk_error_chain_is_recognised(tmp_path, monkeypatch):
    """On a real full disk torch.save's file writer fails with OSError ENOSPC, then, while
    closing the archive, with RuntimeError "unexpected pos"; the second hides the first."""
    import errno

    def full(obj, f):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:  # torch's own chaining, as torch raises it
            raise RuntimeError(  # noqa: B904
                "[enforce fail at inline_container.cc:672] . unexpected pos 109760 vs 109652"
            )

    monkeypatch.setattr(checkpoint_module.torch, "save", full)
    with pytest.raises(DiskFullError, match="no space left on the device writing "):
        checkpoint_module.atomic_torch_save({"epoch": 2}, str(tmp_path / "last.ckpt"))
    assert os.listdir(tmp_path) == []


def test_the_temporary_file_of_a_killed_write_is_removed_at_the_next_start(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process id that no longer runs
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    stale = folder / f".last.ckpt.{gone.pid}.partial"
    stale.write_bytes(b"half a checkpoint")
    mine = folder / f".last.ckpt.{os.getpid()}.partial"  # a write in progress: kept
    mine.write_bytes(b"")
    assert checkpoint_module.remove_stale_partials(str(folder)) == [stale.name]
    assert sorted(os.listdir(folder)) == [mine.name]


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    """Loading is weights_only: a pickled object whose __reduce__ calls os.system is refused
    by the resume check and by the embedder, and the command never runs."""
    from dml.cli import saved_config
    from dml.errors import ConfigError
    from dml.inference.embedder import read_checkpoint

    marker = tmp_path / "MARKER"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = str(tmp_path / "evil.ckpt")
    torch.save({"state_dict": {}, "hyper_parameters": {}, "dml_config": Evil()}, path)
    for load in (saved_config, read_checkpoint):
        with pytest.raises(ConfigError, match="refused, not loaded.*could run code"):
            load(path)
    assert not marker.exists()


@pytest.mark.parametrize("subcommand", ["test", "fit"])
def test_a_dict_that_is_not_a_lightning_checkpoint_is_one_line_and_makes_no_folder(
    tmp_path, subcommand
):
    """``--ckpt_path`` naming a plain dict saved with torch.save (no Lightning version, no
    training state) is refused before Lightning opens it, in one line, and no run folder is
    made."""
    from dml.compose import config_files

    fake = tmp_path / "fake.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}}, fake)
    configs = [a for f in config_files("synthetic", "baseline") for a in ("--config", f)]
    runs = tmp_path / "runs"
    out = subprocess.run(
        [sys.executable, "-m", "dml", subcommand, *configs, "--ckpt_path", str(fake)]
        + ["--trainer.default_root_dir", str(runs)],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, WANDB_MODE="disabled"),
    )
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "not a Lightning checkpoint" in lines[0], out.stderr[-2000:]
    assert str(fake) in lines[0] and "pytorch-lightning_version" in lines[0]
    assert not runs.exists() or not os.listdir(runs)


@pytest.mark.parametrize(
    "checkpoint, message",
    [
        ({"state_dict": {}, "hyper_parameters": "hello"}, "hyper_parameters is a str"),
        ({"state_dict": [], "hyper_parameters": {}}, "state_dict is a list"),
        ({"state_dict": {}, "hyper_parameters": {}, "dml_config": 3}, "dml_config is a int"),
        (
            {"state_dict": {}, "hyper_parameters": {}, "dml_config": {"data": {"init_args": [1]}}},
            "dml_config.data.init_args is a list",
        ),
    ],
)
def test_a_checkpoint_whose_parts_are_not_mappings_is_one_error(tmp_path, checkpoint, message):
    from dml.errors import ConfigError
    from dml.inference.embedder import read_checkpoint

    path = tmp_path / "odd.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(ConfigError, match=f"{path}: not a dml checkpoint \\({message}"):
        read_checkpoint(str(path))


@pytest.mark.parametrize(
    "init_args, message",
    [
        ({"num_classes": 10**7}, "SyntheticDataModule takes no num_classes"),
        ({"image_size": 100000}, r"image_size: 100000, expected a whole number in \[8, 512\]"),
        ({"image_size": "32"}, r"image_size: '32', expected a whole number"),
        ({"train_classes": 5000, "image_size": 256}, "more than 5e\\+07 pixel values"),
    ],
)
def test_generated_data_settings_from_a_checkpoint_are_checked_before_rendering(init_args, message):
    """A stranger's checkpoint names the synthetic data its split is rendered from: an unknown
    setting, a size out of range or a set past the rendering cap is one error, and nothing
    is rendered (100000 px asked for 77 TB). The settings alone (the transform that embeds
    image files) are still read."""
    from dml.errors import ConfigError
    from dml.inference.embedder import build_data, data_class_and_args

    data = {"class_path": "dml.data.SyntheticDataModule", "init_args": init_args}
    cls, args = data_class_and_args({"dml_config": {"data": data}})
    with pytest.raises(ConfigError, match=message):
        build_data(cls, args)
    cls, args = data_class_and_args({"dml_config": {"data": dict(data, init_args={})}})
    assert type(build_data(cls, args)).__name__ == "SyntheticDataModule"
