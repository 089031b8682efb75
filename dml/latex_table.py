"""A results table as LaTeX: a ``table`` float holding a booktabs ``tabular``.

The ``.tex`` beside ``table.md`` of ``make table`` (``dml.reproduce``) and ``make mlrc``
(``dml.mlrc``): the same cells, ``mean $\\pm$ spread`` in % with one decimal, the best mean of
each column in bold (higher is better), method names escaped, and a ``%`` comment block on top
with the git commit and the command that made it. Needs ``\\usepackage{booktabs}``.

A cell is a number, ``(mean, spread or None)``, or a text (a count, a ``-`` for a missing
value, ``failed``); the first cell of a row is its name.
"""

from __future__ import annotations

import math
import os
import subprocess
from typing import Iterable, List, Optional, Sequence, Tuple, Union

Cell = Union[Tuple[float, Optional[float]], str]
MISSING = "-"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIAL = {
    "\\": r"\textbackslash{}",
    "{": r"\{",
    "}": r"\}",
    "_": r"\_",
    "&": r"\&",
    "%": r"\%",
    "#": r"\#",
    "$": r"\$",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
}


def escape(text: str) -> str:
    """``text`` with LaTeX's special characters escaped (one pass: nothing escaped twice)."""
    return "".join(SPECIAL.get(c, c) for c in str(text))


def is_number(cell: Cell) -> bool:
    return isinstance(cell, tuple)


def plain(cell: Cell) -> str:
    """The cell as the Markdown tables write it: ``mean +- spread``, ``mean`` or the text."""
    if not is_number(cell):
        return cell
    mean, spread = cell
    return f"{mean:.1f}" + ("" if spread is None else f" +- {spread:.1f}")


def shown(cell: Cell) -> Optional[float]:
    """The mean as printed (one decimal), None for a text or a non-finite mean."""
    if not is_number(cell) or not math.isfinite(cell[0]):
        return None
    return float(f"{cell[0]:.1f}")


def best(rows: Sequence[Sequence[Cell]], column: int) -> Optional[float]:
    """The highest printed mean of a column, None where it has no number."""
    values = [shown(row[column]) for row in rows]
    return max((v for v in values if v is not None), default=None)


def latex_cell(cell: Cell, bold: bool = False) -> str:
    if not is_number(cell):
        return "--" if cell == MISSING else escape(cell)
    if not math.isfinite(cell[0]):  # a NaN mean is no number either
        return "--"
    mean, spread = cell
    text = f"\\textbf{{{mean:.1f}}}" if bold else f"{mean:.1f}"
    return text + ("" if spread is None else f" $\\pm$ {spread:.1f}")


def git_commit(folder: Optional[str] = None) -> str:
    """``git rev-parse HEAD`` of the checkout holding ``folder`` (default: this package's),
    with " (dirty)" if tracked files have uncommitted changes; "unknown" outside a checkout."""
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")  # a read: never writes the index

    def git(*args):
        return subprocess.run(
            ["git", *args], cwd=folder or REPO, env=env, capture_output=True, text=True, timeout=60
        )

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return "unknown"
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    dirty = status.returncode != 0 or bool(status.stdout.strip())
    return head.stdout.strip() + (" (dirty)" if dirty else "")


def comment(lines: Iterable[str]) -> List[str]:
    """Each line (and each line inside one) behind ``% ``."""
    return [f"% {part}".rstrip() for line in lines for part in str(line).splitlines() or [""]]


def tabular(
    header: Sequence[str],
    rows: Sequence[Sequence[Cell]],
    caption: str,
    command: str,
    commit: Optional[str] = None,
    notes: Sequence[str] = (),
) -> str:
    """The LaTeX of one table: comment block, ``table`` float, caption, booktabs tabular."""
    if any(len(row) != len(header) for row in rows):
        raise ValueError("every row needs one cell per header column")
    tops = [best(rows, j) for j in range(len(header))]
    body = []
    for row in rows:
        cells = [
            latex_cell(c, j > 0 and tops[j] is not None and shown(c) == tops[j])
            for j, c in enumerate(row)
        ]
        body.append(" & ".join(cells) + r" \\")
    head = comment([f"Commit: {commit or git_commit()}", f"Made by: {command}", *notes])
    return (
        "\n".join(
            head
            + [
                r"\begin{table}",
                r"\centering",
                f"\\caption{{{escape(caption)}}}",
                f"\\begin{{tabular}}{{l{'c' * (len(header) - 1)}}}",
                r"\toprule",
                " & ".join(escape(h) for h in header) + r" \\",
                r"\midrule",
                *body,
                r"\bottomrule",
                r"\end{tabular}",
                r"\end{table}",
            ]
        )
        + "\n"
    )


def write_atomic(path: str, text: str) -> None:
    """``text`` to ``path``, never half written (``dml.atomic_files``)."""
    from dml.atomic_files import write_text_atomic

    write_text_atomic(path, text)
