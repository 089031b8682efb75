"""Every shipped config combination parses: no unknown key, no wrong type."""

import glob
import os

import pytest
import torch

from dml.cli import DMLCLI
from dml.compose import config_args, config_files
from dml.data import DMLDataModule
from dml.module import DMLModule

DATASETS = sorted(os.path.basename(p)[:-5] for p in glob.glob("experiments/data/*.yaml"))
METHODS = sorted(os.path.basename(p)[:-5] for p in glob.glob("experiments/method/*.yaml"))
BACKBONES = sorted(os.path.basename(p)[:-5] for p in glob.glob("experiments/backbone/*.yaml"))


class ParseOnlyCLI(DMLCLI):
    def instantiate_classes(self):  # data sets and ImageNet weights are not needed to parse
        pass


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("method", METHODS)
def test_config_combination_parses(dataset, method):
    cli = ParseOnlyCLI(
        DMLModule,
        DMLDataModule,
        subclass_mode_data=True,
        run=False,
        args=config_args(dataset, method),
    )
    assert cli.config.model.embedding_dim > 0


def test_layer_files_name_existing_data_sets_groups_and_methods():
    from dml.compose import FAMILIES, GROUPS

    for path in glob.glob("experiments/method/*/*.yaml"):
        assert os.path.basename(os.path.dirname(path)) in METHODS, path
        assert os.path.basename(path)[:-5] in DATASETS, path
    for path in glob.glob("experiments/family/*/*.yaml"):
        assert os.path.basename(os.path.dirname(path)) in FAMILIES, path
        assert os.path.basename(path)[:-5] in DATASETS + sorted(set(GROUPS.values())), path
    for path in glob.glob("experiments/backbone/*/*.yaml"):
        assert os.path.basename(os.path.dirname(path)) in BACKBONES, path
        assert os.path.basename(path)[:-5] in DATASETS + sorted(set(GROUPS.values())), path


def test_every_layer_file_is_used_by_some_combination():
    used = {
        f
        for d in DATASETS
        for m in METHODS
        for b in [None] + BACKBONES
        for f in config_files(d, m, backbone=b)
    }
    files = set(glob.glob("experiments/**/*.yaml", recursive=True)) - set(
        glob.glob("experiments/results/**", recursive=True)
    )
    assert files - used == set()


def test_the_composition_order_and_shared_settings():
    assert config_files("sop", "ccp_c2") == [
        "experiments/trainer.yaml",
        "experiments/data/sop.yaml",
        "experiments/protocol/mlrc.yaml",
        "experiments/method/ccp_c2.yaml",
        "experiments/family/ccp/large.yaml",
        "experiments/method/ccp_c2/sop.yaml",
    ]
    assert config_files("synthetic", "baseline") == [
        "experiments/trainer.yaml",
        "experiments/data/synthetic.yaml",
        "experiments/method/baseline.yaml",
    ]
    with pytest.raises(ValueError, match="no config experiments/method/xbmm.yaml"):
        config_files("cub", "xbmm")
    assert config_files("sop", "ccp_c2", backbone="vit_s16_dino")[-3:] == [
        "experiments/method/ccp_c2/sop.yaml",
        "experiments/backbone/vit_s16_dino.yaml",
        "experiments/backbone/vit_s16_dino/large.yaml",
    ]
    with pytest.raises(ValueError, match="no config experiments/backbone/vit_b.yaml"):
        config_files("cub", "baseline", backbone="vit_b")


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("dataset", ["cub", "cars", "sop", "inshop"])
@pytest.mark.parametrize("method", ["baseline", "gsp_contrastive", "ccp_c2", "xbn", "ibc"])
def test_a_backbone_layer_goes_over_every_method(backbone, dataset, method):
    """The backbone's files come last: its network, size, optimizer and schedule replace the
    data set's, the protocol's (MLRC: BN-Inception, 227 px) and a method's per-data-set ones
    (IBC's ResNet-50), while the method's own switches (pooling, loss, memory) stay."""
    plain = ParseOnlyCLI(
        DMLModule,
        DMLDataModule,
        subclass_mode_data=True,
        run=False,
        args=config_args(dataset, method),
    ).config
    config = ParseOnlyCLI(
        DMLModule,
        DMLDataModule,
        subclass_mode_data=True,
        run=False,
        args=config_args(dataset, method, backbone=backbone),
    ).config
    model = config.model
    assert model.backbone.name.startswith("timm:") and model.backbone.pretrained
    assert config.data.init_args.crop == 224 and model.optimizer.name == "adamw"
    assert model.pooling.name == plain.model.pooling.name
    assert model.loss.name == plain.model.loss.name
    assert model.memory.enabled == plain.model.memory.enabled
    assert config.trainer.max_epochs == (50 if dataset in ("cub", "cars") else 150)
    assert model.optimizer.warmup_epochs == (1 if dataset in ("cub", "cars") else 5)


