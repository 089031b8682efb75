"""Units of the multi-run jobs (``make mlrc``, ``python -m dml.tune``, ``make table``).

A unit is one ``python -m dml fit``. Two rules keep a job's table honest:
- a finished unit is reused only when its **fingerprint** is the same: a hash of the fit
  arguments (less the output folder), the text of every file they name (config files, groups
  given as files), and the data set's
  files (names and sizes down to two folder levels under its root: the metadata and split
  files of the benchmarks, Omniglot's archives);
- a unit that fails (NaN, a crash, a bad config) is **recorded** with the last line it printed
  to standard error, and the job goes on; the table marks it.

A unit is run by ``dml.child_runs.launch``: while it trains, its standard output (the run
folder, the per-epoch lines, the summary) is passed through, each line prefixed by the unit's
label; its standard error goes to ``unit.log`` in its folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import List, Optional, Sequence

OUTPUT_KEYS = ("--trainer.default_root_dir",)


def files_of(args: Sequence[str]) -> List[str]:
    """Every argument value that names a file: ``--config F``, ``--config=F``, a group given
    as a file (``--model.optimizer opt.yaml``), a tuned config."""
    out = []
    for arg in args:
        value = arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg
        if not value.startswith("--") and os.path.isfile(value):
            out.append(value)
    return out


def data_root_of(args: Sequence[str]) -> Optional[str]:
    """``data.init_args.root`` as the arguments set it: the last config file or flag wins."""
    import yaml

    root = None
    for i, arg in enumerate(args):
        key, value = (
            arg.split("=", 1)
            if arg.startswith("--") and "=" in arg
            else (arg, args[i + 1] if i + 1 < len(args) else None)
        )
        if key in ("--config", "-c") and value and os.path.isfile(value):
            try:
                with open(value) as f:
                    content = yaml.safe_load(f) or {}
            except (OSError, yaml.YAMLError):
                continue
            found = (
                ((content.get("data") or {}).get("init_args") or {}).get("root")
                if isinstance(content, dict)
                else None
            )
            root = found or root
        elif key == "--data.init_args.root" and value:
            root = value
    return root


def data_fingerprint(root: Optional[str], depth: int = 2) -> List[List]:
    """[relative path, size] of the files under ``root`` down to ``depth`` folder levels."""
    if not root or not os.path.isdir(root):
        return []
    out = []
    root = os.path.abspath(root)
    for base, folders, files in os.walk(root):
        level = os.path.relpath(base, root).count(os.sep) + (base != root)
        if level >= depth:
            folders[:] = []
        folders.sort()
        for name in sorted(files):
            path = os.path.join(base, name)
            out.append([os.path.relpath(path, root), os.path.getsize(path)])
    return out


def fingerprint(args: Sequence[str]) -> str:
    """The hash of what a unit trains (the module docstring): 16 hex digits."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in OUTPUT_KEYS:
            skip = True
            continue
        kept.append(arg)
    files = {}
    for path in files_of(args):
        try:
            with open(path, "rb") as f:
                files[path] = hashlib.sha256(f.read()).hexdigest()
        except OSError:
            files[path] = None
    content = {"args": kept, "configs": files, "data": data_fingerprint(data_root_of(args))}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]
