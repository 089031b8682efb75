"""Reading files that may come from anyone: checkpoints and ``.npz`` arrays load as data only.

A checkpoint is read with ``torch.load(weights_only=True)``: tensors, numbers, strings and plain
containers, never a pickled object whose unpickling would call a function. An ``.npz`` is read
with ``np.load(allow_pickle=False)``. Every failure is a ``ConfigError`` of one line naming the
file and what was expected, so the command line prints it without a traceback.
"""

from __future__ import annotations

import json
import os
import pickle
import pickletools
import warnings
import zipfile
from typing import Any, Callable, Dict, Iterable, Optional

import numpy as np
import torch

from dml.errors import ConfigError


def article(noun: str) -> str:
    return "an" if noun[:1].lower() in "aeiou" else "a"


def one_line(error: BaseException, limit: int = 200) -> str:
    """The error's first non-empty line (torch's weights-only message is a page long)."""
    text = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def weights_only_reason(error: BaseException) -> str:
    """The line of torch's weights-only refusal that says why (its other lines are advice)."""
    advice = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reasons = [line for line in lines if not line.startswith(advice)]
    return reasons[0] if reasons else one_line(error)


# Pickle opcodes that import a module attribute or call one: what makes unpickling run code.
CALLING_OPCODES = {"GLOBAL", "STACK_GLOBAL", "REDUCE", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX"}


def imports_callables(path: str, max_pickles: int = 8) -> bool:
    """Whether a raw pickle file (torch's legacy format, several pickles in a row) imports or
    calls anything; read with ``pickletools.genops``, which parses opcodes and runs none."""
    if zipfile.is_zipfile(path):
        return False  # torch's zip format: its weights-only refusal already names the GLOBAL
    with open(path, "rb") as f:
        for _ in range(max_pickles):
            try:  # only a pickle that parses to its STOP counts: not random bytes
                names = {opcode.name for opcode, _, _ in pickletools.genops(f)}
            except Exception:  # noqa: BLE001 - the end of the file, or not a pickle at all
                return False
            if names & CALLING_OPCODES:
                return True
    return False


def load_checkpoint(path: str, what: str = "checkpoint", mmap: bool = False) -> Dict[str, Any]:
    """The dict a checkpoint file holds, loaded as data (``weights_only=True``)."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such {what}")
    try:
        with warnings.catch_warnings():  # torch's note on a raw pickle's protocol: noise here
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            # mmap reads only torch's zip format; a legacy (raw pickle) file is read whole
            checkpoint = torch.load(
                path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path)
            )
    except pickle.UnpicklingError as error:
        reason = weights_only_reason(error)
        if "GLOBAL" in reason or imports_callables(path):  # a class or function to call
            raise ConfigError(
                f"{path}: refused, not loaded: the {what} holds pickled objects "
                f"other than tensors and plain values, and unpickling them could "
                f"run code ({reason[:120]})"
            ) from None
        raise ConfigError(
            f"{path}: not a readable {what} (UnpicklingError: {reason[:160]})"
        ) from None
    except Exception as error:  # noqa: BLE001 - a truncated or foreign file: the same one line
        raise ConfigError(f"{path}: not a readable {what} ({one_line(error)})") from None
    if not isinstance(checkpoint, dict):
        raise ConfigError(
            f"{path}: not {article(what)} {what} (it holds a "
            f"{type(checkpoint).__name__}, expected a dict)"
        )
    return checkpoint


def npz_shapes(path: str, what: str) -> Dict[str, tuple]:
    """Each array's shape in an ``.npz``, from its header alone (nothing is allocated). A
    header whose shape and type claim more or fewer bytes than its member holds is a
    ConfigError: loading it would allocate what the header claims (a 1 KB file claiming
    (10**7, 10**5) asked for 3.6 TiB)."""
    readers = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }
    shapes = {}
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with z.open(info) as member:
                reader = readers.get(np.lib.format.read_magic(member))
                if reader is None:  # another format version: np.load judges it
                    continue
                shape, _, dtype = reader(member)
                held = info.file_size - member.tell()
            name = info.filename[: -len(".npy")]
            claimed = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
            if not dtype.hasobject and claimed != held:
                raise ConfigError(
                    f"{path}: not a readable {what}: its array {name!r} claims shape "
                    f"{tuple(shape)} of {dtype} ({claimed:,} bytes), its file holds {held:,}"
                )
            shapes[name] = tuple(shape)
    return shapes


def load_npz(
    path: str,
    keys: Iterable[str],
    what: str,
    check_shapes: Optional[Callable[[Dict[str, tuple]], None]] = None,
) -> Dict[str, Any]:
    """The named arrays of an ``.npz`` file (``allow_pickle=False``); a string array named
    ``meta`` is parsed as JSON. The headers are read first (``npz_shapes``), and
    ``check_shapes`` may refuse their shapes before any array is inflated."""
    keys = list(keys)
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such {what}")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            single = f.read(6) == b"\x93NUMPY"
        raise ConfigError(
            f"{path}: not {article(what)} {what}: "
            + (
                f"a single .npy array, expected an .npz with {', '.join(keys)}"
                if single
                else "truncated or not an .npz (no zip directory)"
            )
        )
    try:
        shapes = npz_shapes(path, what)
        if check_shapes is not None and all(k in shapes for k in keys):
            check_shapes(shapes)
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in keys if k not in f.files]
            if missing:
                raise ConfigError(
                    f"{path}: not {article(what)} {what}: no array named "
                    f"{', '.join(missing)} (it has {', '.join(f.files) or 'none'})"
                )
            arrays = {k: f[k] for k in keys}
    except ConfigError:
        raise
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise ConfigError(
                f"{path}: refused, not loaded: the {what} holds pickled Python "
                f"objects, and unpickling them could run code"
            ) from None
        raise ConfigError(f"{path}: not a readable {what} ({one_line(error)})") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as error:
        raise ConfigError(
            f"{path}: not a readable {what}: truncated or not an .npz ({one_line(error)})"
        ) from None
    if "meta" in arrays:
        try:
            arrays["meta"] = json.loads(str(arrays["meta"]))
        except ValueError as error:
            raise ConfigError(f"{path}: its meta array is not JSON ({one_line(error)})") from None
        if not isinstance(arrays["meta"], dict):
            raise ConfigError(f"{path}: its meta array is not a JSON object")
    return arrays
