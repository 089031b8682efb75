"""MkDocs hook: every documentation page the repository cites must exist.

Docstrings, config comments, notebooks and Markdown files cite the documentation by its path
in the repository, e.g. ``(docs/methods/gsp.md)``, ``docs/evaluation.md#definitions`` or
``(docs/evaluation.md, "Definitions")``. On every build this hook scans the ``.py``, ``.yaml``,
``.md`` and ``.ipynb`` files under ``SCAN`` and logs a WARNING for

- a cited page that is not in ``docs/``;
- an anchor (``#slug``) or a quoted section name right after the path that is not a heading
  of that page;
- any mention of the notes file the documentation replaced (``NOTES_FILE``), which is not part
  of the repository.

The warnings go through ``mkdocs.plugins.check_citations``, so ``mkdocs build --strict`` fails
on them. ``find_problems`` is the scan itself, usable without MkDocs (tests/test_docs.py).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Set

log = logging.getLogger("mkdocs.plugins.check_citations")

# What is scanned, relative to the repository root: folders (recursively) and single files.
SCAN: Sequence[str] = (
    "dml",
    "experiments",
    "benchmarks",
    "examples",
    "notebooks",
    "docs",
    "README.md",
)
EXTENSIONS = (".py", ".yaml", ".yml", ".md", ".ipynb")
SKIP_DIRS = {"__pycache__", ".ipynb_checkpoints", ".git", ".venv", "site"}
# The notes file this documentation replaced: never to be cited. Spelled in two pieces so that
# this file does not mention it.
NOTES_FILE = "METHODS" + ".md"

# docs/<page>.md, then optionally #anchor, then optionally , "Section" (quotes may be escaped
# as \" inside a notebook's JSON).
CITATION = re.compile(
    r"(?<![\w./-])docs/(?P<page>(?:[\w-]+/)*[\w-]+\.md)"
    r"(?:#(?P<anchor>[\w-]+))?"
    r"(?:,\s*\\?\"(?P<section>[^\"\\\n]+)\\?\")?"
)
HEADING = re.compile(r"^(#{1,6})\s+(?P<text>.+?)\s*#*\s*$")
HEADING_ID = re.compile(r"\{\s*#(?P<id>[\w-]+)[^}]*\}\s*$")


class Problem(NamedTuple):
    path: str  # relative to the repository root
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


def slugify(text: str) -> str:
    """The anchor MkDocs gives a heading (Python-Markdown's toc slugify)."""
    try:
        from markdown.extensions.toc import slugify as toc_slugify

        return toc_slugify(text, "-")
    except ImportError:  # the same rule, for a scan without Markdown installed
        import unicodedata

        text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
        text = re.sub(r"[^\w\s-]", "", text).strip().lower()
        return re.sub(r"[-\s]+", "-", text)


def plain(heading: str) -> str:
    """A heading's text as a reader sees it: no attribute list, no code or emphasis marks."""
    heading = HEADING_ID.sub("", heading)
    return re.sub(r"[`*_]", "", heading).strip()


def headings(page: str) -> Dict[str, Set[str]]:
    """{"texts": lower-cased heading texts, "anchors": their anchors} of a Markdown page,
    fenced code blocks left out."""
    texts, anchors = set(), set()
    fenced = False
    with open(page, encoding="utf-8") as f:
        for line in f:
            if line.lstrip().startswith(("```", "~~~")):
                fenced = not fenced
                continue
            match = None if fenced else HEADING.match(line)
            if match:
                text = match.group("text")
                explicit = HEADING_ID.search(text)
                texts.add(plain(text).lower())
                anchors.add(explicit.group("id") if explicit else slugify(plain(text)))
    return {"texts": texts, "anchors": anchors}


def scanned_files(root: str, scan: Sequence[str] = SCAN) -> Iterator[str]:
    """The files to scan under ``root``, sorted, this hook excluded."""
    me = os.path.realpath(__file__)
    for entry in scan:
        path = os.path.join(root, entry)
        if os.path.isfile(path):
            candidates = [path]
        elif os.path.isdir(path):
            candidates = []
            for folder, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
                candidates += [os.path.join(folder, f) for f in sorted(files)]
        else:
            continue
        for candidate in candidates:
            if candidate.endswith(EXTENSIONS) and os.path.realpath(candidate) != me:
                yield candidate


def find_problems(
    root: str, docs_dir: Optional[str] = None, scan: Sequence[str] = SCAN
) -> List[Problem]:
    """Every citation of a missing page, anchor or section, and every mention of the notes
    file, in the files under ``root`` (``docs_dir``: where cited pages live, default
    ``root/docs``)."""
    docs_dir = docs_dir or os.path.join(root, "docs")
    cache: Dict[str, Optional[Dict[str, Set[str]]]] = {}
    problems: List[Problem] = []
    for path in scanned_files(root, scan):
        rel = os.path.relpath(path, root)
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (UnicodeDecodeError, OSError):
            continue
        for number, line in enumerate(lines, start=1):
            if NOTES_FILE in line:
                problems.append(
                    Problem(
                        rel,
                        number,
                        f"mentions {NOTES_FILE}, which is not part "
                        f"of the repository; cite a page of docs/",
                    )
                )
            for match in CITATION.finditer(line):
                page = match.group("page")
                if page not in cache:
                    full = os.path.join(docs_dir, page)
                    cache[page] = headings(full) if os.path.isfile(full) else None
                found = cache[page]
                if found is None:
                    problems.append(
                        Problem(rel, number, f"cites docs/{page}, which does not exist")
                    )
                    continue
                anchor, section = match.group("anchor"), match.group("section")
                if anchor and anchor not in found["anchors"]:
                    problems.append(
                        Problem(
                            rel, number, f"cites docs/{page}#{anchor}: no such heading on that page"
                        )
                    )
                if section and plain(section).lower() not in found["texts"]:
                    problems.append(
                        Problem(
                            rel,
                            number,
                            f'cites docs/{page}, "{section}": no such heading on that page',
                        )
                    )
    return problems


def on_pre_build(config, **kwargs) -> None:
    """MkDocs event: scan the repository that holds mkdocs.yml, a WARNING per problem."""
    root = os.path.dirname(os.path.abspath(config.config_file_path))
    for problem in find_problems(root, config.docs_dir):
        log.warning(f"check_citations: {problem}")
