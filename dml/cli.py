"""Command line: ``python -m dml fit --config experiments/...``, LightningCLI over DMLModule and
any DMLDataModule. Config files layer in order, dicts merged key by key (``dml.compose``, which
also holds the rule that picks the files of a data set and a method).

Each run writes into a folder of its own (``dml.runs``); ``--ckpt_path <run>/checkpoints/
last.ckpt`` resumes it there, after checking that the configuration matches the checkpoint's.

``python -m dml test <configs> --zero-shot`` is the papers' first reference row: the backbone
as configured (pretrained or not), no training, no head (``model.embedding_dim: null``: the
embedding is its pooled feature, L2-normalised), on the test split through the same evaluation
as every ``test`` (docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks.progress import ProgressBar as ProgressBarBase
from pytorch_lightning.cli import LightningCLI, SaveConfigCallback
from pytorch_lightning.plugins.io import CheckpointIO

from dml import runs
from dml.builder import terms_by_name
from dml.callbacks import (
    AtomicCheckpointIO,
    ChanceConstraintProjection,
    CrossBatchNormalization,
    DashboardFigures,
    EarlyStopping,
    MemoryDrift,
    ProgressBar,
)
from dml.compose import merge_config_args
from dml.console import say
from dml.data import (
    DatasetNotFound,
    DMLDataModule,
    IncompleteDataset,
    MetadataError,
    UnreadableImageError,
)
from dml.errors import (
    ConfigError,
    DiskFullError,
    NonFiniteEmbeddingsError,
    NonFiniteLossError,
    NonFiniteStateError,
)
from dml.models import PretrainedWeightsUnavailable
from dml.module import DMLModule
from dml.quiet import quiet_known_noise
from dml.safe_load import load_checkpoint

CONFIG_KEY = "dml_config"  # the composed configuration, saved in every checkpoint


class DMLCLI(LightningCLI):
    """LightningCLI whose config files layer with dicts merged key by key
    (``dml.compose.merge_config_args``), each run in its own folder, resumes checked."""

    run_dir: Optional[str] = None

    def __init__(self, *args, **kwargs):
        given = kwargs.get("args")
        argv = list(sys.argv[1:] if given is None else given)
        merged, merged_file = merge_config_args(argv, tempfile.gettempdir())
        if merged_file is not None:
            kwargs["args"] = merged
        try:
            super().__init__(*args, **kwargs)
        finally:
            if merged_file is not None and os.path.exists(merged_file):
                os.remove(merged_file)

    def add_arguments_to_parser(self, parser) -> None:
        # The data set decides the number of classes (proxy losses) and the standard Recall@Ks.
        parser.link_arguments("data.num_train_classes", "model.num_classes", apply_on="instantiate")
        # Method schedules and run keeping: a top-level YAML group each, appended to the
        # trainer's callbacks (so that a method's settings never replace the callback list).
        parser.add_lightning_class_args(CrossBatchNormalization, "xbn")
        parser.add_lightning_class_args(ChanceConstraintProjection, "ccp")
        parser.add_lightning_class_args(MemoryDrift, "memory_drift")  # before the dashboard
        parser.add_lightning_class_args(DashboardFigures, "dashboard")
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.add_argument(
            "--run_name",
            type=Optional[str],
            default=None,
            help="A name in the run folder's name (runs/<time>-<name>-<random>).",
        )
        parser.add_argument(
            "--resume_changes",
            type=Optional[str],
            default=None,
            help="Config keys allowed to differ from the checkpoint's when "
            "resuming with --ckpt_path: comma-separated fnmatch patterns, "
            "e.g. 'model.optimizer.lr' or 'model.optimizer.*,model.memory.*'.",
        )

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "test":
            parser.add_argument(
                "--zero-shot",
                action="store_true",
                help="The zero-shot reference row: evaluate the backbone as configured "
                "(model.backbone.pretrained) with no training and no head "
                "(model.embedding_dim: null: the pooled feature, L2-normalised) on the "
                "test split; takes no --ckpt_path. Not model.zero_shot (GSP's loss).",
            )
        return parser

    # --- run folder and resume ----------------------------------------------------------
    def _parse_ckpt_path(self) -> None:
        """LightningCLI would overwrite the model's config with the checkpoint's hyperparameters
        here, silently dropping command-line changes (``--model.optimizer.lr``) while callbacks
        follow the new config. The model is built from the config given instead, and
        ``before_instantiate_classes`` checks it against the checkpoint's (``dml.runs``)."""

    def before_instantiate_classes(self) -> None:
        config = self.config if self.subcommand is None else self.config[self.subcommand]
        if self.subcommand in ("validate", "test") and "verbose" in config:
            config.verbose = False  # the module prints its metrics, in percent, with the split
        if config.trainer.get("precision") is None:
            config.trainer.precision = default_precision(config.trainer.get("accelerator"))
        check_trainer_settings(config.trainer)
        if config.get("zero_shot"):
            use_zero_shot(config)
        if self.subcommand is None:  # run=False: classes only, nothing is written
            return
        ckpt_path = config.get("ckpt_path")
        resuming = self.subcommand == "fit" and bool(ckpt_path)
        # read as data first: a file that would run code is refused before Lightning opens it
        trained_with = (
            saved_config(ckpt_path, resuming)
            if ckpt_path and ckpt_path not in LIGHTNING_CHECKPOINT_NAMES
            else None
        )
        shared = runs.shared_run_dir()
        if shared:
            os.makedirs(shared, exist_ok=True)
            run_dir = shared
        elif resuming and runs.run_folder_of_checkpoint(ckpt_path):
            run_dir = runs.run_folder_of_checkpoint(ckpt_path)
        else:
            name = config.get("run_name")
            if self.subcommand != "fit":  # an evaluation, not a training run: its name says so
                name = f"{self.subcommand}-{name}" if name else self.subcommand
            run_dir = runs.create_run_dir(runs.runs_root(config.trainer.default_root_dir), name)
        self.run_dir = run_dir
        if launching_process() and self.subcommand == "fit":
            runs.lock_run_dir(run_dir)
        if not shared:
            runs.export_run_dir(run_dir)  # the DDP processes Lightning starts share it
        point_outputs_to(config, run_dir)
        if resuming:
            allowed = [
                p.strip() for p in (config.get("resume_changes") or "").split(",") if p.strip()
            ]
            runs.check_resume(
                with_named_terms(trained_with),
                with_named_terms(self._config_dict(config)),
                ckpt_path,
                allowed,
                self._default_config_dict(),
            )
        if launching_process():
            runs.write_run_file(run_dir, git_state(), ckpt_path if resuming else None)
            seed = config.get("seed_everything")
            if self.subcommand != "fit":
                say(f"evaluation folder ({self.subcommand}, no training): {run_dir} (seed {seed})")
            elif resuming:  # the checkpoint's own line (what it restores) follows
                say(f"run folder: {run_dir} (seed {seed}), resuming from {ckpt_path}")
            else:
                say(f"run folder: {run_dir} (seed {seed})")

    # --- what the printed numbers measure ----------------------------------------------------
    def before_fit(self) -> None:
        dm = self.datamodule
        if getattr(dm, "validates_on_test_split", False):
            say(
                "validation: the test split. The best epoch (best-*.ckpt, early stopping) is "
                "chosen on it: test-set model selection, the papers' practice; the MLRC "
                "protocol (make mlrc, data.init_args.mlrc_fold) validates on held-out training "
                "classes instead"
            )
        elif hasattr(dm, "split_name"):
            say(
                f"validation: {dm.split_name('val')} (held-out training classes); the test "
                f"split is not used while training"
            )
        trainer = self.trainer
        kind = type(trainer.accelerator).__name__.replace("Accelerator", "").lower()
        say(f"devices: {trainer.num_devices} x {kind}")

    def before_test(self) -> None:
        if self.config["test"].get("zero_shot"):  # the printed line says what was measured
            self.model.test_description = zero_shot_description(self.model)

    def after_fit(self) -> None:
        line = run_summary(self.trainer, self.model)
        if line:
            say(line)

    def _instantiate_trainer(self, config: dict, callbacks: list) -> pl.Trainer:
        """Lightning's default progress bar reads the logged loss on the host every step (a GPU
        synchronisation each step); where the run shows a bar and the config names none, it is
        ``dml.callbacks.ProgressBar``, redrawn twice a second. Checkpoints are written
        atomically (``AtomicCheckpointIO``) unless ``trainer.plugins`` names a checkpoint IO."""
        given = list(callbacks) + list(config.get("callbacks") or [])
        if config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBarBase) for c in given
        ):
            callbacks = list(callbacks) + [ProgressBar()]
        plugins = config.get("plugins")
        plugins = (
            list(plugins)
            if isinstance(plugins, (list, tuple))
            else ([] if plugins is None else [plugins])
        )
        if not any(isinstance(p, CheckpointIO) for p in plugins):  # a custom one is kept
            config = dict(config, plugins=plugins + [AtomicCheckpointIO()])
        return super()._instantiate_trainer(config, callbacks)

    def _default_config_dict(self) -> Optional[dict]:
        """Every key at its default (for checkpoints older than a key); None if unavailable."""
        parser = self._parser(self.subcommand)
        try:
            return json.loads(
                parser.dump(parser.get_defaults(), skip_none=False, skip_check=True, format="json")
            )
        except Exception:  # noqa: BLE001 - then absent keys count as changed, as before
            return None

    def _config_dict(self, config) -> dict:
        return json.loads(
            self._parser(self.subcommand).dump(config, skip_none=False, format="json")
        )


