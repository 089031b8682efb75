"""The objective and the builder: every loss term is the objective's, cross-part checks live in
one place, optimizer groups come from the parts, poolings initialise through their contract,
checkpoints of the earlier layout still load."""

import pytest
import pytorch_lightning as pl
import torch
import yaml
from helpers import small_data, small_module, trainer
from torch import nn

from dml.errors import ConfigError
from dml.functional import lipschitz_normalize
from dml.module import (
    DMLModule,
    IBCConfig,
    LossConfig,
    MemoryConfig,
    OptimizerConfig,
    PoolingConfig,
    ZeroShotConfig,
)
from dml.objective import Objective
from dml.selection import greedy_k_center


def test_terms_are_named_and_weighted():
    torch.manual_seed(0)
    module = small_module(
        pooling=PoolingConfig("gsp", {"num_prototypes": 4}),
        loss=LossConfig("xbm_contrastive"),
        zero_shot=ZeroShotConfig(weight=0.1, metric_weight=0.9),
        ibc=IBCConfig(enabled=True, heads=2, ff_hidden=16),
    )
    images = torch.rand(8, 3, 32, 32)
    labels = torch.arange(4).repeat_interleave(2)
    embedded = module.embed(images)
    terms = module.objective(embedded, labels)
    assert set(terms) == {"metric", "zero_shot", "ibc_backbone", "ibc_mpn"}
    objective = module.objective
    assert float(terms["metric"]) == pytest.approx(
        0.9 * float(objective.metric_loss(embedded["embeddings"], labels)), rel=1e-6
    )
    assert float(terms["zero_shot"]) == pytest.approx(
        0.1 * float(objective.zero_shot(embedded["pooling"].attributes, labels)), rel=1e-6
    )


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"zero_shot": ZeroShotConfig(weight=0.1)}, "a pooling that produces them"),
        ({"loss": LossConfig("proxy_anchor", proxies_per_class=2)}, "already has its own proxies"),
        ({"loss": LossConfig("xbm_contrastive", miner="multi_similarity")}, "takes no miner"),
        ({"loss": LossConfig("none")}, "leaves nothing to train"),
        (
            {
                "loss": LossConfig("none"),
                "ibc": IBCConfig(enabled=True),
                "memory": MemoryConfig(enabled=True),
            },
            "model.memory.enabled needs a pair loss",
        ),
    ],
)
def test_parts_that_do_not_fit_together_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        small_module(**kwargs)


def test_optimizer_groups_come_from_the_parts():
    module = small_module(
        loss=LossConfig("proxy_anchor"),
        pooling=PoolingConfig("gsp", {"num_prototypes": 4}),
        zero_shot=ZeroShotConfig(weight=0.1),
        ibc=IBCConfig(enabled=True, heads=2, ff_hidden=16),
        optimizer=OptimizerConfig(lr=1e-3, loss_lr=1e-1, backbone_lr_mult=0.1),
    )
    groups = {g["name"]: g for g in module.configure_optimizers().param_groups}
    assert set(groups) == {"backbone", "head", "loss"}
    assert groups["backbone"]["lr"] == pytest.approx(1e-4) and groups["loss"]["lr"] == 0.1
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert {id(p) for p in module.objective.metric_loss.parameters()} <= ids["loss"]  # proxies
    assert id(module.objective.zero_shot.class_embeddings) in ids["loss"]
    assert {id(p) for p in module.objective.ibc.parameters() if p.requires_grad} <= ids["head"]
    assert id(module.pooling.prototypes) in ids["head"]


def test_a_parameter_outside_the_groups_is_an_error_not_a_silent_omission():
    module = small_module()
    module.objective.other_term = torch.nn.Linear(2, 2)
    module.objective.other_term.param_group = "nowhere"  # a group with no learning rate
    with pytest.raises(RuntimeError, match=r"\['nowhere'\] have no learning rate"):
        module.configure_optimizers()
    del module.objective.other_term
    module.stray = torch.nn.Parameter(torch.zeros(3))  # a bare parameter: no part owns it
    with pytest.raises(RuntimeError, match=r"in no optimizer group or in several: \['stray'\]"):
        module.configure_optimizers()


