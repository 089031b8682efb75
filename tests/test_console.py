"""The console of a run: its first lines say where it writes and what it measures, known
third-party notices that do not concern the user are gone, every other warning still shows."""

import logging
import os
import subprocess
import sys
import warnings

from dml.quiet import quiet_known_noise

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOISE = (
    "args parameter is intended",
    "💡 Tip",
    "anonymous setting has no effect",
    "LeafSpec",
    "Seed set to",
    "GPU available:",
)


def test_a_short_run_starts_with_its_folder_and_split_and_shows_no_known_noise(tmp_path):
    configs = [
        f"experiments/{name}.yaml" for name in ("trainer", "data/synthetic", "method/baseline")
    ]
    argv = [sys.executable, "-m", "dml", "fit"] + [a for c in configs for a in ("--config", c)]
    argv += [
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "3",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.enable_progress_bar",
        "false",
    ]
    env = dict(os.environ, WANDB_MODE="offline", PYTHONWARNINGS="default")
    out = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert lines[0].startswith(f"run folder: {tmp_path}") and lines[0].endswith("(seed 0)"), lines
    assert lines[1].startswith("validation: the test split"), lines
    assert lines[2] == "devices: 1 x cpu", lines
    for noise in NOISE:
        assert noise not in text, noise
    # a warning nobody silenced still reaches the user (3 batches < the logging interval)
    assert "smaller than the logging interval" in text
    # a resumed run starts with its folder too: the same one, and the checkpoint it goes on from
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir() and (p / "checkpoints").is_dir()]
    last = run / "checkpoints" / "last.ckpt"
    argv[argv.index("--trainer.max_epochs") + 1] = "2"
    out = subprocess.run(
        argv + ["--ckpt_path", str(last)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert lines[0] == f"run folder: {run} (seed 0), resuming from {last}", lines
    assert lines[1].startswith("validation: the test split"), lines


def test_only_the_listed_messages_are_silenced(caplog):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_known_noise()
        warnings.warn(
            "LightningCLI's args parameter is intended to run from within Python",
            UserWarning,
            stacklevel=2,
        )
        warnings.warn("`torch.jit.trace` is deprecated. Please switch", FutureWarning, stacklevel=2)
        warnings.warn("something else is deprecated", FutureWarning, stacklevel=2)
    assert [str(w.message) for w in seen] == ["something else is deprecated"]
    log = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger=log.name):
        log.info("💡 Tip: install something")
        log.info("Seed set to 3")
        log.info("[rank: 1] Seed set to 0")  # a DDP process's
        log.info("Trainer already configured with model summary callbacks")
    assert [r.getMessage() for r in caplog.records] == [
        "Trainer already configured with model summary callbacks"
    ]


def test_help_is_short_and_names_every_valid_choice_and_help_all_lists_every_key(capsys):

    from dml.builder import POOLINGS
    from dml.cli import main
    from dml.losses.factory import LOSSES

    out = subprocess.run(
        [sys.executable, "-m", "dml", "fit", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("usage: python -m dml fit") and len(lines) < 40, len(lines)
    text = " ".join(out.stdout.split())
    for folder in ("data", "method", "backbone"):
        for path in os.listdir(os.path.join(ROOT, "experiments", folder)):
            if path.endswith(".yaml"):
                assert f" {path[: -len('.yaml')]} " in text, path
    for name in [*POOLINGS, *LOSSES]:
        assert f" {name} " in text, name
    assert "--help-all" in text
    try:  # the long list: LightningCLI's, every key
        main(["fit", "--help-all"])
    except SystemExit as exit_:
        assert exit_.code in (0, None)
    full = capsys.readouterr().out
    assert "--trainer.max_epochs" in full and "--model.pooling.name" in full
    assert len(full.splitlines()) > 300
    # python -m dml --help: every subcommand, not only LightningCLI's
    top = subprocess.run(
        [sys.executable, "-m", "dml", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert top.returncode == 0 and top.stdout.startswith("usage: python -m dml SUBCOMMAND")
    for sub in ("fit", "test", "embed", "index", "search", "export", "compare"):
        assert sub in top.stdout, sub
