"""Checkpoints that hold the last state and are never left half written.

``RunCheckpoint`` is Lightning's ``ModelCheckpoint`` (best by the monitored metric) with the
guarantees a run needs to be resumable exactly:
- ``last.ckpt`` is the state at the end of every epoch (and at a clean stop), whatever the
  monitor did; Lightning refreshes it only when the monitored checkpoint is saved.
- Every checkpoint file is written atomically: to a temporary file in the same folder, flushed
  to disk, then renamed (``AtomicCheckpointIO``, the checkpoint IO the CLI gives every
  trainer, ``dml.cli``). A kill or a full disk leaves the previous file or none, never a
  truncated one under a checkpoint name.
- The random number generators of every process (Python, NumPy, torch, CUDA) are saved with
  the checkpoint and restored when training resumes, so that a resumed run draws the same
  augmentations, dropout masks and loader seeds as one that never stopped.

(A model state holding NaN or inf is never saved either: the module refuses it in its own
``on_save_checkpoint``, ``dml.nonfinite_guard``.)

On resume it prints one line: where training resumes and which state the checkpoint restores.
"""

from __future__ import annotations

import errno
import os
import random
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_warn

from dml.console import say
from dml.errors import DiskFullError


def atomic_torch_save(obj: Any, path: str) -> None:
    """torch.save to ``path`` through a temporary file in the same folder and a rename. A full
    disk is a ``DiskFullError`` naming ``path`` (the file it would replace is untouched)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}{PARTIAL}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if os.path.exists(tmp):
            os.remove(tmp)
        if disk_full(error):
            raise DiskFullError(
                f"no space left on the device writing {path}; the earlier "
                f"file of that name is kept. Free space, then resume the "
                f"run"
            ) from None
        raise


PARTIAL = ".partial"


def disk_full(error: BaseException) -> bool:
    """Whether ``error``, or an error it arose from, is "no space left" (torch.save reports a
    full disk as the OSError, then a RuntimeError "unexpected pos" while closing the file)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def remove_stale_partials(folder: str) -> List[str]:
    """Delete the temporary files of writes that a killed process left (``.<name>.<pid>
    .partial`` whose process is gone); returns their names."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in os.listdir(folder):
        if not (name.startswith(".") and name.endswith(PARTIAL)):
            continue
        try:
            pid = int(name[: -len(PARTIAL)].rsplit(".", 1)[1])
        except (IndexError, ValueError):
            continue
        if pid == os.getpid() or _alive(pid):
            continue
        try:
            os.remove(os.path.join(folder, name))
            removed.append(name)
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, writing local files atomically (``atomic_torch_save``);
    remote paths keep fsspec's transactions."""

    def save_checkpoint(self, checkpoint: Dict[str, Any], path, storage_options=None) -> None:
        path = str(path)
        if "://" in path and not path.startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(
                "AtomicCheckpointIO.save_checkpoint takes no storage_options for local files"
            )
        atomic_torch_save(
            checkpoint, path[len("file://") :] if path.startswith("file://") else path
        )