def use_zero_shot(config) -> None:
    """``test --zero-shot``: no checkpoint, and no head (``model.embedding_dim: null``), so
    that the module's embedding is the backbone's pooled feature, L2-normalised. The pooling,
    the backbone and its weights stay as the config says."""
    if config.get("ckpt_path"):
        raise ConfigError(
            f"--zero-shot evaluates the backbone with no training; it takes no "
            f"--ckpt_path ({config.ckpt_path}): drop one of the two"
        )
    config.model.embedding_dim = None


def zero_shot_description(module) -> str:
    """What a zero-shot test measured, for its printed line: "zero-shot: resnet50,
    pretrained=True, no training, 2048-d gap features"."""
    backbone, pooling = module.hparams["backbone"], module.hparams["pooling"]
    pretrained = bool(backbone["pretrained"])
    return (
        f"zero-shot: {backbone['name']}, pretrained={pretrained}"
        f"{'' if pretrained else ' (random init)'}, no training, "
        f"{module.head.out_features}-d {pooling['name']} features"
    )


def check_trainer_settings(trainer) -> None:
    """ConfigErrors naming trainer keys Lightning would take and then fail on (a division by
    zero) or run as nothing (no epoch)."""
    from dml.config import AT_LEAST_ONE, check_range

    for key in ("accumulate_grad_batches", "log_every_n_steps", "check_val_every_n_epoch"):
        check_range(f"trainer.{key}", trainer.get(key), AT_LEAST_ONE)
    for key in ("max_epochs", "max_steps"):
        value = trainer.get(key)
        if value is not None and value != -1:
            check_range(f"trainer.{key}", value, AT_LEAST_ONE)


