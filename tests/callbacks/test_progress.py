"""The progress bar redraws (and reads the logged loss on the host) by time, not every step."""

import time

from dml.callbacks import ProgressBar
from dml.cli import DMLCLI
from dml.data import DMLDataModule
from dml.module import DMLModule


def test_redraws_at_most_once_per_interval_and_at_the_end(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    bar = ProgressBar(interval=0.5)
    draws = []
    for step in range(1, 11):  # 10 steps 0.2 s apart
        if bar._should_update(step, 10):
            draws.append(step)
        clock[0] += 0.2
    # first step, then whenever 0.5 s passed since the last draw (t = 0.6, 1.2, 1.8), the end
    assert draws == [1, 4, 7, 10]


def test_the_command_line_uses_it_where_a_bar_is_shown(tmp_path):
    base = [
        "--config",
        "experiments/trainer.yaml",
        "--config",
        "experiments/data/synthetic.yaml",
        "--trainer.logger",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path),
    ]

    def build(args):
        return DMLCLI(
            DMLModule,
            DMLDataModule,
            subclass_mode_data=True,
            args=args,
            run=False,
            auto_configure_optimizers=False,
        )

    cli = build(base)
    assert isinstance(cli.trainer.progress_bar_callback, ProgressBar)
    cli = build(base + ["--trainer.enable_progress_bar", "false"])
    assert cli.trainer.progress_bar_callback is None
