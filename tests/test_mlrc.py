"""The MLRC protocol (dml.mlrc) and the search on its validation folds (dml.tune): folds,
intervals, concatenation, resume, a test split never built before the final evaluation, and a
tuned config the protocol accepts."""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dml.cli import DMLCLI
from dml.data import DMLDataModule, SyntheticDataModule, mlrc_fold_mask
from dml.metrics import retrieval_metrics
from dml.mlrc import concatenate_normalized, confidence_interval, fold_args, metrics_of
from dml.module import DMLModule

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--data.init_args.train_classes",
    "16",
    "--data.init_args.test_classes",
    "8",
    "--data.init_args.images_per_class",
    "8",
    "--model.backbone.width",
    "8",
    "--data.init_args.classes_per_batch",
    "3",
    "--model.evaluation.nmi",
    "false",
]


def test_folds_are_class_disjoint_cover_every_training_class_and_are_deterministic():
    classes = np.arange(24)
    masks = [mlrc_fold_mask(classes, k) for k in range(4)]
    assert (np.sum(masks, axis=0) == 1).all()  # every class in exactly one fold
    assert [int(m.sum()) for m in masks] == [6, 6, 6, 6]
    assert all((m == mlrc_fold_mask(classes, k)).all() for k, m in enumerate(masks))
    for k in range(4):
        dm = SyntheticDataModule(train_classes=24, test_classes=8, images_per_class=4, mlrc_fold=k)
        held_out = set(classes[masks[k]].tolist())
        assert dm.num_train_classes == 18 and len(dm.train_dataset) == 18 * 4
        trained = {int(dm.train_dataset.dataset.labels[r]) for r in dm.train_dataset.rows}
        validated = {
            int(dm.val_datasets["test"].dataset.labels[r]) for r in dm.val_datasets["test"].rows
        }
        assert trained == set(range(24)) - held_out and validated == held_out
        assert sorted(set(dm.train_labels())) == list(range(18))  # renumbered for the loss


def test_the_interval_is_the_student_t_interval():
    values = [0.50, 0.60, 0.55, 0.65]
    mean, half = confidence_interval(values)
    t_975_3 = 3.182446305284263  # Student's t, 97.5 % quantile, 3 degrees of freedom
    sd = np.sqrt(sum((v - 0.575) ** 2 for v in values) / 3)
    assert mean == pytest.approx(0.575) and half == pytest.approx(t_975_3 * sd / 2)
    assert confidence_interval([0.4]) == (0.4, 0.0)


def test_concatenated_metrics_are_the_metrics_of_the_hand_concatenated_embeddings():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(20), 5)
    parts = [rng.standard_normal((100, 8)) * (k + 1) + labels[:, None] * 0.1 for k in range(4)]
    by_hand = np.hstack([p / np.linalg.norm(p, axis=1, keepdims=True) for p in parts])
    by_hand /= np.linalg.norm(by_hand, axis=1, keepdims=True)
    got = concatenate_normalized(parts)
    assert got.shape == (100, 32) and np.allclose(got, by_hand, atol=1e-6)
    expected = retrieval_metrics(by_hand.astype(np.float32), labels, [1, 2])
    assert metrics_of({"test": got}, {"test": labels}, [1, 2]) == dict(
        expected, **{"P@1": expected["R@1"]}
    )


def test_fold_training_never_builds_the_test_split(tmp_path, monkeypatch):
    """The fold models (and the tuning trials, which train them with the same arguments) see
    the training classes only."""

    def no_test_split(self):
        raise AssertionError("the test split was built during fold training")

    monkeypatch.setattr(SyntheticDataModule, "build_eval", no_test_split)
    args = fold_args("synthetic", "baseline", 2, 0, str(tmp_path), TINY, epochs=1)
    cli = DMLCLI(
        DMLModule,
        DMLDataModule,
        subclass_mode_data=True,
        run=False,
        save_config_callback=None,
        args=args[1:] + ["--trainer.logger", "false"],
    )
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.current_epoch == 1 and "val/MAP@R" in cli.trainer.callback_metrics


def test_a_backbone_layer_goes_into_every_fold_model():
    args = fold_args("cub", "gsp_contrastive", 1, 0, "f", backbone="vit_s16_dino")
    configs = [args[i + 1] for i, a in enumerate(args) if a == "--config"]
    assert configs[-2:] == [
        "experiments/backbone/vit_s16_dino.yaml",
        "experiments/backbone/vit_s16_dino/small.yaml",
    ]
    assert args[args.index("--data.init_args.mlrc_fold") + 1] == "1"


def run(module, *args):
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(
            os.environ,
            WANDB_MODE="disabled",
            PYTHONPATH=os.pathsep.join([os.path.join(REPO, "tests"), REPO]),
        ),
    )


def fail_at_start(**init_args):
    return "--trainer.callbacks+=" + json.dumps(
        {"class_path": "run_helpers.FailAtStart", "init_args": init_args}
    )


