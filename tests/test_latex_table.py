"""The LaTeX tables beside table.md (dml.latex_table): escaping, the bold best of each column,
the commit and command in the comment, the same numbers as the Markdown, a well-formed tabular,
and both commands writing the .tex."""

import json
import os
import re
import shutil
import subprocess

import pytest

from dml import latex_table, mlrc, reproduce

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUMBER = re.compile(r"^(?:\\textbf\{)?(-?\d+\.\d)\}?(?: \$\\pm\$ (\d+\.\d))?$")


def git(*args):
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")
    return subprocess.run(
        ["git", *args], cwd=REPO, env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


def split_cells(line):
    """The cells of one ``a & b \\\\`` row (an escaped ``\\&`` is no separator)."""
    assert line.endswith(r" \\"), line
    return [c.strip() for c in re.split(r"(?<!\\)&", line[:-3])]


def tex_rows(tex):
    """(header, rows) of the tabular between \\toprule and \\bottomrule, as cell texts."""
    lines = tex.splitlines()
    body = lines[lines.index(r"\toprule") + 1 : lines.index(r"\bottomrule")]
    assert body[1] == r"\midrule"
    return split_cells(body[0]), [split_cells(line) for line in body[2:]]


def tex_number(cell):
    """(mean, spread or None, bold) of a numeric LaTeX cell, None for a text cell."""
    found = NUMBER.match(cell)
    if not found:
        return None
    spread = float(found.group(2)) if found.group(2) else None
    return float(found.group(1)), spread, cell.startswith(r"\textbf{")


def md_rows(text):
    """(header, rows) of the Markdown table, as cell texts."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    split = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return split[0], split[1:]


def md_number(cell):
    found = re.fullmatch(r"(-?\d+\.\d)(?: \+- (\d+\.\d))?", cell)
    if not found:
        return None
    return float(found.group(1)), float(found.group(2)) if found.group(2) else None


def brace_depths(tex):
    """The brace depth after each line, control sequences (``\\{``, ``\\textbf``) skipped."""
    depth, depths, i = 0, [], 0
    while i < len(tex):
        c = tex[i]
        if c == "\\":
            i += 1
            if i < len(tex) and tex[i].isalpha():
                while i < len(tex) and tex[i].isalpha():
                    i += 1
                continue
        elif c == "%" and (i == 0 or tex[i - 1] == "\n"):  # a comment line
            i = tex.index("\n", i)
            continue
        elif c in "{}":
            depth += 1 if c == "{" else -1
            assert depth >= 0, tex[: i + 1]
        elif c == "\n":
            depths.append(depth)
        i += 1
    return depth, depths


def mlrc_line(method, seed, base, failed=None, dims=(128, 512)):
    """One line of mlrc/runs.jsonl as ``dml.mlrc.main`` writes it (metrics as fractions)."""
    if failed:
        return {"method": method, "seed": seed, "dataset": "ds", "failed": [failed]}
    separated = [
        {
            "P@1": base + 0.01 * k,
            "R@1": base + 0.01 * k,
            "R-Precision": base / 2 + 0.003 * k,
            "MAP@R": base / 3 - 0.002 * k,
        }
        for k in range(4)
    ]
    concatenated = {
        "P@1": base + 0.05,
        "R-Precision": base / 2 + 0.02,
        "MAP@R": base / 3,
        "R@1": base + 0.05,
        "R@2": base + 0.1,
    }
    return {
        "method": method,
        "seed": seed,
        "dataset": "ds",
        "separated": separated,
        "concatenated": concatenated,
        "dims": {"separated": dims[0], "concatenated": dims[1]},
    }


LINES = [
    mlrc_line("gsp_contrastive", 0, 0.60),
    mlrc_line("gsp_contrastive", 1, 0.64),
    mlrc_line("C2 & 50% of #proxies", 0, 0.7123),
    mlrc_line("xbm", 0, 0.30),
    mlrc_line("xbm", 1, 0.0, failed="fold 2: NaN loss"),
    mlrc_line("ibc", 0, 0.0, failed="fold 0: out of memory"),
]


def test_every_special_character_is_escaped_once():
    assert latex_table.escape("a_b & c% #1 $x$ {y} ~z ^w \\v <t>") == (
        r"a\_b \& c\% \#1 \$x\$ \{y\} \textasciitilde{}z \textasciicircum{}w "
        r"\textbackslash{}v \textless{}t\textgreater{}"
    )
    assert latex_table.escape("\\{}") == r"\textbackslash{}\{\}"  # never escaped twice
    assert (
        latex_table.escape("GSP + zero-shot (contrastive), 4 x 4")
        == "GSP + zero-shot (contrastive), 4 x 4"
    )
    tex = latex_table.tabular(
        ["method", "R@1"], [["my_method & 100%", (1.0, 0.5)]], "a_b", "cmd", commit="abc"
    )
    assert r"my\_method \& 100\% & \textbf{1.0} $\pm$ 0.5 \\" in tex
    assert r"\caption{a\_b}" in tex


def test_bold_is_the_column_best_with_ties_and_failed_rows():
    header = ["method", "A", "B", "C", "notes"]
    rows = [
        ["m1", (70.04, 1.0), (10.0, None), "-", "3"],
        ["m2", (69.96, 2.0), (30.0, 0.1), "-", "2"],  # 70.0 printed: tied with m1
        ["m3", (50.0, 0.0), (29.99, 0.2), "-", "1"],  # 30.0 printed: tied with m2
        ["m4", "failed", "failed", "-", "0 (seed 0 failed)"],
        ["m5", (10.0, 3.0), "-", "-", "3"],
    ]
    _, got = tex_rows(latex_table.tabular(header, rows, "c", "cmd", commit="abc"))
    parsed = [[tex_number(c) for c in row[1:]] for row in got]
    for j in range(len(header) - 1):
        means = [cell[0] for cell in (row[j] for row in parsed) if cell is not None]
        top = max(means, default=None)  # the column's best, computed here
        bold = [cell is not None and cell[2] for cell in (row[j] for row in parsed)]
        assert bold == [cell is not None and cell[0] == top for cell in (r[j] for r in parsed)]
    assert [r[1] for r in got] == [
        r"\textbf{70.0} $\pm$ 1.0",
        r"\textbf{70.0} $\pm$ 2.0",
        r"50.0 $\pm$ 0.0",
        "failed",
        r"10.0 $\pm$ 3.0",
    ]
    assert [r[2] for r in got] == [
        "10.0",
        r"\textbf{30.0} $\pm$ 0.1",
        r"\textbf{30.0} $\pm$ 0.2",
        "failed",
        "--",
    ]
    assert "textbf" not in "".join(r[3] + r[4] for r in got)  # no number: no bold


def test_the_comment_holds_the_commit_of_the_checkout_and_the_command(tmp_path, monkeypatch):
    command = "python -m dml.mlrc --dataset ds --method 'a b'"
    tex = mlrc.latex(LINES, "ds", command)
    comments = [line for line in tex.splitlines() if line.startswith("%")]
    head = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    assert comments[0] == f"% Commit: {head}" + (" (dirty)" if dirty else "")
    assert comments[1] == f"% Made by: {command}"
    assert "% Failed runs:" in comments and any("fold 2: NaN loss" in c for c in comments)
    assert tex.index(comments[-1]) < tex.index(r"\begin{table}")  # the block is on top
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert latex_table.git_commit(str(tmp_path)) == "unknown"  # outside a checkout
    # a line break in the command stays inside the comment
    tex = latex_table.tabular(["m"], [["a"]], "c", "python -m x 'a\nb'", commit="abc")
    assert "% b'" in tex.splitlines()


def test_the_tex_numbers_are_the_markdown_numbers():
    md_head, md_body = md_rows(mlrc.table(LINES, "ds"))
    tex_head, tex_body = tex_rows(mlrc.latex(LINES, "ds", "cmd", commit="abc"))
    assert [latex_table.escape(h) for h in md_head] == tex_head
    assert [latex_table.escape(r[0]) for r in md_body] == [r[0] for r in tex_body]
    assert len(md_body) == 4 and md_body[-1][1] == "failed"
    numbers = 0
    for md_row, tex_row in zip(md_body, tex_body):
        for md_cell, tex_cell in zip(md_row[1:], tex_row[1:]):
            md, tex = md_number(md_cell), tex_number(tex_cell)
            if md is None:
                assert tex is None and tex_cell in (latex_table.escape(md_cell), "--")
            else:
                numbers += 1
                assert tex[:2] == md, (md_cell, tex_cell)
    assert numbers == 3 * 8  # three scored methods: 3 separated, 5 concatenated
    # and for make table (dml.reproduce) on its fake runs
    rows = [
        {"variant": "A_1", "seed": s, "metrics": {"R@1": 0.5 + 0.1 * s, "MAP@R": 0.2, "NMI": 0.6}}
        for s in range(3)
    ]
    rows.append({"variant": "B", "seed": 0, "failed": "boom", "metrics": {}})
    table = reproduce.aggregate(rows, list(reproduce.GRID))
    md_head, md_body = md_rows(reproduce.markdown(table, "t", "cmd"))
    _, tex_body = tex_rows(reproduce.latex(table, "t", "cmd", commit="abc"))
    parsed = [[md_number(c) for c in r[1:]] for r in md_body]
    assert parsed[0][:3] == [(60.0, 10.0), (20.0, 0.0), (60.0, 0.0)]
    assert parsed == [[(lambda t: t and t[:2])(tex_number(c)) for c in r[1:]] for r in tex_body]


def test_the_tabular_is_well_formed():
    for tex in (
        mlrc.latex(LINES, "my_ds", "python -m dml.mlrc --name 'a {b}'"),
        mlrc.latex([], "ds", "cmd", commit="abc"),
        latex_table.tabular(["m", "x"], [["\\{", "}"]], "{", "}", commit="{"),
    ):
        depth, depths = brace_depths(tex)
        assert depth == 0 and set(depths) == {0}  # balanced, on every line
        assert tex.count(r"\begin{table}") == tex.count(r"\end{table}") == 1
        assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") == 1
        header, body = tex_rows(tex)
        spec = re.search(r"\\begin\{tabular\}\{([lc]+)\}", tex).group(1)
        assert len(spec) == len(header) and all(len(row) == len(header) for row in body)
    with pytest.raises(ValueError, match="one cell per header column"):
        latex_table.tabular(["m", "x"], [["a"]], "c", "cmd", commit="abc")


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="no pdflatex on this machine")
def test_pdflatex_compiles_it(tmp_path):
    table = tmp_path / "table.tex"
    table.write_text(mlrc.latex(LINES, "my_ds", "python -m dml.mlrc --name 'a {b}'"))
    (tmp_path / "doc.tex").write_text(
        "\\documentclass{article}\n\\usepackage{booktabs}\n"
        "\\begin{document}\n\\input{table.tex}\n\\end{document}\n"
    )
    out = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout[-3000:]


def test_both_commands_write_the_tex_beside_the_markdown(tmp_path, monkeypatch, capsys):
    def fake_run(args):
        seed = int(args[args.index("--seed_everything") + 1])
        return {"R@1": 0.5 + 0.1 * seed, "MAP@R": 0.2, "NMI": 0.6}, None

    monkeypatch.setattr(reproduce, "run_once", fake_run)
    argv = [
        "--dataset",
        "synthetic",
        "--seeds",
        "0",
        "1",
        "--out",
        str(tmp_path),
        "--variants",
        "IBC",
        "C2-CCP",
    ]
    reproduce.main(argv)
    tex = (tmp_path / "synthetic" / "table.tex").read_text()
    assert f"% Made by: python -m dml.reproduce {' '.join(argv)}" in tex
    assert f"LaTeX table: {tmp_path / 'synthetic' / 'table.tex'}" in capsys.readouterr().out
    assert r"\textbf{55.0} $\pm$ 7.1" in tex
    assert not list(tmp_path.glob("**/*.partial"))

    # dml.mlrc.main with its training and evaluation replaced: the table of runs.jsonl
    checkpoint = tmp_path / "best.ckpt"
    checkpoint.write_text("")
    monkeypatch.setattr(
        mlrc,
        "train_fold",
        lambda args, folder, label: {
            "status": "done",
            "checkpoint": str(checkpoint),
            "seconds": 1.0,
        },
    )
    from dml.inference import embedder

    monkeypatch.setattr(embedder, "read_checkpoint", lambda path: {})
    monkeypatch.setattr(embedder, "data_class_and_args", lambda ckpt: (object, {}))
    result = {k: LINES[0][k] for k in ("separated", "concatenated", "dims")}
    monkeypatch.setattr(
        mlrc, "evaluate", lambda checkpoints, root, ks: json.loads(json.dumps(result))
    )
    argv = [
        "--dataset",
        "synthetic",
        "--method",
        "baseline",
        "--out",
        str(tmp_path),
        "--runs",
        str(tmp_path / "runs"),
    ]
    text = mlrc.main(argv)
    base = tmp_path / "synthetic" / "mlrc"
    assert (base / "table.md").read_text() == text
    tex = (base / "table.tex").read_text()
    assert f"% Made by: python -m dml.mlrc {' '.join(argv)}" in tex
    assert f"LaTeX table: {base / 'table.tex'}" in capsys.readouterr().out
    assert r"baseline & 1 & 128 / 512 & \textbf{61.5} $\pm$ 2.1" in tex
