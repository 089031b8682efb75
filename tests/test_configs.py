"""Every shipped config combination parses: no unknown key, no wrong type."""
import glob
import os

import pytest

from dml.cli import DMLCLI
from dml.data import DMLDataModule
from dml.module import DMLModule

DATASETS = sorted(os.path.basename(p)[:-5] for p in glob.glob("experiments/data/*.yaml"))
METHODS = sorted(os.path.basename(p)[:-5] for p in glob.glob("experiments/method/*.yaml"))


class ParseOnlyCLI(DMLCLI):
    def instantiate_classes(self):  # data sets and ImageNet weights are not needed to parse
        pass


def config_args(dataset, method):
    files = ["experiments/trainer.yaml", f"experiments/data/{dataset}.yaml",
             f"experiments/method/{method}.yaml"]
    override = f"experiments/method/{method}/{dataset}.yaml"
    if os.path.exists(override):
        files.append(override)
    return [a for f in files for a in ("--config", f)]


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("method", METHODS)
def test_config_combination_parses(dataset, method):
    cli = ParseOnlyCLI(DMLModule, DMLDataModule, subclass_mode_data=True, run=False,
                       args=config_args(dataset, method))
    assert cli.config.model.embedding_dim > 0


def test_overrides_name_existing_data_sets():
    for path in glob.glob("experiments/method/*/*.yaml"):
        assert os.path.basename(path)[:-5] in DATASETS, path


@pytest.mark.parametrize("method", ["gsp_contrastive", "gsp_proxy_anchor"])
def test_gsp_methods_build_on_the_embedded_data(method):
    cli = DMLCLI(DMLModule, DMLDataModule, subclass_mode_data=True, run=False,
                 args=config_args("synthetic", method) + ["--trainer.logger", "false"])
    assert type(cli.model.pooling).__name__ == "GSP"
    assert len(cli.model.pooling.prototypes) == 8  # from gsp_*/synthetic.yaml
    assert cli.model.zero_shot_loss is not None
