"""Callbacks the run tests add to CLI runs (importable by subprocesses: tests/ on PYTHONPATH)."""
import os
import signal

import pytorch_lightning as pl


class KillAt(pl.Callback):
    """SIGKILL this process when training reaches ``step`` (kill -9: no cleanup, no hooks).
    ``marker`` records that it happened, so that the resumed run, whose config still lists
    this callback, is not killed again."""

    def __init__(self, step: int, marker: str):
        self.step, self.marker = step, marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)


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
