"""Text files written whole or not at all: a temporary file in the same folder, then
``os.replace`` (atomic on POSIX), the temporary removed if anything fails."""

from __future__ import annotations

import os


def write_text_atomic(path: str, text: str) -> str:
    """``text`` to ``path``; a reader sees the old file or the new one, never half of one."""
    tmp = f"{path}.{os.getpid()}.partial"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