def gsp_module(**kw):
    kw.setdefault("loss", LossConfig(name="proxy_anchor"))
    return small_module(pooling=PoolingConfig("gsp", {"num_prototypes": 8, "mu": 0.3}), **kw)


def fit(module, tmp_path, epochs=1, callbacks=()):
    t = trainer(
        tmp_path, epochs, callbacks=list(callbacks), enable_checkpointing=False, limit_val_batches=0
    )
    t.fit(module, small_data(images_per_class=10))
    return t


def test_prototypes_start_as_k_center_picks_of_the_proxies(tmp_path):
    pl.seed_everything(0)
    module = gsp_module()  # proxy_anchor: 24 proxies >= 8 prototypes, so init "auto" = proxies
    proxies = lipschitz_normalize(module.objective.metric_loss.proxies.detach().clone())
    seen = {}

    class AtFirstStep(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.setdefault("flag", bool(pl_module.pooling.initialized))

    class Before(pl.Callback):  # the module's own hook runs after callbacks' at a batch start
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.setdefault("before", bool(pl_module.pooling.initialized))

    initial = {}
    original = module.pooling.initialize_prototypes

    def record(candidates):
        original(candidates)
        initial.setdefault("prototypes", module.pooling.prototypes.detach().clone())

    module.pooling.initialize_prototypes = record
    fit(module, tmp_path, callbacks=[Before(), AtFirstStep()])
    picks = greedy_k_center(proxies, 8)
    assert torch.allclose(initial["prototypes"], proxies[picks])
    assert seen == {"before": False, "flag": True}


def test_gsp_zero_shot_train_and_survive_a_checkpoint(tmp_path):
    pl.seed_everything(0)
    module = gsp_module(
        loss=LossConfig(name="multi_similarity"),
        zero_shot=ZeroShotConfig(weight=0.1, metric_weight=0.9),
    )
    before = module.objective.zero_shot.class_embeddings.detach().clone()
    t = fit(module, tmp_path)
    assert bool(module.pooling.initialized)  # picked from GAP embeddings (no proxies)
    assert not torch.equal(before, module.objective.zero_shot.class_embeddings)  # trained
    path = tmp_path / "gsp.ckpt"
    t.save_checkpoint(path)
    restored = DMLModule.load_from_checkpoint(path)
    assert bool(restored.pooling.initialized) and not restored.pooling.wants_initialization()
    assert torch.equal(restored.pooling.prototypes, module.pooling.prototypes)
    assert torch.equal(
        restored.objective.zero_shot.class_embeddings, module.objective.zero_shot.class_embeddings
    )


def test_a_checkpoint_of_the_earlier_layout_loads(tmp_path):
    """Before the objective, loss terms were module attributes (loss_fn, zero_shot_loss, ibc):
    those weights are renamed on load."""
    pl.seed_everything(0)
    module = gsp_module(
        zero_shot=ZeroShotConfig(weight=0.1, metric_weight=0.9),
        ibc=IBCConfig(enabled=True, heads=2, ff_hidden=16),
    )
    t = fit(module, tmp_path)
    path = tmp_path / "new.ckpt"
    t.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    renames = {
        "objective.metric_loss.": "loss_fn.",
        "objective.zero_shot.": "zero_shot_loss.",
        "objective.ibc.": "ibc.",
    }
    old_state = {}
    for key, value in checkpoint["state_dict"].items():
        prefix = next((p for p in renames if key.startswith(p)), None)
        old_state[renames[prefix] + key[len(prefix) :] if prefix else key] = value
    checkpoint["state_dict"] = old_state
    checkpoint["hyper_parameters"].pop("memory")  # the earlier layout had no model.memory
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    restored = DMLModule.load_from_checkpoint(old)
    for key, value in module.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


def test_objective_without_terms_is_empty():
    assert (
        Objective()(
            dict(embeddings=torch.zeros(2, 3), raw_embeddings=torch.zeros(2, 3), pooling=None),
            torch.zeros(2),
        )
        == {}
    )


def test_a_ccp_checkpoint_of_the_earlier_layout_loads_with_a_fresh_proximal_term(tmp_path):
    pl.seed_everything(0)
    module = small_module(loss=LossConfig("c2", proxies_per_class=2))
    t = fit(module, tmp_path)
    path = tmp_path / "ccp.ckpt"
    t.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    state = {}
    for key, value in checkpoint["state_dict"].items():
        if key.startswith("objective.proximal."):
            continue  # the earlier layout kept theta_prev in the CCP callback's state
        state[key.replace("objective.metric_loss.", "loss_fn.")] = value
    checkpoint["state_dict"] = state
    torch.save(checkpoint, tmp_path / "old.ckpt")
    with pytest.warns(UserWarning, match="2 memory / proximal buffers start afresh"):
        restored = DMLModule.load_from_checkpoint(tmp_path / "old.ckpt")
    assert torch.equal(restored.objective.proxies(), module.objective.proxies())
    assert restored.objective.proximal() is None  # lambda 0 until a round ends


def test_a_term_and_a_pooling_given_by_class_path_train_without_package_edits(tmp_path):
    """The recipe of docs/extending.md: a module file, a config, a test."""
    pl.seed_everything(0)
    module = small_module(
        pooling=PoolingConfig("helpers.CenterPool"),
        terms={"center": {"class_path": "helpers.CenterTerm", "init_args": {"weight": 0.5}}},
    )
    assert type(module.pooling).__name__ == "CenterPool"
    term = module.objective.terms["center"]
    assert term.centers.shape == (24, 32)  # num_classes and embedding_dim passed in
    groups = {g["name"]: g for g in module.configure_optimizers().param_groups}
    assert any(p is term.centers for p in groups["loss"]["params"])
    seen = []

    class Terms(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(set(trainer.callback_metrics))

    before = term.centers.detach().clone()
    trainer(
        tmp_path,
        1,
        callbacks=[Terms()],
        enable_checkpointing=False,
        limit_val_batches=0,
        limit_train_batches=2,
        log_every_n_steps=1,
    ).fit(module, small_data())
    assert "train/loss_center" in seen[-1] and "train/loss_metric" in seen[-1]
    assert not torch.equal(before, term.centers)
    with pytest.raises(ConfigError, match=r"model.terms.x.class_path: cannot import"):
        small_module(terms={"x": {"class_path": "helpers.Nowhere"}})
    with pytest.raises(ConfigError, match=r"model.terms.x.init_args: unknown parameter"):
        small_module(terms={"x": {"class_path": "helpers.CenterTerm", "init_args": {"margin": 1}}})
    with pytest.raises(ConfigError, match=r"model.terms: a term's name must be a word"):
        small_module(terms={"a.b": {"class_path": "helpers.CenterTerm"}})


class Impostor(nn.Module):
    """A term that returns a value under the metric loss's name."""

    def forward(self, embedded, labels, objective):
        return {"metric": embedded["embeddings"].sum()}


def test_a_term_returning_a_name_already_returned_is_an_error_naming_both():
    module = small_module(terms={"impostor": {"class_path": "test_objective.Impostor"}})
    embedded = module.embed(torch.randn(4, 3, 32, 32))
    with pytest.raises(
        ConfigError,
        match=r"model.terms.impostor returns a loss value named "
        r"'metric', which the metric loss already returned",
    ):
        module.objective(embedded, torch.tensor([0, 0, 1, 1]))


def test_terms_are_addressed_by_name_from_config_files_and_the_command_line(tmp_path):
    """A later config file adds a term without restating the others; one argument of one term
    is set on the command line; ``null`` removes a term."""
    from dml.cli import DMLCLI
    from dml.compose import config_args
    from dml.data import DMLDataModule

    center = {"class_path": "helpers.CenterTerm", "init_args": {"weight": 0.5}}
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text(yaml.safe_dump({"model": {"terms": {"center": center}}}))
    second.write_text(yaml.safe_dump({"model": {"terms": {"again": center}}}))

    def terms(*args):
        cli = DMLCLI(
            DMLModule,
            DMLDataModule,
            subclass_mode_data=True,
            run=False,
            args=config_args("synthetic", "baseline")
            + ["--config", str(first), "--config", str(second), "--trainer.logger", "false", *args],
        )
        return {name: term.weight for name, term in cli.model.objective.terms.items()}

    assert terms() == {"center": 0.5, "again": 0.5}
    assert terms("--model.terms.center.init_args.weight", "0.25") == {"center": 0.25, "again": 0.5}
    assert terms("--model.terms.again", "null") == {"center": 0.5}


def test_a_checkpoint_from_before_terms_had_names_loads(tmp_path):
    """``objective.metric`` and ``objective.extra`` became ``objective.metric_loss`` and
    ``objective.terms``, and ``model.terms`` a mapping: an earlier checkpoint loads, with the
    same weights, for training and for embedding."""
    from dml.inference.embedder import Embedder

    pl.seed_everything(0)
    module = small_module(
        loss=LossConfig("c2", proxies_per_class=2),
        terms={"CenterTerm": {"class_path": "helpers.CenterTerm"}},
    )
    t = fit(module, tmp_path)
    t.save_checkpoint(tmp_path / "new.ckpt")
    checkpoint = torch.load(tmp_path / "new.ckpt", weights_only=True)
    renames = {
        "objective.metric_loss.": "objective.metric.",
        "objective.terms.": "objective.extra.",
    }
    checkpoint["state_dict"] = {
        next((old + k[len(new) :] for new, old in renames.items() if k.startswith(new)), k): v
        for k, v in checkpoint["state_dict"].items()
    }
    assert any(k.startswith("objective.extra.CenterTerm.") for k in checkpoint["state_dict"])
    checkpoint["hyper_parameters"]["terms"] = [{"class_path": "helpers.CenterTerm"}]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    restored = DMLModule.load_from_checkpoint(tmp_path / "old.ckpt", weights_only=True)
    assert restored.hparams["terms"] == {"CenterTerm": {"class_path": "helpers.CenterTerm"}}
    embedder = Embedder.from_checkpoint(
        str(tmp_path / "old.ckpt"), "cpu", trust_modules=("helpers",)
    )
    for other in (restored, embedder.module):
        for key, value in module.state_dict().items():
            assert torch.equal(other.state_dict()[key], value), key


def test_a_run_from_before_terms_had_names_resumes(tmp_path, monkeypatch):
    """A run whose config holds ``model.terms`` as the earlier list resumes, with its config as
    written or with the list turned into the mapping by name."""
    import sys

    from run_helpers import SMALL_RUN

    from dml.cli import main
    from dml.compose import config_args

    monkeypatch.setattr(sys, "argv", ["python -m dml"])
    monkeypatch.setenv("WANDB_MODE", "disabled")
    listed = tmp_path / "listed.yaml"
    listed.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "terms": [{"class_path": "helpers.CenterTerm", "init_args": {"weight": 0.5}}]
                }
            }
        )
    )
    main(
        [
            "fit",
            *config_args("synthetic", "baseline"),
            "--config",
            str(listed),
            *SMALL_RUN,
            "--data.init_args.batches_per_epoch",
            "2",
            "--trainer.max_epochs",
            "1",
            "--trainer.logger",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path / "runs"),
        ]
    )
    (run,) = (tmp_path / "runs").glob("*/checkpoints/last.ckpt")
    run = run.parent.parent
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert isinstance(config["model"]["terms"], list)
    for epochs, named in ((2, False), (3, True)):
        if named:  # the user turned the list into the mapping by name
            config = yaml.safe_load((run / "config.yaml").read_text())
            config["model"]["terms"] = {"CenterTerm": config["model"]["terms"][0]}
            (run / "config.yaml").write_text(yaml.safe_dump(config))
        cli = main(
            [
                "fit",
                "--config",
                str(run / "config.yaml"),
                "--ckpt_path",
                str(run / "checkpoints" / "last.ckpt"),
                "--trainer.max_epochs",
                str(epochs),
            ]
        )
        assert cli.trainer.current_epoch == epochs
        assert cli.model.objective.terms["CenterTerm"].weight == 0.5
