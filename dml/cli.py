"""Command line: ``python -m dml fit --config experiments/...``, LightningCLI over DMLModule and
any DMLDataModule. Configs compose: a trainer part, a data set part and a method part."""
from __future__ import annotations

import sys

from pytorch_lightning.cli import LightningCLI

from dml.data import DMLDataModule
from dml.module import DMLModule


class DMLCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The data set decides the number of classes (proxy losses) and the standard Recall@Ks.
        parser.link_arguments("data.num_train_classes", "model.num_classes", apply_on="instantiate")


def main(args=None) -> DMLCLI:
    return DMLCLI(DMLModule, DMLDataModule, subclass_mode_data=True,
                  save_config_kwargs={"overwrite": True}, seed_everything_default=0,
                  args=args, auto_configure_optimizers=False)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