def test_a_later_layer_sets_one_key_of_a_dict_and_keeps_the_others():
    """jsonargparse alone would replace model.pooling.params as a whole: the SOP file's
    num_prototypes would drop gsp_proxy_anchor's gamma 0.5 (a default of 5 would train)."""
    cli = ParseOnlyCLI(
        DMLModule,
        DMLDataModule,
        subclass_mode_data=True,
        run=False,
        args=config_args("sop", "gsp_proxy_anchor"),
    )
    params = cli.config.model.pooling.params
    assert params["num_prototypes"] == 128 and params["gamma"] == 0.5 and params["mu"] == 0.3
    cli = ParseOnlyCLI(
        DMLModule,
        DMLDataModule,
        subclass_mode_data=True,
        run=False,
        args=config_args("cub", "ccp_ms") + ["--model.loss.params.beta", "50"],
    )
    assert cli.config.model.loss.params == {"alpha": 2.0, "beta": 50, "base": 0.5}


def test_a_layer_given_after_make_trains_overrides_still_merges(tmp_path):
    """``make train ARGS='--config layer.yaml'`` puts the layer after --trainer.devices and
    --run_name: the files still merge key by key (the method's gamma is kept) and the
    overrides before the layer still hold."""
    layer = tmp_path / "layer.yaml"
    layer.write_text("model: {optimizer: {lr: 0.0001}}\n")
    cli = ParseOnlyCLI(
        DMLModule,
        DMLDataModule,
        subclass_mode_data=True,
        run=False,
        args=config_args("sop", "gsp_proxy_anchor")
        + ["--trainer.devices", "1", "--run_name", "sop-gsp_proxy_anchor", "--config", str(layer)],
    )
    params = cli.config.model.pooling.params
    assert params["num_prototypes"] == 128 and params["gamma"] == 0.5
    assert cli.config.model.optimizer.lr == 0.0001 and cli.config.run_name == "sop-gsp_proxy_anchor"


@pytest.mark.parametrize("method", ["gsp_contrastive", "gsp_proxy_anchor"])
def test_gsp_methods_build_on_the_embedded_data(method):
    cli = DMLCLI(
        DMLModule,
        DMLDataModule,
        subclass_mode_data=True,
        run=False,
        args=config_args("synthetic", method) + ["--trainer.logger", "false"],
    )
    assert type(cli.model.pooling).__name__ == "GSP"
    assert len(cli.model.pooling.prototypes) == 8  # from gsp_*/synthetic.yaml
    assert cli.model.objective.zero_shot is not None


TINY_RUN = [
    "--data.init_args.train_classes",
    "16",
    "--data.init_args.test_classes",
    "8",
    "--data.init_args.images_per_class",
    "8",
    "--model.backbone.width",
    "8",
    "--trainer.logger",
    "false",
    "--trainer.callbacks",
    "[]",
    "--trainer.enable_checkpointing",
    "false",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
    "--trainer.max_steps",
    "2",
    "--trainer.limit_val_batches",
    "0",
    "--trainer.num_sanity_val_steps",
    "0",
    "--dashboard.enabled",
    "false",
    "--model.memory.start_iteration",
    "0",
]


@pytest.mark.parametrize("method", METHODS)
def test_every_trainable_parameter_is_in_one_group_and_trains(method):
    """Every parameter that needs a gradient is in exactly one optimizer group and changes
    after two steps, for every method config (a loss term whose parameters no group lists
    would silently never train)."""
    cli = DMLCLI(
        DMLModule,
        DMLDataModule,
        subclass_mode_data=True,
        run=False,
        save_config_callback=None,
        args=config_args("synthetic", method) + TINY_RUN,
    )
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
    unchanged = [
        name
        for name, p in module.named_parameters()
        if name in before and torch.equal(p.detach(), before[name])
    ]
    assert not unchanged, unchanged
