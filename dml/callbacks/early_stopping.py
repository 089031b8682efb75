"""Early stopping on the validation metric as a config group of its own
(``early_stopping: {patience: 60}``), so that a method's settings add it without replacing the
trainer's callback list (and with it the run's checkpointing)."""

from __future__ import annotations

from typing import Optional

from pytorch_lightning.callbacks import EarlyStopping as _EarlyStopping


class EarlyStopping(_EarlyStopping):
    """Args:
    patience: stop after this many validations without improvement; None: never stop.
    monitor, mode, min_delta: the metric watched (val/MAP@R, max) and the least gain.
    """

    def __init__(
        self,
        patience: Optional[int] = None,
        monitor: str = "val/MAP@R",
        mode: str = "max",
        min_delta: float = 0.0,
    ):
        super().__init__(monitor=monitor, mode=mode, patience=patience or 0, min_delta=min_delta)
        self.enabled = patience is not None

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.enabled:
            super().on_validation_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.enabled:
            super().on_train_epoch_end(trainer, pl_module)
