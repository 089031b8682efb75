"""Lightning's LearningRateMonitor that stays quiet when a run has no logger
(``--trainer.logger false``) instead of stopping it."""

from __future__ import annotations

from pytorch_lightning.callbacks import LearningRateMonitor as _LearningRateMonitor


class LearningRateMonitor(_LearningRateMonitor):
    """Logs each parameter group's learning rate (``lr-<optimizer>/<group>``) to the loggers;
    without loggers it does nothing."""

    def on_train_start(self, trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)
