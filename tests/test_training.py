"""The training loop end to end on the embedded data, the CLI's config checking, checkpoints."""

import pytest
import pytorch_lightning as pl
import torch
from helpers import small_data, small_module, trainer

from dml.cli import DMLCLI
from dml.cli import main as cli_main
from dml.data import DMLDataModule
from dml.module import DMLModule, LossConfig, OptimizerConfig

CONFIGS = [
    "--config",
    "experiments/trainer.yaml",
    "--config",
    "experiments/data/synthetic.yaml",
    "--config",
    "experiments/method/baseline.yaml",
]


def test_training_raises_recall_well_above_untrained(tmp_path):
    pl.seed_everything(0)
    module, data = small_module(), small_data()
    trainer(tmp_path, 4, enable_checkpointing=False).fit(module, data)
    before, after = module.initial_metrics, module.last_metrics
    assert before["R@1"] < 0.35
    assert after["R@1"] > before["R@1"] + 0.15
    assert after["MAP@R"] > 2 * before["MAP@R"]
    assert set(after) == {"R@1", "R@2", "R@4", "R@8", "MAP@R", "R-Precision", "NMI"}


def test_proxy_loss_parameters_get_their_own_group_and_lr(tmp_path):
    module = small_module(
        loss=LossConfig(name="proxy_anchor"), optimizer=OptimizerConfig(lr=1e-3, loss_lr=1e-1)
    )
    opt = module.configure_optimizers()
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["loss"]["lr"] == 1e-1 and groups["head"]["lr"] == 1e-3
    proxies = list(module.objective.metric_loss.parameters())
    assert proxies and all(any(p is q for q in groups["loss"]["params"]) for p in proxies)


def test_checkpoint_round_trip_gives_identical_embeddings(tmp_path):
    pl.seed_everything(0)
    module, data = small_module(loss=LossConfig(name="proxy_anchor")), small_data()
    t = trainer(tmp_path, 1, enable_checkpointing=False, limit_val_batches=0)
    t.fit(module, data)
    path = tmp_path / "m.ckpt"
    t.save_checkpoint(path)
    restored = DMLModule.load_from_checkpoint(path)
    x = data.eval_datasets["test"].images[:8]
    module.eval(), restored.eval()
    with torch.no_grad():
        assert torch.equal(module(x), restored(x))
    assert torch.equal(module.objective.metric_loss.proxies, restored.objective.metric_loss.proxies)


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit"] + CONFIGS + args)
    assert exc.value.code != 0
    return capsys.readouterr().err


def test_cli_unknown_key_is_an_error_naming_it(capsys):
    err = run_cli(["--model.backbone.depth", "3"], capsys)
    assert "depth" in err


def test_cli_unknown_key_in_a_config_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  embeding_dim: 64\n")
    err = run_cli(["--config", str(bad)], capsys)
    assert "embeding_dim" in err


def test_cli_bad_value_names_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  loss:\n    name: arcface2\n")
    err = run_cli(["--config", str(bad), "--trainer.max_epochs", "1"], capsys)
    assert f"error: {bad}: model.loss.name: unknown loss 'arcface2'" in err  # file and key
    assert "Traceback" not in err


def test_cli_missing_data_set_gives_guidance(tmp_path, capsys):
    err = run_cli(
        [
            "--config",
            "experiments/data/cub.yaml",
            "--data.init_args.root",
            str(tmp_path / "nowhere"),
        ],
        capsys,
    )
    assert "make data DATASET=cub" in err and "Traceback" not in err


def test_cli_composes_data_and_method_parts():
    cli = DMLCLI(
        DMLModule,
        DMLDataModule,
        subclass_mode_data=True,
        run=False,
        args=CONFIGS[:] + ["--trainer.logger", "false"],
    )
    assert cli.model.backbone.out_channels == 128  # small_cnn from data/synthetic.yaml
    assert (
        type(cli.model.objective.metric_loss).__name__ == "MultiSimilarityLoss"
    )  # method/baseline
    assert cli.model.hparams.num_classes == 48  # linked from the data module