def run_summary(trainer, module) -> Optional[str]:
    """One line at the end of a fit: the best epoch by the checkpoint callback's monitor
    (val/MAP@R), what it measured, its metrics and its checkpoint."""
    from dml.evaluation_steps import format_metrics

    history = getattr(module, "epoch_metrics", None)
    if not history:
        return None
    ckpt = trainer.checkpoint_callback
    monitor = getattr(ckpt, "monitor", None) or "val/MAP@R"
    mode = getattr(ckpt, "mode", "max")
    key = monitor.split("/", 1)[1] if monitor.startswith("val/") else monitor
    scored = [(e, m) for e, m in sorted(history.items()) if key in m]
    if not scored:
        return None
    # the first epoch reaching the best value, as the checkpoint callback keeps it
    best = (max if mode == "max" else min)(scored, key=lambda em: em[1][key])[1][key]
    epoch, metrics = next((e, m) for e, m in scored if m[key] == best)
    path = getattr(ckpt, "best_model_path", "") or ""
    where = f" | checkpoint {path}" if path else " | no checkpoint kept"
    return (
        f"best epoch {epoch} by {monitor} | val: {module.split_name('val')} | "
        f"{format_metrics(metrics)}{where}"
    )


def default_precision(
    accelerator, cuda_available: Optional[bool] = None, bf16_supported: Optional[bool] = None
) -> str:
    """``trainer.precision`` when the config leaves it unset: ``bf16-mixed`` where the run
    goes to a CUDA GPU that has bfloat16 (Ampere and later: the network in bfloat16, the
    objective and evaluation in float32), ``32-true`` elsewhere (CPUs, older GPUs, where
    float16 would need loss scaling)."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    name = str(accelerator or "auto").lower()
    if not cuda_available or name not in ("auto", "gpu", "cuda"):
        return "32-true"
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    return "bf16-mixed" if bf16_supported else "32-true"


def launching_process() -> bool:
    """Rank 0 of a run (the process the user started, or global rank 0 of a cluster job)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) == 0


