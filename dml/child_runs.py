"""Runs of ``python -m dml`` as child processes, for the jobs that train many models
(``dml.mlrc``, ``dml.tune``, ``dml.reproduce``, ``dml.gpu_check``): one builder of ``fit``
arguments, one launcher, one reader of what a run logged (its ``metrics.csv``).

A child's standard output is shown line by line behind a label (or kept), its standard error
goes to a log file, and a failure is summed up by the last line it wrote to standard error:
the CLI's one-line errors (``dml.console``) put the reason there.
"""

from __future__ import annotations

import csv
import glob
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

from dml.compose import config_args


def fit_args(
    dataset: str,
    method: str,
    *,
    backbone: Optional[str] = None,
    config: Optional[str] = None,
    fold: Optional[int] = None,
    seed: Optional[int] = None,
    folder: Optional[str] = None,
    devices: Optional[int] = None,
    run_name: Optional[str] = None,
    epochs: Optional[int] = None,
    size: Optional[int] = None,
    resize: Optional[int] = None,
    root: Optional[str] = None,
    extra: Sequence[str] = (),
) -> List[str]:
    """``fit`` and the arguments of one run: the data set's and method's config files
    (``dml.compose.config_args``), then ``config`` (a tuned config, say), the MLRC ``fold``,
    the seed of the run and of its data order, the run's parent ``folder``, ``devices``,
    ``epochs``, the image ``size`` (crop; resize ``resize`` or the same), the data ``root``,
    no progress bar and no dashboard, and last ``extra``, which overrides any of them."""
    args = ["fit", *config_args(dataset, method, backbone=backbone)]
    if config:
        args += ["--config", config]
    if fold is not None:
        args += ["--data.init_args.mlrc_fold", str(fold)]
    if seed is not None:
        args += ["--seed_everything", str(seed), "--data.init_args.seed", str(seed)]
    if folder is not None:
        args += ["--trainer.default_root_dir", folder]
    if devices is not None:
        args += ["--trainer.devices", str(devices)]
    args += ["--trainer.enable_progress_bar", "false", "--dashboard.enabled", "false"]
    if run_name:
        args += ["--run_name", run_name]
    if epochs:
        args += ["--trainer.max_epochs", str(epochs)]
    if size:
        args += ["--data.init_args.crop", str(size), "--data.init_args.resize", str(resize or size)]
    if root:
        args += ["--data.init_args.root", root]
    return args + list(extra)


@dataclass
class Launched:
    """What a child run left: its exit status, seconds, standard output (when it was not
    shown behind a label), the last line of its standard error and where all of it is."""

    returncode: int
    seconds: float
    stdout: str
    last_error: str
    log: Optional[str]

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def reason(self) -> str:
        """Why it failed, in one line: its last line of standard error, else its exit status."""
        return self.last_error[:500] or f"exit status {self.returncode}"


def child_env(extra: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """The environment of a child run: this one, W&B off unless WANDB_MODE says otherwise."""
    env = dict(os.environ, WANDB_MODE=os.environ.get("WANDB_MODE", "disabled"))
    env.update(extra or {})
    return env


def start(
    args: Sequence[str], stderr, env: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None
) -> subprocess.Popen:
    """``python -m dml <args>`` started, standard output piped, standard error to ``stderr``."""
    return subprocess.Popen(
        [sys.executable, "-m", "dml", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=child_env(env),
        cwd=cwd,
    )


def launch(
    args: Sequence[str],
    label: Optional[str] = None,
    log: Optional[str] = None,
    timeout: Optional[float] = None,
    env: Optional[Mapping[str, str]] = None,
    cwd: Optional[str] = None,
) -> Launched:
    """Runs ``python -m dml <args>`` to its end (or kills it after ``timeout`` seconds).
    With a ``label`` its output is printed line by line behind it, and a failure as one line
    naming the log; without, the output is kept in ``Launched.stdout``. Standard error is
    appended to ``log`` (a temporary file when None) after a line with the command."""
    if log:
        os.makedirs(os.path.dirname(os.path.abspath(log)), exist_ok=True)
    path = log or tempfile.mkstemp(prefix="dml-child-", suffix=".log")[1]
    started = time.time()
    with open(path, "a") as errors:
        errors.write(f"$ python -m dml {shlex.join(map(str, args))}\n")
        errors.flush()
        proc = start(args, errors, env, cwd)
        killed = threading.Event()

        def kill():
            killed.set()
            proc.kill()

        timer = threading.Timer(timeout, kill) if timeout else None
        if timer:
            timer.start()
        kept = []
        try:
            for line in proc.stdout:
                if label is None:
                    kept.append(line)
                elif line.strip():
                    print(f"{label} | {line.rstrip()}", flush=True)
            code = proc.wait()
        finally:
            if timer:
                timer.cancel()
    timed_out = killed.is_set()
    with open(path, "a") as errors:
        if timed_out:
            errors.write(f"timed out after {timeout:g} s\n")
        errors.write(f"exit status {code}\n")
    launched = Launched(
        code,
        round(time.time() - started, 1),
        "".join(kept),
        f"timed out after {timeout:g} s" if timed_out else _last_error(path),
        log,
    )
    if not log:
        os.remove(path)
    if label is not None and not launched.ok:
        where = f" (all of its standard error: {log})" if log else ""
        print(f"{label} | FAILED: {launched.reason}{where}", flush=True)
    return launched


def _last_error(path: str) -> str:
    """The last line a child wrote to standard error (not the launcher's own closing lines)."""
    with open(path, errors="replace") as f:
        lines = [x.strip() for x in f if x.strip()]
    while lines and lines[-1].startswith("exit status "):
        lines.pop()
    return "" if not lines or lines[-1].startswith("$ python -m dml ") else lines[-1]


# --- what a run logged --------------------------------------------------------------------------
def metric_rows(run_dir: str) -> List[Dict[str, str]]:
    """The rows of ``<run_dir>/metrics.csv`` (``dml.loggers``); [] when there is none."""
    path = os.path.join(run_dir, "metrics.csv")
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def metric_values(run_dir: str, name: str) -> List[float]:
    """Every value of ``name`` (``val/MAP@R``, ``train/loss``) the run logged, in order."""
    return [float(row[name]) for row in metric_rows(run_dir) if row.get(name)]


def step_losses(run_dir: str) -> Dict[int, float]:
    """``train/loss`` by global step (a step logged twice, as a resumed run may: the last)."""
    return {
        int(row["step"]): float(row["train/loss"])
        for row in metric_rows(run_dir)
        if row.get("train/loss")
    }


def last_metric(run_dir: str, name: str) -> Optional[float]:
    values = metric_values(run_dir, name)
    return values[-1] if values else None


def best_metric(parent: str, name: str = "val/MAP@R") -> Optional[float]:
    """The largest ``name`` any run folder directly under ``parent`` logged, or None."""
    values = [
        v for run_dir in glob.glob(os.path.join(parent, "*")) for v in metric_values(run_dir, name)
    ]
    return max(values) if values else None


def run_folder(parent: str) -> Optional[str]:
    """The newest run folder (one with a ``run.json``) directly under ``parent``."""
    found = sorted(glob.glob(os.path.join(parent, "*", "run.json")))
    return os.path.dirname(found[-1]) if found else None
