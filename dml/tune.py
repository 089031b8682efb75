"""Hyper-parameter search on the MLRC validation folds only (Optuna, TPE).

    python -m dml.tune --dataset cub --method ccp_c2 --space space.yaml --trials 50
        [--name ROW] [--folds 0 1 2 3] [--epochs N] [--size PX] [--prune]
        [--storage sqlite:///tune.db] [-- extra args]

``space.yaml`` maps config keys to distributions:

    model.optimizer.lr: {type: float, low: 1.0e-5, high: 1.0e-2, log: true}
    model.loss.params.neg_margin: {type: float, low: 0.2, high: 0.8}
    model.embedding_dim: {type: categorical, choices: [64, 128]}
    data.init_args.samples_per_class: {type: int, low: 2, high: 8}
    model.memory.loss: {type: categorical, choices: [null, contrastive]}

(a categorical ``null`` is passed as ``null``, i.e. the config's None).

A trial trains one model per fold in ``--folds`` (``data.init_args.mlrc_fold``: validation on
that fold of the training classes) and scores the best validation MAP@R of each; the objective
is their mean (trial runs under ``runs/tune``, ``--runs``; their weights are deleted once
scored). The test split is never built. Trials go to an SQLite storage (default
``<out>/<dataset>/tune/<name>.db``, study ``<dataset>-<name>``; ``--name`` defaults to the
method, and names a variant made with extra arguments, e.g. C2 without CCP), so a crashed
search goes on where it stopped and several processes can share one study. ``--prune`` stops a
trial after a fold whose running mean is below the median of the earlier trials at that fold
(Optuna's MedianPruner). The best parameters are written as a config file (``--best``, default
``<out>/<dataset>/tune/<name>.best.yaml``) that ``make mlrc ARGS='--config FILE'`` and
``python -m dml fit --config FILE`` accept, and every trial to ``<name>.trials.csv``.

A study is joined only with the settings it was made with (the space, the folds, the seed and the
fingerprint of the fit settings, ``dml.jobs``): other settings are a one-line error, never a
study whose best trial comes from another search. A trial whose run fails (NaN, a crash) is
recorded as failed with the run's last error line, and the search goes on. Each trial's run
output is shown line by line while it trains.
"""

from __future__ import annotations

import argparse
import csv
import glob
import hashlib
import json
import os
import re
from typing import Any, Dict, List, Optional, Sequence

import yaml

from dml import jobs
from dml.child_runs import best_metric, launch
from dml.errors import ConfigError
from dml.mlrc import check_names, fold_args, job_parser

TYPES = ("float", "int", "categorical")


def read_space(path: str) -> Dict[str, Dict[str, Any]]:
    if not os.path.isfile(path):
        raise ConfigError(f"--space {path}: no such file")
    with open(path) as f:
        space = yaml.safe_load(f) or {}
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"--space {path}: expected a mapping of config keys to distributions")
    for key, spec in space.items():
        if not isinstance(spec, dict) or spec.get("type") not in TYPES:
            raise ConfigError(
                f"--space {path}: {key}: expected {{type: float|int|categorical, "
                f"...}}, got {spec!r}"
            )
        needed = ("choices",) if spec["type"] == "categorical" else ("low", "high")
        missing = [n for n in needed if n not in spec]
        if missing:
            raise ConfigError(f"--space {path}: {key}: missing {missing}")
    return space


