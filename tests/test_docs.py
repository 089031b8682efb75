"""The documentation builds strictly, and a citation of a missing page fails it.

``mkdocs build --strict`` turns every warning into a failure: a broken link between pages, a
docstring mkdocstrings cannot render, and what ``docs/hooks/check_citations.py`` reports (a
docstring, config comment or page citing a ``docs/`` page, anchor or heading that does not
exist, or the notes file the documentation replaced).
"""

import importlib.util
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOOK = os.path.join(REPO, "docs", "hooks", "check_citations.py")


def load_hook():
    spec = importlib.util.spec_from_file_location("check_citations", HOOK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_documentation_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "site" / "methods" / "gsp" / "index.html").is_file()
    assert (tmp_path / "site" / "reference" / "losses" / "index.html").is_file()


def test_the_repository_cites_only_pages_that_exist():
    problems = load_hook().find_problems(REPO)
    assert not problems, "\n".join(map(str, problems))


def test_missing_pages_headings_and_the_old_notes_file_are_reported(tmp_path):
    hook = load_hook()
    (tmp_path / "docs" / "methods").mkdir(parents=True)
    (tmp_path / "docs" / "methods" / "gsp.md").write_text(
        "# GSP\n\n## Zero-shot prototype loss\n\n```\n## not a heading\n```\n"
    )
    (tmp_path / "dml").mkdir()
    notes = "METHODS" + ".md"  # spelled in two pieces: this file is no citation itself
    (tmp_path / "dml" / "cites.py").write_text(
        '"""A module (docs/no_such_page.md) and its notes (%s, "GSP").\n'
        'Fine: docs/methods/gsp.md, (docs/methods/gsp.md, "Zero-shot prototype loss"),\n'
        "docs/methods/gsp.md#zero-shot-prototype-loss.\n"
        'Broken: (docs/methods/gsp.md, "No such section"), docs/methods/gsp.md#nowhere,\n'
        '(docs/methods/gsp.md, "not a heading").\n"""\n' % notes
    )
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "x.yaml").write_text("# settings (docs/missing/page.md)\n")
    (tmp_path / "elsewhere").mkdir()  # not scanned
    (tmp_path / "elsewhere" / "y.py").write_text("# docs/no_such_page.md\n")

    problems = hook.find_problems(str(tmp_path))
    found = {(p.path, p.line, p.message) for p in problems}
    cites = os.path.join("dml", "cites.py")
    assert (cites, 1, "cites docs/no_such_page.md, which does not exist") in found
    assert any(p.path == cites and p.line == 1 and notes in p.message for p in problems)
    assert any(p.line == 4 and '"No such section": no such heading' in p.message for p in problems)
    assert any(p.line == 4 and "#nowhere: no such heading" in p.message for p in problems)
    assert any(p.line == 5 and '"not a heading"' in p.message for p in problems)
    assert (
        os.path.join("experiments", "x.yaml"),
        1,
        "cites docs/missing/page.md, which does not exist",
    ) in found
    assert not any(p.line in (2, 3) and p.path == cites for p in problems)
    assert not any(p.path.startswith("elsewhere") for p in problems)
    assert len(problems) == 6, "\n".join(map(str, problems))


def test_the_hook_makes_a_strict_build_fail(tmp_path):
    pytest.importorskip("mkdocs")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text("# Home\n")
    (tmp_path / "dml").mkdir()
    (tmp_path / "dml" / "m.py").write_text('"""See docs/no_such_page.md."""\n')
    (tmp_path / "mkdocs.yml").write_text(f"site_name: t\nhooks:\n  - {HOOK}\n")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0, out.stdout + out.stderr
    assert "dml/m.py:1: cites docs/no_such_page.md" in out.stdout + out.stderr
