"""Loggers: a CSV logger that appends to the run's metrics.csv (a resumed run keeps its history),
and W&B that goes offline by itself when no login exists (sync later with `wandb sync`)."""

from __future__ import annotations

import csv
import os
from typing import Optional

from pytorch_lightning.loggers import CSVLogger as _LightningCSVLogger
from pytorch_lightning.loggers import WandbLogger as _LightningWandbLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.utilities import rank_zero_only


class AppendingExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv when its folder is not empty; this
    one keeps it and appends (new columns rewrite the header, keeping every row)."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = list(next(csv.reader(f), []))


class CSVLogger(_LightningCSVLogger):
    """``metrics.csv`` and ``hparams.yaml`` in the run folder, appended to on resume."""

    @rank_zero_only
    def forget_from(self, step: int) -> int:
        """Drop the rows of ``step`` and later: what a killed process logged after the
        checkpoint a run resumes from, which the resumed run logs again. Returns how many."""
        path = os.path.join(self.log_dir, ExperimentWriter.NAME_METRICS_FILE)
        if not os.path.isfile(path):
            return 0
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields, rows = reader.fieldnames or [], list(reader)
        kept = [r for r in rows if not r.get("step") or int(float(r["step"])) < step]
        if len(kept) == len(rows):
            return 0
        tmp = f"{path}.{os.getpid()}.partial"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(kept)
        os.replace(tmp, path)
        return len(rows) - len(kept)

    @property
    def experiment(self) -> AppendingExperimentWriter:
        if self._experiment is None and rank_zero_only.rank == 0:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        return super().experiment


def wandb_logged_in() -> bool:
    """True when an API key is available (environment or ~/.netrc), without network access."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class WandbLogger(_LightningWandbLogger):
    """Lightning's WandbLogger; ``offline=None`` (the default) means offline unless logged in.

    ``WANDB_MODE`` in the environment (online, offline, disabled) still wins, as in wandb.
    """

    def __init__(
        self, project: str = "dml", save_dir: str = "runs", offline: Optional[bool] = None, **kwargs
    ):
        if offline is None:
            mode = os.environ.get("WANDB_MODE", "")
            if mode in ("online", "offline", "dryrun", "disabled"):
                offline = mode in ("offline", "dryrun")  # disabled: wandb itself reads the env
            else:
                offline = not wandb_logged_in()
        os.makedirs(save_dir, exist_ok=True)
        super().__init__(project=project, save_dir=save_dir, offline=offline, **kwargs)
        if self._wandb_init.get("anonymous") is None:  # unset: wandb warns on any value given
            self._wandb_init.pop("anonymous", None)