def collect_rng_states() -> Dict[str, Any]:
    """This process's generators, as tensors and plain values (loadable with
    ``torch.load(weights_only=True)``, as Lightning loads checkpoints)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached_gaussian": cached,
        },
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }


def set_rng_states(states: Dict[str, Any]) -> None:
    """Restore what ``collect_rng_states`` returned."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    n = states["numpy"]
    np.random.set_state(
        (
            n["kind"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    p = states["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


def _gather_objects(trainer, obj) -> List[Any]:
    """``obj`` of every process, in rank order (a collective: every rank must call it)."""
    if (
        trainer.world_size == 1
        or not torch.distributed.is_available()
        or not torch.distributed.is_initialized()
    ):
        return [obj]
    out: List[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint (same arguments) whose ``last.ckpt`` follows every epoch, whose files are
    written atomically, and which saves and restores every process's RNG states."""

    RNG_KEY = "rng_states"

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("save_last", True)
        super().__init__(*args, **kwargs)
        self._last_saved_at: Optional[int] = None
        self._rng_to_restore: Optional[List[Dict[str, Any]]] = None
        self._own_folder = self.dirpath is None

    # --- where: the run folder's checkpoints/, wherever the folder is now ---------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if self._own_folder:  # not a logger's sub-folder, nor a path saved in a config
            self.dirpath = os.path.join(os.path.abspath(trainer.default_root_dir), "checkpoints")
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath:
            remove_stale_partials(self.dirpath)  # a write killed mid-way (kill -9, power)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """A run folder that was copied or moved: the checkpoints it knows (best, top-k, last)
        are the files of the same names in this folder, never those of the folder it came from
        (which a new best would otherwise delete)."""
        saved = state_dict.get("dirpath")
        if saved and self.dirpath and os.path.abspath(saved) != os.path.abspath(self.dirpath):
            state_dict = moved_paths(state_dict, saved, self.dirpath)
        super().load_state_dict(state_dict)

    # --- last.ckpt at every epoch end ----------------------------------------------------------
    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_saved_at = trainer.global_step

    def _refresh_last(self, trainer) -> None:
        if not self.save_last or self._last_saved_at == trainer.global_step:
            return
        if (
            trainer.sanity_checking
            or trainer.state.fn != TrainerFn.FITTING
            or bool(trainer.fast_dev_run)
        ):
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):  # Lightning saves here, not below
            self._refresh_last(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._refresh_last(trainer)  # epochs without validation

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        self._refresh_last(trainer)  # a clean stop inside an epoch (max_steps, should_stop)

    # --- RNG states ------------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: Dict[str, Any]) -> None:
        checkpoint[self.RNG_KEY] = _gather_objects(trainer, collect_rng_states())

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: Dict[str, Any]) -> None:
        self._rng_to_restore = checkpoint.get(self.RNG_KEY)
        if trainer.state.fn == TrainerFn.FITTING:
            say(resume_summary(checkpoint, trainer.ckpt_path))

    def on_train_start(self, trainer, pl_module) -> None:
        states, self._rng_to_restore = self._rng_to_restore, None
        if not states:
            return
        if len(states) != trainer.world_size:
            rank_zero_warn(
                f"resume: the checkpoint holds the RNG states of {len(states)} "
                f"process(es), this run has {trainer.world_size}; random draws will "
                f"differ from a run that never stopped"
            )
            return
        set_rng_states(states[trainer.global_rank])


def moved_paths(state: Dict[str, Any], old: str, new: str) -> Dict[str, Any]:
    """ModelCheckpoint's state with every file under folder ``old`` moved to folder ``new``;
    files elsewhere are forgotten."""

    def move(path):
        if not path:
            return path
        inside = os.path.dirname(os.path.abspath(path)) == os.path.abspath(old)
        return os.path.join(new, os.path.basename(path)) if inside else ""

    state = dict(state, dirpath=new)
    for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
        if key in state:
            state[key] = move(state[key])
    if "best_k_models" in state:
        state["best_k_models"] = {move(p): v for p, v in state["best_k_models"].items() if move(p)}
    return state


def resume_summary(checkpoint: Dict[str, Any], path) -> str:
    """One line: where a resumed run goes on and what the checkpoint restores."""
    epoch, step = checkpoint.get("epoch", 0), checkpoint.get("global_step", 0)
    loops = checkpoint.get("loops", {}).get("fit_loop", {})
    done = loops.get("epoch_progress", {}).get("current", {}).get("processed", epoch + 1)
    parts = ["weights"]
    optimizers = checkpoint.get("optimizer_states") or []
    if optimizers:
        groups = sum(len(o.get("param_groups", [])) for o in optimizers)
        parts.append(f"optimizer ({groups} parameter groups)")
    if checkpoint.get("lr_schedulers"):
        parts.append("lr scheduler")
    names = sorted(
        {key.split("{")[0] for key, state in checkpoint.get("callbacks", {}).items() if state}
    )
    names = [n for n in names if not n.endswith("Checkpoint")]
    if names:
        parts.append("callback state of " + ", ".join(names))
    if checkpoint.get(RunCheckpoint.RNG_KEY):
        parts.append("RNG states")
    return f"resumed at epoch {done}, step {step} from {path}: restores " + ", ".join(parts)