def point_outputs_to(config, run_dir: str) -> None:
    """Loggers, checkpoints and the trainer's root all write inside the run folder."""
    config.trainer.default_root_dir = run_dir
    loggers = config.trainer.logger
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        if not hasattr(logger, "class_path"):
            continue
        args = logger.init_args
        if logger.class_path.endswith("CSVLogger"):
            args.save_dir, args.name, args.version = run_dir, "", ""
        elif logger.class_path.endswith("WandbLogger"):
            args.save_dir = run_dir
            args.name = args.name or os.path.basename(run_dir)
            wandb_id = read_run_file(run_dir).get("wandb_id")
            if wandb_id and not args.id:  # a resumed run continues its W&B run
                args.id, args.resume = wandb_id, args.resume or "allow"
        elif "save_dir" in args:
            args.save_dir = run_dir
    original = read_run_file(run_dir).get("run")
    for callback in config.trainer.callbacks or []:
        if not (
            hasattr(callback, "class_path")
            and callback.class_path.endswith("Checkpoint")
            and "dirpath" in callback.init_args
        ):
            continue
        dirpath = callback.init_args.dirpath
        if dirpath and runs.is_checkpoint_folder_of(dirpath, run_dir, original):
            # the folder's own checkpoints/, as an earlier version wrote it into config.yaml:
            # wherever the folder is now (copied, moved), its checkpoints are inside it
            callback.init_args.dirpath = dirpath = None
        if dirpath is None and not callback.class_path.endswith("RunCheckpoint"):
            # RunCheckpoint finds <run>/checkpoints itself, so that config.yaml holds no path
            callback.init_args.dirpath = os.path.join(run_dir, "checkpoints")