def suggest(trial, space: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    params = {}
    for key, spec in space.items():
        if spec["type"] == "float":
            params[key] = trial.suggest_float(
                key, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log", False))
            )
        elif spec["type"] == "int":
            params[key] = trial.suggest_int(
                key, int(spec["low"]), int(spec["high"]), log=bool(spec.get("log", False))
            )
        else:
            params[key] = trial.suggest_categorical(key, list(spec["choices"]))
    return params


def as_config(params: Dict[str, Any]) -> Dict[str, Any]:
    """Dotted keys -> the nested mapping of a config file."""
    config: Dict[str, Any] = {}
    for key, value in params.items():
        node = config
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return config


def cli_value(value: Any) -> str:
    """A sampled value as the command line spells it: None -> null, True -> true."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def fold_score(
    dataset: str,
    method: str,
    fold: int,
    seed: int,
    folder: str,
    params: Dict[str, Any],
    extra: Sequence[str],
    epochs: Optional[int],
    root: Optional[str],
    backbone: Optional[str] = None,
    label: str = "trial",
    size: Optional[int] = None,
) -> float:
    """The best validation MAP@R of one fold model; a RuntimeError with the run's last error
    line if it fails (the trial is then recorded as failed and the search goes on)."""
    args = fold_args(
        dataset, method, fold, seed, folder, extra, epochs, size=size, root=root, backbone=backbone
    )
    args += [a for key, value in params.items() for a in (f"--{key}", cli_value(value))]
    launched = launch(args, label, log=os.path.join(folder, "unit.log"))
    if not launched.ok:
        raise RuntimeError(f"{folder}: {launched.reason}")
    score = best_metric(folder, "val/MAP@R")
    if score is None:
        raise RuntimeError(f"{folder}: the run logged no val/MAP@R")
    for path in glob.glob(os.path.join(folder, "*", "checkpoints", "*.ckpt")):
        os.remove(path)  # a trial keeps its metrics and config, not its weights
    return score


def study_settings(opts, space: Dict[str, Any], extra: Sequence[str]) -> Dict[str, Any]:
    """What a study's trials were made with: a study is joined only with the same."""
    args = fold_args(
        opts.dataset,
        opts.method,
        0,
        opts.seed,
        "-",
        extra,
        opts.epochs,
        size=opts.size,
        root=opts.root,
        backbone=opts.backbone,
    )
    return {
        "space": space,
        "folds": list(opts.folds),
        "seed": opts.seed,
        "fit": jobs.fingerprint(args),
    }


def check_study_settings(study, settings: Dict[str, Any], storage: str) -> None:
    saved = study.user_attrs.get("settings")
    if saved is None:
        if study.trials:  # made before settings were recorded: cannot be checked
            raise ConfigError(
                f"study {study.study_name} in {storage} has trials of unknown "
                f"settings; give another --storage to start a new search"
            )
        study.set_user_attr("settings", settings)
        return
    differ = [k for k in settings if saved.get(k) != settings[k]]
    if differ:
        what = {
            "space": "search space",
            "folds": "--folds",
            "seed": "--seed",
            "fit": "fit settings (--epochs, --size, --root, --backbone, extra arguments, "
            "config files or data)",
        }
        raise ConfigError(
            f"study {study.study_name} in {storage} was made with a different "
            f"{', '.join(what[k] for k in differ)}; its trials would be mixed "
            f"with these. Give another --name (or --storage) for a new search, or the "
            f"study's own settings to continue it"
        )


def trials_file(best_path: str) -> str:
    """The trials table beside a best config: ``<name>.best.yaml`` -> ``<name>.trials.csv``
    (any other ``--best`` path: its extension replaced; folder names are kept as they are)."""
    root = os.path.splitext(best_path)[0]
    if root.endswith(".best"):
        root = root[: -len(".best")]
    return root + ".trials.csv"


def storage_shown(storage: str, best_path: str) -> str:
    """The study's database as a best config's header names it: a SQLite file relative to the
    config's folder ("c2.db beside this file"), so a results folder names no machine's path."""
    prefix = "sqlite:///"
    if not storage.startswith(prefix):
        return storage
    folder = os.path.dirname(os.path.abspath(best_path))
    relative = os.path.relpath(storage[len(prefix) :], folder)
    return (
        f"{relative} beside this file"
        if os.sep not in relative
        else f"{relative} from this file's folder"
    )


def csv_value(params: dict, key: str):
    """A trial's value of one searched key in the trials table: empty where the trial did not
    draw it (pruned before, or a failed start), ``null`` where it drew None."""
    if key not in params:
        return ""
    return "null" if params[key] is None else params[key]


def main(argv: Optional[Sequence[str]] = None):
    import optuna

    parser = job_parser("python -m dml.tune", __doc__)
    parser.add_argument("--space", required=True, help="the search space (YAML, see above)")
    parser.add_argument(
        "--name",
        default=None,
        help="the study's name and files (default: the method); name a variant made with "
        "extra arguments, e.g. --name c2_no_ccp -- --ccp.enabled false",
    )
    parser.add_argument(
        "--trials",
        type=int,
        default=20,
        help="trials to run in this call; a study resumed from its database keeps its earlier "
        "trials and adds these (default 20)",
    )
    parser.add_argument(
        "--folds",
        type=int,
        nargs="+",
        default=[0, 1, 2, 3],
        help="validation folds each trial trains on; the objective is their mean",
    )
    parser.add_argument("--seed", type=int, default=0, help="the runs' and the sampler's seed")
    parser.add_argument("--epochs", type=int, default=None, help="default: the configs'")
    parser.add_argument("--size", type=int, default=None, help="crop size; default: configs'")
    parser.add_argument(
        "--root", default=None, help="the data set's folder (default: the data config's)"
    )
    parser.add_argument(
        "--prune", action="store_true", help="stop trials below the median (Optuna)"
    )
    parser.add_argument(
        "--out",
        default="experiments/results",
        help="the study, best config and trials go to OUT/<dataset>/tune/",
    )
    parser.add_argument(
        "--storage", default=None, help="an Optuna storage URL (default: SQLite under --out)"
    )
    parser.add_argument("--runs", default="runs/tune", help="the trials' run folders")
    parser.add_argument(
        "--best", default=None, help="where the best config goes (default: <name>.best.yaml)"
    )
    parser.add_argument(
        "--backbone", default=None, help="a backbone layer (experiments/backbone/<name>.yaml)"
    )
    parser.add_argument(
        "extra", nargs=argparse.REMAINDER, help="after --: more python -m dml fit arguments"
    )
    opts = parser.parse_args(argv)
    check_names(opts.dataset, opts.method, opts.backbone)
    label = opts.name or (f"{opts.method}-{opts.backbone}" if opts.backbone else opts.method)
    if not re.fullmatch(r"[A-Za-z0-9_+-][A-Za-z0-9_.+-]*", label):
        raise ConfigError(
            f"--name {label!r}: expected letters, digits, _ + - and . (not first): it names "
            f"the study's files"
        )
    extra = [a for a in opts.extra if a != "--"]
    space = read_space(opts.space)
    base = os.path.join(opts.out, opts.dataset, "tune")
    os.makedirs(base, exist_ok=True)
    storage = opts.storage or f"sqlite:///{os.path.abspath(os.path.join(base, label))}.db"
    # errors only: a failed trial is one line of ours with its reason, not Optuna's traceback
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(
        study_name=f"{opts.dataset}-{label}",
        storage=storage,
        direction="maximize",
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=opts.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2)
        if opts.prune
        else optuna.pruners.NopPruner(),
    )

    settings = study_settings(opts, space, extra)
    check_study_settings(study, settings, storage)
    # the trials' run folders: one folder per study (storage and settings)
    digest = hashlib.sha256(
        json.dumps([storage, study.study_name, settings], sort_keys=True).encode()
    ).hexdigest()[:10]

    def objective(trial) -> float:
        params = suggest(trial, space)
        scores: List[float] = []
        for step, fold in enumerate(opts.folds):
            folder = os.path.join(
                opts.runs,
                opts.dataset,
                label,
                f"study-{digest}",
                f"trial{trial.number}",
                f"fold{fold}",
            )
            try:
                scores.append(
                    fold_score(
                        opts.dataset,
                        opts.method,
                        fold,
                        opts.seed,
                        folder,
                        params,
                        extra,
                        opts.epochs,
                        opts.root,
                        opts.backbone,
                        f"trial {trial.number} fold {fold}",
                        size=opts.size,
                    )
                )
            except RuntimeError as error:
                trial.set_user_attr("failed", str(error))
                raise
            trial.report(sum(scores) / len(scores), step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return sum(scores) / len(scores)

    # a failing trial (NaN, crash) is recorded as FAIL with its reason; the search goes on
    study.optimize(
        objective,
        n_trials=opts.trials,
        catch=(RuntimeError,),
        callbacks=[
            lambda s, t: print(
                f"trial {t.number}: {t.state.name} "
                f"{'' if t.value is None else f'validation MAP@R {100 * t.value:.1f}'} "
                f"{t.params} {t.user_attrs.get('failed', '')}".rstrip(),
                flush=True,
            )
        ],
    )
    if not any(t.state.name == "COMPLETE" for t in study.trials):
        raise RuntimeError(
            f"no trial of study {study.study_name} completed; the reasons are "
            f"in its trials ({len(study.trials)} failed or pruned)"
        )
    best = study.best_trial
    path = opts.best or os.path.join(base, f"{label}.best.yaml")
    header = (
        f"# python -m dml.tune: best of {len(study.trials)} trials (study "
        f"{study.study_name} in {storage_shown(storage, path)}); mean validation MAP@R over folds "
        f"{opts.folds}: {100 * best.value:.1f} %\n"
    )
    tmp = path + ".partial"
    with open(tmp, "w") as f:
        f.write(header + yaml.safe_dump(as_config(best.params), sort_keys=False))
    os.replace(tmp, path)
    trials_path = trials_file(path)
    keys = list(space)
    with open(trials_path + ".partial", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial", "state", "mean validation MAP@R (fraction)", *keys, "failure"])
        for t in study.trials:
            writer.writerow(
                [
                    t.number,
                    t.state.name,
                    "" if t.value is None else f"{t.value:.6f}",
                    *[csv_value(t.params, k) for k in keys],
                    t.user_attrs.get("failed", ""),
                ]
            )
    os.replace(trials_path + ".partial", trials_path)
    failed = [t.number for t in study.trials if t.state.name == "FAIL"]
    if failed:
        print(
            f"{len(failed)} of {len(study.trials)} trials failed ({failed}); their reasons are "
            f"in {trials_path}",
            flush=True,
        )
    print(
        f"best trial {best.number}: validation MAP@R {100 * best.value:.1f} {best.params} -> "
        f"{path} "
        f"(every trial: {trials_path})"
    )
    return study, path


if __name__ == "__main__":
    from dml.console import run_command

    run_command(main, (ConfigError, RuntimeError))
