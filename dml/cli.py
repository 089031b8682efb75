"""Command line: ``python -m dml fit --config experiments/...``, LightningCLI over DMLModule and
any DMLDataModule. Configs compose: a trainer part, a data set part and a method part."""
from __future__ import annotations

import os
import sys

from pytorch_lightning.cli import LightningCLI

from dml.callbacks import ChanceConstraintProjection, CrossBatchMemory
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


# Errors with a message the user can act on: printed as one line, not as a traceback.
USER_ERRORS = (ConfigError, DatasetNotFound, IncompleteDataset, MetadataError,
               UnreadableImageError, PretrainedWeightsUnavailable)


def main(args=None) -> DMLCLI:
    try:
        return DMLCLI(DMLModule, DMLDataModule, subclass_mode_data=True,
                      save_config_kwargs={"overwrite": True}, seed_everything_default=0,
                      args=args, auto_configure_optimizers=False)
    except USER_ERRORS as error:
        if os.environ.get("DML_TRACEBACK"):
            raise
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
