"""Run folders and resume checks for the command line.

Every run gets a folder of its own under the runs root (``trainer.default_root_dir``, ``runs``):
``runs/<YYYYmmdd-HHMMSS>-<name>-<random>``, created with an exclusive ``mkdir``, so that no
concurrent run can take it. It holds everything the run writes:

    config.yaml          the composed configuration (earlier ones kept as config.<k>.yaml on resume)
    run.json             command line, host, process id, git commit, start time, resumes
    metrics.csv          every logged value (CSV logger)
    checkpoints/         best-epoch=NNN.ckpt (by val/MAP@R) and last.ckpt (every epoch)
    figures/             dashboard PNGs
    wandb/               the W&B run files
    .lock                held (flock) by the process that trains in the folder

Processes of one DDP run share the folder: the launching process exports it (``DML_RUN_DIR``)
to the processes Lightning starts. A cluster launcher that starts every process itself
(torchrun, SLURM) should set ``DML_RUN_DIR`` for all of them.

Resuming (``--ckpt_path <run>/checkpoints/last.ckpt``) continues in the checkpoint's run folder,
wherever that folder is now (a copied or moved folder writes only into itself), and only while
no other process trains in it.
The configuration saved in the checkpoint is compared with the one given: a difference in the
model, the data, a method's callback (``xbn``, ``ccp``) or the seed is an error naming the
keys, unless ``--resume_changes`` lists them; trainer and dashboard settings may change freely
(the number of epochs, devices, loggers).
"""

from __future__ import annotations

import fnmatch
import json
import os
import secrets
import socket
import sys
import time
from typing import Any, Dict, Iterable, List, Optional

from dml.errors import ConfigError

RUN_FILE = "run.json"
ENV_DIR, ENV_OWNER = "DML_RUN_DIR", "DML_RUN_DIR_OWNER"

# Settings a resumed run must share with its checkpoint, unless --resume_changes names them.
PROTECTED = ("model.", "data.", "xbn.", "ccp.", "seed_everything")
# Inside those, settings that do not change what is trained.
HARMLESS = (
    "data.init_args.root",
    "data.init_args.num_workers",
    "data.init_args.verify",
    "data.init_args.eval_batch_size",
    "model.evaluation.backend",
    "model.compile",
    "model.backbone.channels_last",
    "data.init_args.decode",
    "model.diagnostics",
)


def is_run_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, RUN_FILE))


def runs_root(default_root_dir: Optional[str]) -> str:
    """The folder that holds run folders; a run folder given as root means its parent."""
    root = default_root_dir or "runs"
    return os.path.dirname(os.path.abspath(root)) if is_run_dir(root) else root


def run_folder_of_checkpoint(ckpt_path: Optional[str]) -> Optional[str]:
    """The run folder a checkpoint belongs to (``<run>/checkpoints/x.ckpt``), or None."""
    if not ckpt_path or "://" in str(ckpt_path):
        return None
    folder = os.path.dirname(os.path.dirname(os.path.abspath(ckpt_path)))
    return folder if is_run_dir(folder) else None


def is_checkpoint_folder_of(dirpath: str, run_dir: str, original_name: Optional[str]) -> bool:
    """Whether ``dirpath`` is the ``checkpoints`` folder of this run, under its present path or
    under the name it was created with (a config.yaml written before the folder was copied or
    moved)."""
    path = os.path.abspath(dirpath)
    if os.path.basename(path) != "checkpoints":
        return False
    parent = os.path.dirname(path)
    return parent == os.path.abspath(run_dir) or (
        original_name is not None and os.path.basename(parent) == original_name
    )


