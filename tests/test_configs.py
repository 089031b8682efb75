"""Every shipped config combination parses: no unknown key, no wrong type."""
import glob
import os

import pytest
import torch

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
    assert cli.model.objective.zero_shot is not None


TINY_RUN = ["--data.init_args.train_classes", "16", "--data.init_args.test_classes", "8",
            "--data.init_args.images_per_class", "8", "--model.backbone.width", "8",
            "--trainer.logger", "false", "--trainer.callbacks", "[]",
            "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.max_steps", "2",
            "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
            "--dashboard.enabled", "false", "--model.memory.start_iteration", "0"]


@pytest.mark.parametrize("method", METHODS)
def test_every_trainable_parameter_is_in_one_group_and_trains(method):
    """Every parameter that needs a gradient is in exactly one optimizer group and changes
    after two steps, for every method config (a loss term whose parameters no group lists
    would silently never train)."""
    cli = DMLCLI(DMLModule, DMLDataModule, subclass_mode_data=True, run=False,
                 save_config_callback=None, args=config_args("synthetic", method) + TINY_RUN)
    module = cli.model
    trainable = {name: p for name, p in module.named_parameters() if p.requires_grad}
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    owners = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            owners.setdefault(id(p), []).append(group.get("name"))
    for name, p in trainable.items():
        assert len(owners.get(id(p), [])) == 1, (name, owners.get(id(p)))
    before = {name: p.detach().clone() for name, p in trainable.items()}
    cli.trainer.fit(module, cli.datamodule)
    assert cli.trainer.global_step == 2
    unchanged = [name for name, p in module.named_parameters()
                 if name in before and torch.equal(p.detach(), before[name])]
    assert not unchanged, unchanged
