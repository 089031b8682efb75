"""Command line: ``python -m dml fit --config experiments/...``, LightningCLI over DMLModule and
any DMLDataModule. Configs compose: a trainer part, a data set part and a method part."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from pytorch_lightning.cli import LightningCLI, SaveConfigCallback

from dml.callbacks import ChanceConstraintProjection, CrossBatchMemory, DashboardFigures
from dml.data import (DatasetNotFound, DMLDataModule, IncompleteDataset, MetadataError,
                      UnreadableImageError)
from dml.errors import ConfigError
from dml.models import PretrainedWeightsUnavailable
from dml.module import DMLModule


class DMLCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The data set decides the number of classes (proxy losses) and the standard Recall@Ks.
        parser.link_arguments("data.num_train_classes", "model.num_classes", apply_on="instantiate")
        # Method callbacks: a top-level YAML group each, appended to the trainer's callbacks.
        parser.add_lightning_class_args(CrossBatchMemory, "memory")
        parser.add_lightning_class_args(ChanceConstraintProjection, "ccp")
        parser.add_lightning_class_args(DashboardFigures, "dashboard")


def git_state() -> dict:
    """The commit the code runs from, and whether the tree had uncommitted changes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD") or "unknown",
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": False}


class LoggedConfig(SaveConfigCallback):
    """Saves config.yaml in the run folder (Lightning's behaviour) and hands the whole
    configuration and the git commit to every logger (W&B's run config, CSV's hparams.yaml)."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = self.parser.dump(self.config, skip_none=False, format="json")
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": json.loads(config), "git": git_state()})


# Errors with a message the user can act on: printed as one line, not as a traceback.
USER_ERRORS = (ConfigError, DatasetNotFound, IncompleteDataset, MetadataError,
               UnreadableImageError, PretrainedWeightsUnavailable)


def main(args=None) -> DMLCLI:
    try:
        cli = DMLCLI(DMLModule, DMLDataModule, subclass_mode_data=True,
                     save_config_callback=LoggedConfig, save_config_kwargs={"overwrite": True},
                     seed_everything_default=0, args=args, auto_configure_optimizers=False)
    except USER_ERRORS as error:
        if os.environ.get("DML_TRACEBACK"):
            raise
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    finish_wandb()
    return cli


def finish_wandb() -> None:
    """Close the W&B run (summary and config files are written then), so that several runs in
    one process (notebooks, benchmarks) are separate runs."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