def _safe_name(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
    return keep.strip("-.")[:60]


def create_run_dir(root: str, name: Optional[str] = None) -> str:
    """A new folder ``root/<time>-<name>-<random>``; ``mkdir`` fails if it exists, so two runs
    started in the same second still get two folders."""
    os.makedirs(root, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tag = f"-{_safe_name(name)}" if name and _safe_name(name) else ""
    for _ in range(100):
        path = os.path.join(root, f"{stamp}{tag}-{secrets.token_hex(3)}")
        try:
            os.mkdir(path)
            _created.add(os.path.abspath(path))
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a run folder under {root}")


_created: set = set()


def created_here(path: str) -> bool:
    """Whether this process created the run folder (a resumed one is never discarded)."""
    return os.path.abspath(path) in _created


def shared_run_dir() -> Optional[str]:
    """The folder exported to this process by the process that launched it (DDP), or set by
    the user for every process."""
    path = os.environ.get(ENV_DIR)
    if not path:
        return None
    owner = os.environ.get(ENV_OWNER)
    if owner is None or owner == str(os.getppid()):  # set by the user, or by our launcher
        return path
    return None


def export_run_dir(path: str) -> None:
    """Hand the folder to the processes Lightning will launch (they inherit the environment)."""
    os.environ[ENV_DIR] = path
    os.environ[ENV_OWNER] = str(os.getpid())


LOCK_FILE = ".lock"
_held_locks: Dict[str, int] = {}


def lock_run_dir(path: str) -> None:
    """Hold ``<run>/.lock`` (``flock``) while this process trains in the folder: a second
    process that would train in it (two ``make resume`` of one run) stops with one line naming
    the holder. The kernel drops the lock when the process ends, however it ends."""
    import fcntl

    path = os.path.abspath(path)
    if path in _held_locks:
        return
    fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ConfigError(
            f"run folder {path} is in use: {holder} trains in it. Wait for it to "
            f"end or stop it; one process at a time trains in a run folder"
        ) from None
    os.ftruncate(fd, 0)
    os.write(
        fd,
        f"process {os.getpid()} on {socket.gethostname()} since "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode(),
    )
    _held_locks[path] = fd


def unlock_run_dirs() -> None:
    """Let go of the folders this process holds (the file stays: removing it could let two
    processes hold two different lock files of one folder)."""
    while _held_locks:
        _, fd = _held_locks.popitem()
        os.close(fd)


def release_run_dir() -> None:
    """Forget an exported folder once this process's run is over (the next run in the same
    process gets its own), and let go of its lock."""
    unlock_run_dirs()
    if os.environ.get(ENV_OWNER) == str(os.getpid()):
        os.environ.pop(ENV_DIR, None)
        os.environ.pop(ENV_OWNER, None)


def write_run_file(path: str, git: Dict[str, Any], resumed_from: Optional[str] = None) -> None:
    """run.json: how the run was started; each resume is appended."""
    file = os.path.join(path, RUN_FILE)
    entry = {
        "command": [sys.executable] + sys.argv,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "git": git,
    }
    if os.path.isfile(file):
        with open(file) as f:
            record = json.load(f)
    else:
        record = {"run": os.path.basename(os.path.abspath(path)), "started": entry, "resumes": []}
    if resumed_from:
        record.setdefault("resumes", []).append(dict(entry, checkpoint=resumed_from))
    tmp = f"{file}.{os.getpid()}.partial"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, file)


def keep_previous_config(path: str, filename: str = "config.yaml") -> None:
    """Before a resumed run writes its config.yaml, the earlier one becomes config.<k>.yaml."""
    current = os.path.join(path, filename)
    if not os.path.isfile(current):
        return
    stem, ext = os.path.splitext(filename)
    k = 1
    while os.path.exists(os.path.join(path, f"{stem}.{k}{ext}")):
        k += 1
    os.replace(current, os.path.join(path, f"{stem}.{k}{ext}"))


# --- resume: compare configurations ----------------------------------------------------------
def flatten(config: Any, prefix: str = "") -> Dict[str, Any]:
    """Nested dicts to dotted keys; lists and scalars are values."""
    if isinstance(config, dict) and config:
        out: Dict[str, Any] = {}
        for key, value in config.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: None if config == {} else config}  # an empty mapping is "none"


def protected_differences(
    saved: Dict[str, Any],
    current: Dict[str, Any],
    allowed: Iterable[str] = (),
    defaults: Optional[Dict[str, Any]] = None,
) -> List[str]:
    """Keys under PROTECTED whose values differ (or exist on one side only), minus HARMLESS
    ones and those matching an ``allowed`` pattern (fnmatch: ``model.optimizer.*``). A key the
    checkpoint predates (absent from its config, present in ``defaults``) counts at its default:
    the run was trained as the default behaves."""
    allowed = list(allowed)
    a, b = flatten(saved), flatten(current)
    for key, value in flatten(defaults or {}).items():
        # a default of None for a key the checkpoint holds as a mapping (model.terms.<name>.*)
        # is no default for its entries
        if key not in a and not any(k.startswith(key + ".") for k in a):
            a[key] = value
    out = []
    for key in sorted(set(a) | set(b)):
        if not key.startswith(PROTECTED) or key in HARMLESS:
            continue
        if a.get(key, "<absent>") == b.get(key, "<absent>"):
            continue
        if any(fnmatch.fnmatchcase(key, pattern) for pattern in allowed):
            continue
        out.append(key)
    return out


def describe_differences(
    saved: Dict[str, Any], current: Dict[str, Any], keys: List[str], details: int = 6
) -> str:
    """``k1, k2, k3 (k1: 1 in the checkpoint, 2 now; ...)``."""
    a, b = flatten(saved), flatten(current)
    shown = "; ".join(
        f"{k}: {a.get(k, '<absent>')!r} in the checkpoint, {b.get(k, '<absent>')!r} now"
        for k in keys[:details]
    )
    more = "; ..." if len(keys) > details else ""
    return f"{', '.join(keys)} ({shown}{more})"


def check_resume(
    saved: Optional[Dict[str, Any]],
    current: Dict[str, Any],
    ckpt_path: str,
    allowed: Iterable[str],
    defaults: Optional[Dict[str, Any]] = None,
) -> None:
    """ConfigError naming the protected keys that differ from the checkpoint's config."""
    if saved is None:
        return
    keys = protected_differences(saved, current, allowed, defaults)
    if keys:
        raise ConfigError(
            f"resume from {ckpt_path}: the config differs from the checkpoint's in "
            f"{describe_differences(saved, current, keys)}. Resuming with it would drop or "
            f"misread the saved state. Resume with the run's own config (make resume RUN=...), "
            f"or allow intended changes with --resume_changes {','.join(keys[:3])}"
            f"{',...' if len(keys) > 3 else ''}"
        )
