"""Properties of the assembled run, through the command line with the default config (the
synthetic data set, the baseline method): every epoch draws new batches and new crops, over a
few epochs every training image is drawn, the order is a function of (seed, epoch) only, and
two processes split each epoch's classes between them."""

import json
import os
from collections import defaultdict

import numpy as np
from test_runs import BASE, TINY, dml, method, run_folders


def record_run(tmp_path, name, *extra, epochs=3):
    """Train ``epochs`` epochs of the default config (tiny sizes); returns the recorded
    batches as {rank: [json records]} and the process's output."""
    path = tmp_path / f"{name}.jsonl"
    out = dml(
        "fit",
        *BASE,
        *method("baseline"),
        *TINY,
        "--trainer.max_epochs",
        str(epochs),
        "--dashboard.enabled",
        "false",
        "--trainer.logger",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path / name),
        '--trainer.callbacks+={"class_path": "run_helpers.RecordBatches", '
        f'"init_args": {{"path": "{path}"}}}}',
        *extra,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    records = defaultdict(list)
    for file in tmp_path.glob(f"{name}.jsonl*"):
        rank = int(file.suffix[5:]) if file.suffix.startswith(".rank") else 0
        records[rank] = [json.loads(line) for line in file.read_text().splitlines()]
    return records, out


def by_epoch(records):
    epochs = defaultdict(list)
    for r in records:
        epochs[r["epoch"]].append(r)
    return epochs


def test_every_epoch_draws_new_batches_and_crops_and_in_time_every_image(tmp_path):
    records, _ = record_run(tmp_path, "a", epochs=4)
    epochs = by_epoch(records[0])
    assert sorted(epochs) == [0, 1, 2, 3]
    steps = {len(batches) for batches in epochs.values()}
    assert steps == {6}  # 16 classes x 12 images / (8 x 4) per batch
    for e in range(1, 4):
        before, now = epochs[e - 1], epochs[e]
        # no batch of an epoch is the batch at the same step of the one before
        assert all(a["indices"] != b["indices"] for a, b in zip(before, now)), e
    # every P x M batch: 8 classes x 4 images
    for r in records[0]:
        labels, counts = np.unique(r["labels"], return_counts=True)
        assert len(labels) == 8 and set(counts) == {4}
    # 192 training images, 192 drawn per epoch: within 4 epochs every image is drawn
    drawn = {i for r in records[0] for i in r["indices"]}
    assert drawn == set(range(16 * 12))


def pixels_by_image(batches):
    """{data-set index: [pixel sums of its draws]} over some batches."""
    seen = defaultdict(list)
    for r in batches:
        for i, p in zip(r["indices"], r["pixels"]):
            seen[i].append(p)
    return seen


def test_image_data_sets_crop_each_draw_anew_and_a_resume_draws_the_same(tmp_path):
    """CUB's layout and transforms (random resized crop and flip at 32 px, a loader worker):
    an image drawn in two epochs, or twice in one, is cropped differently; a second run crops
    it the same, and so does a run killed in epoch 1 and resumed from its epoch-0 checkpoint
    (a loader with workers draws its first batches before the resumed trainer counts the
    finished epoch: it once replayed epoch 0 there)."""
    import subprocess
    import sys

    from dml.gpu_check import make_cub_layout

    root = make_cub_layout(
        str(tmp_path / "cub"), train_classes=8, test_classes=4, per_class=8, size=48
    )
    cub = [
        "--config",
        "experiments/trainer.yaml",
        "--config",
        "experiments/data/cub.yaml",
        "--config",
        "experiments/method/baseline.yaml",
        "--data.init_args.root",
        root,
        "--data.init_args.crop",
        "32",
        "--data.init_args.resize",
        "36",
        "--data.init_args.verify",
        "false",
        "--data.init_args.num_workers",
        "1",
        "--data.init_args.classes_per_batch",
        "4",
        "--model.backbone.name",
        "small_cnn",
        "--model.backbone.pretrained",
        "false",
        "--model.backbone.width",
        "8",
        "--model.embedding_dim",
        "16",
        "--model.evaluation.nmi",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.max_epochs",
        "2",
        "--dashboard.enabled",
        "false",
        "--trainer.logger",
        "false",
    ]

    def run(name, *extra, code=0):
        path = tmp_path / f"{name}.jsonl"
        out = dml(
            "fit",
            *cub,
            "--trainer.default_root_dir",
            str(tmp_path / name),
            '--trainer.callbacks+={"class_path": "run_helpers.RecordBatches", '
            f'"init_args": {{"path": "{path}"}}}}',
            *extra,
        )
        assert out.returncode == code, out.stderr[-3000:]
        return [json.loads(line) for line in path.read_text().splitlines()]

    records = run("a")
    epochs = by_epoch(records)
    assert sorted(epochs) == [0, 1] and len(epochs[0]) == 4  # 64 images / (4 x 4)
    first, second = pixels_by_image(epochs[0]), pixels_by_image(epochs[1])
    both = set(first) & set(second)
    assert len(both) >= 32
    for i in both:  # every draw of an image is a new crop
        draws = first[i] + second[i]
        assert len(set(draws)) == len(draws), i
    assert run("b") == records  # and the same ones in a run with the same seed
    killed = run(
        "c",
        '--trainer.callbacks+={"class_path": "run_helpers.KillAt", '
        f'"init_args": {{"step": 6, "marker": "{tmp_path / "killed"}"}}}}',
        code=-9,
    )
    assert len(killed) == 7  # epoch 0, and two batches of epoch 1
    (folder,) = run_folders(tmp_path / "c")
    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "dml",
            "fit",
            "--config",
            os.path.join(folder, "config.yaml"),
            "--ckpt_path",
            os.path.join(folder, "checkpoints", "last.ckpt"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(
            os.environ,
            WANDB_MODE="disabled",
            PYTHONPATH=os.pathsep.join(
                [os.path.dirname(__file__), os.path.dirname(os.path.dirname(__file__))]
            ),
        ),
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()][7:]
    assert after == by_epoch(records)[1]  # epoch 1 again, batch for batch, crop for crop


def test_data_order_is_a_function_of_seed_and_epoch(tmp_path):
    a, _ = record_run(tmp_path, "a", epochs=2)
    b, _ = record_run(tmp_path, "b", epochs=2)
    c, _ = record_run(tmp_path, "c", "--data.init_args.seed", "1", epochs=2)
    assert a[0] == b[0]  # indices and pixels, every step of every epoch
    assert [r["indices"] for r in a[0]] != [r["indices"] for r in c[0]]


def test_two_processes_split_each_epochs_classes_and_draw_new_ones(tmp_path):
    records, out = record_run(
        tmp_path, "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu", epochs=2
    )
    assert sorted(records) == [0, 1], out.stdout[-2000:]
    for e in (0, 1):
        r0, r1 = by_epoch(records[0])[e], by_epoch(records[1])[e]
        assert len(r0) == len(r1) > 0  # the same number of steps on both ranks
        for x, y in zip(r0, r1):  # each step's classes are split between the ranks
            assert not set(x["labels"]) & set(y["labels"])
    for rank in (0, 1):
        epochs = by_epoch(records[rank])
        assert all(a["indices"] != b["indices"] for a, b in zip(epochs[0], epochs[1]))
    assert len(run_folders(tmp_path / "ddp")) == 1