def test_a_search_and_the_protocol_survive_a_failing_run_and_resume(tmp_path):
    """One job end to end, with one failure injected in each stage: a search on fold 0 whose
    first trial fails (recorded, the search goes on), then the protocol with the tuned config
    whose fold 2 fails once (recorded, the other folds go on); the next run of the protocol
    trains fold 2 alone, and the one after trains nothing and gives the same metrics."""
    space = tmp_path / "space.yaml"
    space.write_text(
        "model.optimizer.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n"
        "model.loss.params.base: {type: float, low: 0.3, high: 0.7}\n"
    )
    out = run(
        "dml.tune",
        "--dataset",
        "synthetic",
        "--method",
        "baseline",
        "--space",
        space,
        "--trials",
        "2",
        "--folds",
        "0",
        "--epochs",
        "1",
        "--out",
        tmp_path,
        "--runs",
        tmp_path / "runs",
        "--",
        *TINY,
        fail_at_start(marker=str(tmp_path / "trial")),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "trial 0: FAIL" in out.stdout and "injected failure" in out.stdout
    assert "trial 1: COMPLETE validation MAP@R " in out.stdout
    tune = tmp_path / "synthetic" / "tune"
    trials = (tune / "baseline.trials.csv").read_text().splitlines()
    assert trials[1].startswith("0,FAIL,") and "injected failure" in trials[1]
    assert trials[2].startswith("1,COMPLETE,")
    import optuna

    study = optuna.load_study(
        study_name="synthetic-baseline", storage=f"sqlite:///{tune / 'baseline.db'}"
    )
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"]
    assert 0 < study.best_value <= 1
    assert list((tmp_path / "runs").glob("**/metrics.csv"))
    assert not list((tmp_path / "runs").glob("**/*.ckpt"))  # trials keep no weights
    best = tune / "baseline.best.yaml"
    assert "lr:" in best.read_text() and "base:" in best.read_text()

    args = [
        "--dataset",
        "synthetic",
        "--method",
        "baseline",
        "--epochs",
        "1",
        "--config",
        best,
        "--seeds",
        "0",
        "--out",
        tmp_path,
        "--runs",
        tmp_path / "runs",
        "--",
        *TINY,
        fail_at_start(fold=2, marker=str(tmp_path / "fold")),
    ]
    out = run("dml.mlrc", *args)
    assert out.returncode == 2
    (error,) = out.stderr.strip().splitlines()
    assert (
        error.startswith("error: 1 fold run(s) failed (seed 0 fold 2: ")
        and "injected failure" in error
    )
    base = tmp_path / "synthetic" / "mlrc"
    (line,) = [json.loads(x) for x in open(base / "runs.jsonl")]
    assert [f["status"] for f in line["folds"]] == ["done", "done", "failed", "done"]
    table = (base / "table.md").read_text()
    assert "| baseline | failed |" in table and "- baseline: seed(s) 0 (fold 2: " in table
    # each fold's training output is shown while it runs, behind its label
    assert "baseline seed 0 fold 3 | epoch   0 | val: MLRC fold 3 | R@1" in out.stdout
    assert "baseline seed 0 fold 2 | FAILED: " in out.stdout

    out = run("dml.mlrc", *args)  # the failed fold trains again, the others are kept
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("already trained") == 3
    (line,) = [json.loads(x) for x in open(base / "runs.jsonl")]
    assert line["method"] == "baseline" and len(line["separated"]) == 4
    assert line["dims"] == {"separated": 64, "concatenated": 256}
    assert all(0 < f["MAP@R"] <= 1 and f["P@1"] == f["R@1"] for f in line["separated"])
    assert str(best) in line["folds"][0]["command"]  # the tuned parameters were used
    assert "| baseline | 1 | 64 / 256 |" in (base / "table.md").read_text()
    again = run("dml.mlrc", *args)  # every fold already trained: only the evaluation runs
    assert again.returncode == 0 and again.stdout.count("already trained") == 4
    (line2,) = [json.loads(x) for x in open(base / "runs.jsonl")]
    assert line2["concatenated"] == line["concatenated"]
    # other settings (2 epochs): the folds would train into folders of their own (the rule a
    # run uses, dml.mlrc.fold_folder; a change of any argument is in dml.jobs' fingerprint tests)
    from dml.mlrc import fold_args, fold_folder

    trained = {
        os.path.dirname(p)
        for p in glob.glob(str(tmp_path / "runs" / "synthetic/baseline/seed0/fold*/*/fold.json"))
    }
    assert len(trained) == 4
    for fold in range(4):
        base = str(tmp_path / "runs" / f"synthetic/baseline/seed0/fold{fold}")
        one, two = (
            fold_folder(
                base,
                fold_args(
                    "synthetic",
                    "baseline",
                    fold,
                    0,
                    base,
                    [*TINY, args[-1]],
                    epochs=e,
                    config=str(best),
                ),
            )
            for e in (1, 2)
        )
        assert one in trained and two not in trained and os.path.dirname(two) == base
    # a search with another space does not join the study
    space.write_text("model.optimizer.lr: {type: float, low: 1.0e-3, high: 1.0e-2}\n")
    out = run(
        "dml.tune",
        "--dataset",
        "synthetic",
        "--method",
        "baseline",
        "--space",
        space,
        "--trials",
        "1",
        "--folds",
        "0",
        "--epochs",
        "1",
        "--out",
        tmp_path,
        "--runs",
        tmp_path / "runs",
        "--",
        *TINY,
    )
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "a different search space" in lines[0]


def test_an_unknown_data_set_method_or_space_is_one_line_naming_it(tmp_path, capsys):
    """In this process, through the function ``python -m dml.mlrc`` / ``dml.tune`` run
    (``dml.console.run_command``); the subprocess tests above see the same line."""
    from dml import mlrc, tune
    from dml.console import run_command
    from dml.errors import ConfigError

    for module, args, says in [
        (mlrc, ["--dataset", "nope", "--method", "baseline"], "experiments/data/nope.yaml"),
        (mlrc, ["--dataset", "synthetic", "--method", "nope"], "method/nope.yaml"),
        (
            mlrc,
            ["--dataset", "synthetic", "--method", "baseline", "--backbone", "nope"],
            "backbone/nope.yaml",
        ),
        (
            tune,
            ["--dataset", "synthetic", "--method", "baseline", "--space", tmp_path / "none.yaml"],
            "none.yaml: no such file",
        ),
    ]:
        argv = [str(a) for a in args] + ["--out", str(tmp_path)]
        with pytest.raises(SystemExit) as exit_:
            run_command(lambda: module.main(argv), (ConfigError, RuntimeError))
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(lines) == 1 and says in lines[0], lines
    assert not (tmp_path / "synthetic" / "tune").exists()  # nothing created for a bad search


@pytest.mark.parametrize("name", ["../evil", "a?b", ".hidden", "a/b"])
def test_a_tune_name_that_is_not_a_plain_file_name_is_refused(name):
    from dml.errors import ConfigError
    from dml.tune import main

    with pytest.raises(ConfigError, match="--name"):
        main(
            ["--dataset", "synthetic", "--method", "baseline", "--space", "x.yaml", "--name", name]
        )


def test_the_trials_table_sits_beside_its_best_config_whatever_the_folder_is_called():
    from dml.tune import csv_value, trials_file

    assert trials_file("out/cub/tune/ccp.best.yaml") == "out/cub/tune/ccp.trials.csv"
    # a folder named *.best* is not touched (it once lost its ".best")
    assert trials_file("/r/x.best.d/ccp.best.yaml") == "/r/x.best.d/ccp.trials.csv"
    assert trials_file("/r/x.best/mine.yaml") == "/r/x.best/mine.trials.csv"
    # a drawn None is written as null, a key the trial never drew stays empty
    assert csv_value({"model.memory.loss": None}, "model.memory.loss") == "null"
    assert csv_value({}, "model.memory.loss") == ""
    assert csv_value({"model.optimizer.lr": 0.001}, "model.optimizer.lr") == 0.001


def test_a_best_config_names_its_study_database_without_the_machines_path(tmp_path):
    from dml.tune import storage_shown

    best = tmp_path / "tune" / "c2.best.yaml"
    db = f"sqlite:///{tmp_path / 'tune' / 'c2.db'}"
    assert storage_shown(db, str(best)) == "c2.db beside this file"
    other = f"sqlite:///{tmp_path / 'db' / 'c2.db'}"
    assert storage_shown(other, str(best)) == "../db/c2.db from this file's folder"
    assert storage_shown("postgresql://host/optuna", str(best)) == "postgresql://host/optuna"


def test_a_fold_records_its_checkpoint_relative_to_the_working_directory(tmp_path, monkeypatch):
    """runs.jsonl is committed beside the tables: a fold trained below the working directory
    records its checkpoint as the recorded command names its folder (relative), and the next
    run of the job finds it there; a folder outside the working directory stays absolute."""
    from dml import mlrc
    from dml.child_runs import Launched

    calls = []

    def fake_launch(args, label, log):
        folder = args[args.index("--trainer.default_root_dir") + 1]
        (Path(folder) / "20261202-run" / "checkpoints").mkdir(parents=True)
        (Path(folder) / "20261202-run" / "checkpoints" / "best-epoch=001.ckpt").write_text("")
        calls.append(folder)
        return Launched(0, 1.0, "", "", log)

    monkeypatch.setattr(mlrc, "launch", fake_launch)
    work = tmp_path / "repo"
    work.mkdir()
    monkeypatch.chdir(work)
    folder = os.path.join("runs", "fold0")
    args = ["fit", "--trainer.default_root_dir", folder]
    done = mlrc.train_fold(args, folder)
    expected = os.path.join(folder, "20261202-run", "checkpoints", "best-epoch=001.ckpt")
    assert done["status"] == "done" and done["checkpoint"] == expected
    assert mlrc.train_fold(args, folder)["resumed"] and len(calls) == 1
    outside = str(tmp_path / "elsewhere")
    done = mlrc.train_fold(["fit", "--trainer.default_root_dir", outside], outside)
    assert done["checkpoint"] == os.path.join(
        outside, "20261202-run", "checkpoints", "best-epoch=001.ckpt"
    )