def read_run_file(run_dir: str) -> dict:
    try:
        with open(os.path.join(run_dir, runs.RUN_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


# --ckpt_path values Lightning resolves itself rather than reading a file of that name
LIGHTNING_CHECKPOINT_NAMES = ("best", "last", "hpc", "registry")


def with_named_terms(config: Optional[dict]) -> Optional[dict]:
    """``model.terms`` as the mapping by name, also where a run from before terms had names
    holds the list (``dml.builder.terms_by_name``), so that the two layouts compare equal."""
    model = (config or {}).get("model")
    if not isinstance(model, dict) or not isinstance(model.get("terms"), list):
        return config
    return dict(config, model=dict(model, terms=terms_by_name(model["terms"])))


def saved_config(ckpt_path: str, resuming: bool = False) -> Optional[dict]:
    """The configuration a checkpoint was trained with (None for checkpoints without one),
    read as data (``dml.safe_load``): a file that would run code, or a dict that is not a
    Lightning checkpoint (of a whole training state, to resume), is refused here, before
    Lightning opens it and before a run folder is made."""
    checkpoint = load_checkpoint(ckpt_path, "checkpoint (ckpt_path)", mmap=True)
    needed = ["pytorch-lightning_version", "state_dict"]
    needed += ["optimizer_states", "loops"] if resuming else []
    missing = [key for key in needed if key not in checkpoint]
    if missing:
        raise ConfigError(
            f"--ckpt_path {ckpt_path}: not a Lightning checkpoint"
            + (" to resume from" if resuming else "")
            + f" (no {', '.join(missing)})"
        )
    config = checkpoint.get(CONFIG_KEY)
    return config if isinstance(config, dict) else None


def git_state() -> dict:
    """The commit the code runs from, and whether the tree had uncommitted changes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args):
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()

    try:
        return {
            "commit": git("rev-parse", "HEAD") or "unknown",
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        }
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": False}


class LoggedConfig(SaveConfigCallback):
    """Saves config.yaml in the run folder (an earlier one, on resume, is kept as
    config.<k>.yaml), hands the whole configuration and the git commit to every logger (W&B's
    run config, CSV's hparams.yaml), and stores the configuration in every checkpoint so that
    a resume can be checked against it."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not self.already_saved and self.config.get("ckpt_path") and trainer.is_global_zero:
            runs.keep_previous_config(trainer.default_root_dir, self.config_filename)
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = json.loads(self.parser.dump(self.config, skip_none=False, format="json"))
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": config, "git": git_state()})
            if type(logger).__name__ == "WandbLogger" and trainer.is_global_zero:
                record_wandb_id(trainer.default_root_dir, logger.version)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        checkpoint[CONFIG_KEY] = json.loads(
            self.parser.dump(self.config, skip_none=False, format="json")
        )


def record_wandb_id(run_dir: str, wandb_id) -> None:
    record = read_run_file(run_dir)
    if wandb_id and record and record.get("wandb_id") != wandb_id:
        record["wandb_id"] = wandb_id
        tmp = os.path.join(run_dir, f"{runs.RUN_FILE}.{os.getpid()}.partial")
        with open(tmp, "w") as f:
            json.dump(record, f, indent=2)
        os.replace(tmp, os.path.join(run_dir, runs.RUN_FILE))


# Errors with a message the user can act on: printed as one line, not as a traceback.
USER_ERRORS = (
    ConfigError,
    DatasetNotFound,
    IncompleteDataset,
    MetadataError,
    UnreadableImageError,
    PretrainedWeightsUnavailable,
    NonFiniteLossError,
    NonFiniteEmbeddingsError,
    NonFiniteStateError,
    DiskFullError,
)


SUBCOMMANDS = ("fit", "validate", "test", "predict")


def main(args=None) -> DMLCLI:
    quiet_known_noise()
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] and argv[0] in SUBCOMMANDS and {"-h", "--help"} & set(argv):
        from dml.short_help import short_help

        print(short_help(argv[0]))
        raise SystemExit(0)
    if "--help-all" in argv:  # LightningCLI's own, every key with its default
        argv = ["--help" if a == "--help-all" else a for a in argv]
        args = argv
    cli = None
    try:
        cli = DMLCLI(
            DMLModule,
            DMLDataModule,
            subclass_mode_data=True,
            save_config_callback=LoggedConfig,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
            args=args,
            auto_configure_optimizers=False,
            # allow_abbrev: --trainer.max_epoch (a typo) is an error, never max_epochs
            parser_kwargs={
                "exit_on_error": False,
                "allow_abbrev": False,
                **{name: {"exit_on_error": False, "allow_abbrev": False} for name in SUBCOMMANDS},
            },
        )
    except (argparse.ArgumentError, OSError, *USER_ERRORS) as error:
        if os.environ.get("DML_TRACEBACK"):
            raise
        if isinstance(error, OSError) and not isinstance(error, USER_ERRORS):
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            error = DiskFullError(
                f"no space left on the device writing "
                f"{error.filename or 'a file'}; free space, then resume"
            )
        discard_unused_run_dir()
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        message = with_config_file(message, config_sources(argv), argv)
        if isinstance(error, argparse.ArgumentError):
            message += ". `python -m dml fit --help-all` lists every key"
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        runs.release_run_dir()
        finish_wandb()
    return cli


def config_sources(argv) -> dict:
    """Dotted key -> the last ``--config`` file that sets it (or a parent of it)."""
    import yaml

    sources = {}
    for i, arg in enumerate(argv):
        path = (
            argv[i + 1]
            if arg in ("--config", "-c") and i + 1 < len(argv)
            else arg.split("=", 1)[1]
            if arg.startswith("--config=")
            else None
        )
        if not path or not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                content = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError):
            continue
        stack = [("", content)]
        while stack:
            prefix, node = stack.pop()
            if not isinstance(node, dict):
                continue
            for key, value in node.items():
                name = f"{prefix}{key}"
                sources[name] = path
                stack.append((name + ".", value))
    return sources


def with_config_file(message: str, sources: dict, argv=()) -> str:
    """Name the config file that holds the key an error is about, when one does (and the
    command line does not set that key itself)."""
    match = re.search(r"option '([\w.]+)'", message) or re.match(r"([a-z_]+(?:\.[\w]+)+)", message)
    if not match:
        return message
    key = match.group(1)
    if any(a == f"--{key}" or a.startswith(f"--{key}=") for a in argv):
        return message
    for candidate in [key] + [key.rsplit(".", n)[0] for n in range(1, key.count(".") + 1)]:
        path = sources.get(candidate) or sources.get(
            candidate.replace("data.", "data.init_args.", 1)
        )
        if path:
            return f"{path}: {message}"
    return message


def discard_unused_run_dir() -> None:
    """A new run that failed before training (a config error found at setup) leaves no folder
    behind: one this process created that holds nothing but its start files."""
    path = os.environ.get(runs.ENV_DIR)
    start_files = {runs.RUN_FILE, runs.LOCK_FILE, "config.yaml", "hparams.yaml"}
    if (
        path
        and os.environ.get(runs.ENV_OWNER) == str(os.getpid())
        and os.path.isdir(path)
        and runs.created_here(path)
        and set(os.listdir(path)) <= start_files
    ):
        for name in os.listdir(path):
            os.remove(os.path.join(path, name))
        os.rmdir(path)


def finish_wandb() -> None:
    """Close the W&B run (summary and config files are written then), so that several runs in
    one process (notebooks, benchmarks) are separate runs."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
