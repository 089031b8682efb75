"""python -m dml compare through the command line: embeddings files, a checkpoint and an MLRC
folder; the printed metrics and differences against dml.metrics and a count written out here;
the files it writes; and one clear line for each bad input."""

import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from run_helpers import train_tiny_checkpoint

from dml.compare.cli import main as compare_main
from dml.inference import EmbeddingSet
from dml.metrics import retrieval_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dml(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "dml", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, WANDB_MODE="disabled"),
    )


def compare(*args):
    """``python -m dml compare ARGS`` in this process (its main, as __main__ calls it)."""
    import contextlib
    import io

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = compare_main([str(a) for a in args])
    return subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())


def rows_of(stdout):
    """{metric: (A, B, B - A, low, high, p)} from the printed table."""
    out = {}
    for line in stdout.splitlines():
        m = re.match(
            r"(R@\d+|MAP@R|R-Precision)\s+([\d.]+)\s+([\d.]+)\s+([+-][\d.]+)\s+"
            r"\[\s*([+-][\d.]+),\s*([+-][\d.]+)\]\s+(?:<= )?([\d.e+-]+)$",
            line.strip(),
        )
        if m:
            out[m.group(1)] = tuple(float(x) for x in m.groups()[1:])
    return out


def embeddings(seed, n_classes=20, per_class=6, spread=0.8, dim=12):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_classes, dim))
    labels = np.repeat(np.arange(n_classes), per_class)
    x = centers[labels] + spread * rng.normal(size=(len(labels), dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def save(path, x, labels, paths=None):
    paths = paths or [f"img{i}.png" for i in range(len(x))]
    EmbeddingSet(x, paths, labels, {"split": "test"}).save(str(path))
    return str(path)


def test_two_embedding_files_print_both_models_and_the_difference(tmp_path):
    xa, y = embeddings(0, spread=1.0)
    xb, _ = embeddings(0, spread=0.6)  # the same classes, tighter: a better model
    a, b = save(tmp_path / "a.npz", xa, y), save(tmp_path / "b.npz", xb, y)
    out = dml("compare", a, b, "--resamples", "2000", "--out", tmp_path / "cmp")
    assert out.returncode == 0, out.stderr
    rows = rows_of(out.stdout)
    ma, mb = retrieval_metrics(xa, y, [1, 2, 4, 8]), retrieval_metrics(xb, y, [1, 2, 4, 8])
    assert set(rows) == set(ma)
    for name, (va, vb, diff, low, high, p) in rows.items():
        assert va == pytest.approx(100 * ma[name], abs=0.051)
        assert vb == pytest.approx(100 * mb[name], abs=0.051)
        assert diff == pytest.approx(100 * (mb[name] - ma[name]), abs=0.0051)
        assert low <= diff <= high and 0 < p <= 1
    assert rows["MAP@R"][2] > 0 and rows["MAP@R"][5] < 0.01  # clearly better, and says so
    assert "2000 resamples, seed 0" in out.stdout and "McNemar (R@1)" in out.stdout
    # the files: json, per-class and per-query CSVs, the page
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert saved["resamples"] == 2000 and saved["queries"] == len(y)
    assert saved["differences"]["R@1"]["difference"] == pytest.approx(mb["R@1"] - ma["R@1"])
    hit_a = first_neighbour_hits(xa, y)
    hit_b = first_neighbour_hits(xb, y)
    assert saved["mcnemar"]["only_a"] == int((hit_a & ~hit_b).sum())
    assert saved["mcnemar"]["only_b"] == int((~hit_a & hit_b).sum())
    with open(tmp_path / "cmp" / "per_class.csv") as f:
        per_class = list(csv.DictReader(f))
    assert [int(r["class"]) for r in per_class] == list(range(20))
    for r in per_class:
        mine = y == int(r["class"])
        assert float(r["A R@1"]) == pytest.approx(hit_a[mine].mean(), abs=1e-6)
        assert float(r["B-A R@1"]) == pytest.approx(
            hit_b[mine].mean() - hit_a[mine].mean(), abs=1e-6
        )
    with open(tmp_path / "cmp" / "queries.csv") as f:
        queries = list(csv.DictReader(f))
    assert len(queries) == len(y)
    assert [int(q["A first relevant rank"]) == 1 for q in queries] == hit_a.tolist()
    page = (tmp_path / "cmp" / "report.html").read_text()
    assert "Queries where A is worst" in page and "disagree most" in page


def first_neighbour_hits(x, y):
    d = ((x[:, None].astype(np.float64) - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return y[np.argsort(d, 1, kind="stable")[:, 0]] == y


def test_by_class_resampling_is_labelled_and_wider(tmp_path):
    xa, y = embeddings(1)
    xb, _ = embeddings(2)
    a, b = save(tmp_path / "a.npz", xa, y), save(tmp_path / "b.npz", xb, y)
    by_query = compare(a, b, "--resamples", "1000")
    by_class = compare(a, b, "--resamples", "1000", "--unit", "class")
    assert by_query.returncode == by_class.returncode == 0, by_class.stderr
    assert "bootstrap over classes" in by_class.stdout
    q, c = rows_of(by_query.stdout)["MAP@R"], rows_of(by_class.stdout)["MAP@R"]
    assert q[:3] == c[:3]  # the same models, the same numbers; only the interval differs
    assert c[4] - c[3] > q[4] - q[3]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return train_tiny_checkpoint(
        tmp_path_factory.mktemp("trained"),
        epochs=1,
        train_classes=12,
        test_classes=10,
        images_per_class=8,
    )


def test_a_checkpoint_and_an_mlrc_folder_against_themselves_differ_by_zero(ckpt, tmp_path):
    out = compare(ckpt, ckpt, "--resamples", "200")
    assert out.returncode == 0, out.stderr
    rows = rows_of(out.stdout)
    assert rows and all(r[2:5] == (0.0, 0.0, 0.0) and r[5] == 1.0 for r in rows.values())
    # an MLRC folder: four fold models (here one checkpoint four times) concatenated
    folder = tmp_path / "mlrc" / "synthetic" / "model"
    for fold in range(4):
        record = folder / "seed0" / f"fold{fold}" / "abc" / "fold.json"
        kept = record.parent / "run" / "checkpoints" / "best-epoch=000.ckpt"
        kept.parent.mkdir(parents=True)
        os.symlink(ckpt, kept)  # the checkpoint inside the folder is the one used
        record.write_text(json.dumps({"status": "done", "checkpoint": "/moved/elsewhere.ckpt"}))
    out = compare(folder, ckpt, "--resamples", "200")
    assert out.returncode == 0, out.stderr
    assert "4 fold models concatenated" in out.stdout
    # one model's embedding concatenated 4 times and normalised is the same ranking
    assert all(r[2] == 0.0 for r in rows_of(out.stdout).values())
    out = compare(folder, ckpt, "--mlrc-seed", "3")
    assert out.returncode == 2 and "--seed 3 has no 4 trained fold models" in out.stderr


def test_the_same_images_in_another_order_are_paired_by_name(tmp_path):
    xa, y = embeddings(5)
    xb, _ = embeddings(5, spread=0.5)
    names = [f"img{i}.png" for i in range(len(y))]
    a, b = save(tmp_path / "a.npz", xa, y, names), save(tmp_path / "b.npz", xb, y, names)
    flipped = save(tmp_path / "flipped.npz", xb[::-1].copy(), y[::-1].copy(), names[::-1])
    straight, reordered = (
        compare(a, b, "--resamples", "500"),
        compare(a, flipped, "--resamples", "500"),
    )
    assert straight.returncode == reordered.returncode == 0, reordered.stderr
    assert rows_of(straight.stdout) == rows_of(reordered.stdout)


def test_ks_without_1_still_give_r_at_1_for_mcnemar_and_the_class_means(tmp_path):
    x, y = embeddings(6)
    a = save(tmp_path / "a.npz", x, y)
    out = compare(a, a, "--ks", "2", "4", "--resamples", "100")
    assert out.returncode == 0, out.stderr
    assert set(rows_of(out.stdout)) == {"R@1", "R@2", "R@4", "MAP@R", "R-Precision"}


def test_bad_inputs_are_one_line_each(tmp_path):
    x, y = embeddings(3)
    good = save(tmp_path / "good.npz", x, y)
    other = save(tmp_path / "other.npz", x, y, [f"other{i}.png" for i in range(len(x))])
    unlabelled = save(tmp_path / "unlabelled.npz", x, np.full(len(x), -1))
    other_content = str(tmp_path / "other_content.npz")  # the same names, other images
    EmbeddingSet(x, [f"img{i}.png" for i in range(len(x))], y, {"content": "abc"}).save(
        other_content
    )
    EmbeddingSet(x, [f"img{i}.png" for i in range(len(x))], y, {"content": "def"}).save(good)
    bad = x.copy()
    bad[3, 0] = np.nan
    nan = save(tmp_path / "nan.npz", bad, y)
    empty = save(tmp_path / "empty.npz", x[:0], y[:0], [])
    one = save(tmp_path / "one.npz", x[:1], y[:1], ["img0.png"])
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    cases = [
        ((good, other), "not the same images"),
        ((good, unlabelled), "no class labels"),
        ((nan, good), "NaN"),
        ((empty, empty), "0 embeddings"),
        ((one, one), "no query has a relevant reference"),
        ((str(tmp_path / "junk.npz"), good), "junk.npz"),
        ((str(tmp_path / "missing.npz"), good), "missing.npz: no such file"),
        ((good, good, "--resamples", "0"), "--resamples 0"),
        ((good, good, "--resamples", "39"), "needs at least 40 resamples"),
        ((good, good, "--level", "0.999999"), "needs at least 2000000 resamples"),
        ((good, good, "--seed", "-1"), "--seed -1"),
        ((good, good, "--mlrc-seed", "0"), "only for MLRC folders"),
        ((good, good, "--gallery", good, good), "holds 120 of the queries"),
        ((good, other_content), "generated data of other settings"),
        ((good, good, "--level", "1.5"), "--level 1.5"),
    ]
    for args, message in cases:
        out = compare(*args)
        assert out.returncode == 2, ([str(a)[-20:] for a in args], out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (
            args,
            out.stderr,
        )


def test_the_page_shows_images_that_are_members_of_a_zip_archive(tmp_path):
    """Omniglot's splits are zip members: the page reads them from the archive the embeddings
    file names (meta "archive")."""
    import zipfile

    from PIL import Image

    x, y = embeddings(7, n_classes=4, per_class=3)
    names = [f"set/alphabet/c{label}/{i}.png" for i, label in enumerate(y)]
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for name in names:
            with z.open(name, "w") as f:
                Image.new("RGB", (8, 8), (200, 30, 30)).save(f, format="PNG")
    for model in ("a", "b"):
        EmbeddingSet(x, names, y, {"archive": str(archive)}).save(str(tmp_path / f"{model}.npz"))
    out = compare(
        tmp_path / "a.npz", tmp_path / "b.npz", "--resamples", "100", "--out", tmp_path / "cmp"
    )
    assert out.returncode == 0, out.stderr
    page = (tmp_path / "cmp" / "report.html").read_text()
    assert page.count('<img src="data:image/jpeg;base64,') >= len(names) // 2
    assert 'class="name"' not in page  # no image shown as a bare name
