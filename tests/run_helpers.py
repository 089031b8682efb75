"""Callbacks the run tests add to CLI runs (importable by subprocesses: tests/ on PYTHONPATH)."""

import pytorch_lightning as pl

from dml.gpu_check import KillAt  # noqa: F401 - the run tests name it run_helpers.KillAt


class BlowUpAt(pl.Callback):
    """Sets a BatchNorm running variance to inf at the end of ``epoch`` (the loss stays finite:
    the case the loss guard alone would miss)."""

    def __init__(self, epoch: int = 1):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            import torch

            bn = next(m for m in pl_module.modules() if isinstance(m, torch.nn.BatchNorm2d))
            bn.running_var.fill_(float("inf"))


class RecordBatches(pl.Callback):
    """Appends one JSON line per training batch to ``path`` (``path.rank<r>`` under DDP): the
    epoch, step, the data-set indices, labels and each image's pixel sum (what an augmentation
    changes)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        import json

        images, labels, indices = batch
        path = self.path if trainer.world_size == 1 else f"{self.path}.rank{trainer.global_rank}"
        with open(path, "a") as f:
            f.write(
                json.dumps(
                    {
                        "epoch": trainer.current_epoch,
                        "step": batch_idx,
                        "indices": indices.tolist(),
                        "labels": labels.tolist(),
                        "pixels": images.double().flatten(1).sum(1).tolist(),
                    }
                )
                + "\n"
            )


class FailAtStart(pl.Callback):
    """Stops the run with an error at the start of training: on MLRC fold ``fold`` only (when
    given), or only the first time (``marker`` records that it happened)."""

    def __init__(self, fold: int = -1, marker: str = ""):
        self.fold, self.marker = fold, marker

    def on_train_start(self, trainer, pl_module):
        import os

        if self.fold >= 0 and getattr(trainer.datamodule, "mlrc_fold", None) != self.fold:
            return
        if self.marker:
            if os.path.exists(self.marker):
                return
            open(self.marker, "w").close()
        raise RuntimeError("injected failure")


class RecordLosses(pl.Callback):
    """Writes ``{"losses": [...]}`` to ``path`` at the end of training: the training loss of
    every step, in order (what a refactoring must leave unchanged)."""

    def __init__(self, path: str):
        self.path = path
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))

    def on_train_end(self, trainer, pl_module):
        import json

        with open(self.path, "w") as f:
            json.dump({"losses": self.losses}, f)


class RecordTestEmbeddings(pl.Callback):
    """Saves what the test just scored (``DMLModule.last_evaluation()``: the query set's
    embeddings, labels and data-set indices) to ``path`` with ``torch.save``."""

    def __init__(self, path: str):
        self.path = path

    def on_test_end(self, trainer, pl_module):
        import torch

        query = pl_module.last_evaluation().query
        torch.save(
            {"embeddings": query.embeddings, "labels": query.labels, "indices": query.indices},
            self.path,
        )


# The small synthetic run of the extension examples' tests: 12 classes, tiny CNN, no NMI.
SMALL_RUN = [
    "--data.init_args.train_classes",
    "12",
    "--data.init_args.test_classes",
    "8",
    "--data.init_args.images_per_class",
    "8",
    "--model.backbone.width",
    "8",
    "--model.evaluation.nmi",
    "false",
    "--dashboard.enabled",
    "false",
    "--trainer.enable_progress_bar",
    "false",
]


def fit_recording_losses(args, root, epochs: int, ckpt=None, mid_checkpoint: bool = False):
    """``python -m dml fit <args>`` in this process, ``epochs`` epochs, its run folder under
    ``root/runs``, from ``ckpt`` when given; with ``mid_checkpoint`` also a checkpoint after
    epoch 1 (``mid-epoch=1.ckpt``) besides last.ckpt. Returns the training loss of every step."""
    import json

    from dml.cli import main

    path = root / f"losses-{epochs}-{bool(ckpt)}.json"
    args = [
        "fit",
        *args,
        *SMALL_RUN,
        "--trainer.max_epochs",
        str(epochs),
        "--trainer.default_root_dir",
        str(root / "runs"),
        "--trainer.callbacks+=run_helpers.RecordLosses",
        f"--trainer.callbacks.path={path}",
    ]
    if ckpt:
        args += ["--ckpt_path", str(ckpt)]
    elif mid_checkpoint:
        args += [
            "--trainer.callbacks+=pytorch_lightning.callbacks.ModelCheckpoint",
            "--trainer.callbacks.every_n_epochs=2",
            "--trainer.callbacks.save_top_k=-1",
            "--trainer.callbacks.filename=mid-{epoch}",
        ]
    main(args)
    with open(path) as f:
        return json.load(f)["losses"]


def train_tiny_checkpoint(
    root,
    epochs: int = 2,
    train_classes: int = 16,
    test_classes: int = 12,
    images_per_class: int = 12,
) -> str:
    """``python -m dml fit`` of the synthetic baseline, tiny, in a fresh process into ``root``;
    its last.ckpt (for the tests of the commands that read a checkpoint)."""
    import os
    import subprocess
    import sys

    from dml.compose import config_args

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = [
        *config_args("synthetic", "baseline"),
        "--trainer.max_epochs",
        str(epochs),
        "--data.init_args.train_classes",
        str(train_classes),
        "--data.init_args.test_classes",
        str(test_classes),
        "--data.init_args.images_per_class",
        str(images_per_class),
        "--model.backbone.width",
        "8",
        "--dashboard.enabled",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--model.evaluation.nmi",
        "false",
        "--trainer.default_root_dir",
        str(root),
    ]
    out = subprocess.run(
        [sys.executable, "-m", "dml", "fit", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, WANDB_MODE="disabled"),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (path,) = [os.path.join(d, "last.ckpt") for d, _, f in os.walk(root) if "last.ckpt" in f]
    return path
