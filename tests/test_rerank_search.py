"""``python -m dml search --rerank`` and ``embed --split``'s per-class file, run through the
command's main in this process: the hits are the stable order of dml.reranking's distances,
each similarity is the plain cosine of the two embeddings (never a re-ranked score), and bad
settings are one line."""

import contextlib
import csv
import io
import json
import subprocess

import numpy as np
import pytest
import torch

from dml.inference import EmbeddingSet
from dml.inference.cli import main, split_metrics
from dml.reranking import rerank


def run(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def data(seed=0, classes=12, per_class=5, dim=16):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    x = rng.normal(size=(classes, dim))[labels] + 0.9 * rng.normal(size=(len(labels), dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


@pytest.fixture
def indexed(tmp_path):
    x, y = data()
    rows = tmp_path / "g.npz"
    EmbeddingSet(x, [f"g{i}.png" for i in range(len(x))], y, {}).save(str(rows))
    assert run("index", rows, "--out", tmp_path / "g.index").returncode == 0
    return x, y, rows, tmp_path / "g.index"


@pytest.mark.parametrize(
    "name,params", [("k_reciprocal", ["k1=6", "k2=3"]), ("alpha_qe", ["k=3", "alpha=2"])]
)
def test_reranked_hits_follow_the_reranked_distances_and_carry_plain_cosines(
    indexed, tmp_path, name, params
):
    x, y, rows, index = indexed
    q, _ = data(1, classes=3, per_class=2)
    queries = tmp_path / "q.npz"
    EmbeddingSet(q, [f"q{i}.png" for i in range(len(q))], np.full(len(q), -1), {}).save(
        str(queries)
    )
    args = [a for p in params for a in ("--rerank-param", p)]
    out = run(
        "search",
        index,
        "--embeddings",
        queries,
        "--k",
        5,
        "--rerank",
        name,
        *args,
        "--out",
        tmp_path / "r.json",
    )
    assert out.returncode == 0, out.stderr
    hits = json.loads((tmp_path / "r.json").read_text())
    settings = {k: float(v) if "." in v else int(v) for k, v in (p.split("=") for p in params)}
    d = rerank(name, torch.from_numpy(q), torch.from_numpy(x), **settings).dense().numpy()
    for i in range(len(q)):
        mine = [h for h in hits if h["query"] == f"q{i}.png"]
        assert [h["row"] for h in mine] == np.argsort(d[i], kind="stable")[:5].tolist()
        for h in mine:
            assert h["similarity"] == pytest.approx(float(q[i] @ x[h["row"]]), abs=1e-5)
            assert h["rerank_distance"] == pytest.approx(float(d[i, h["row"]]), abs=1e-5)
    plain = run("search", index, "--embeddings", queries, "--k", 5, "--out", tmp_path / "p.json")
    assert plain.returncode == 0
    assert "rerank_distance" not in json.loads((tmp_path / "p.json").read_text())[0]


def test_reranked_search_of_the_index_rows_leaves_each_out_of_its_own_hits(indexed, tmp_path):
    x, y, rows, index = indexed
    out = run(
        "search",
        index,
        "--embeddings",
        rows,
        "--exclude-self",
        "--k",
        3,
        "--rerank",
        "k_reciprocal",
        "--out",
        tmp_path / "r.csv",
    )
    assert out.returncode == 0, out.stderr
    with open(tmp_path / "r.csv") as f:
        hits = list(csv.DictReader(f))
    d = rerank("k_reciprocal", torch.from_numpy(x)).dense().numpy()
    np.fill_diagonal(d, np.inf)
    for i in range(len(x)):
        mine = [int(h["row"]) for h in hits if h["query"] == f"g{i}.png"]
        assert mine == np.argsort(d[i], kind="stable")[:3].tolist() and i not in mine


def test_bad_rerank_settings_are_one_line(indexed, tmp_path):
    _, _, rows, index = indexed
    for extra, message in (
        (["--rerank-param", "k1"], "expected KEY=NUMBER"),
        (["--rerank-param", "k9=3"], "unknown parameters"),
        (["--rerank-param", "k1=2.5"], "k1 2.5 must be a whole number"),
    ):
        out = run(
            "search",
            index,
            "--embeddings",
            rows,
            "--rerank",
            "k_reciprocal",
            *extra,
            "--out",
            tmp_path / "r.json",
        )
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and message in lines[0], out.stderr
    assert not (tmp_path / "r.json").exists()


def test_an_embedded_split_gets_its_metrics_and_per_class_file(tmp_path, capsys):
    x, y = data(2)
    rows = EmbeddingSet(x, [f"t{i}" for i in range(len(x))], y, {})
    split_metrics(rows, "test", str(tmp_path / "t.npz"), [1, 2])
    printed = capsys.readouterr().out
    assert "test split, each image searched against the rest of it | R@1" in printed
    with open(tmp_path / "t.per_class.csv") as f:
        per_class = list(csv.DictReader(f))
    d = ((x[:, None].astype(np.float64) - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    hit = y[np.argsort(d, 1, kind="stable")[:, 0]] == y
    for r in per_class:
        assert float(r["R@1"]) == pytest.approx(hit[y == int(r["class"])].mean(), abs=1e-6)
    # one image: no metric, a note, no file and no error
    split_metrics(EmbeddingSet(x[:1], ["a"], y[:1], {}), "test", str(tmp_path / "one.npz"), [1])
    assert "note: no metrics" in capsys.readouterr().err
    assert not (tmp_path / "one.per_class.csv").exists()


def test_rerank_param_without_rerank_and_rerank_on_ivfpq_are_one_line(indexed, tmp_path):
    _, _, rows, index = indexed
    out = run(
        "search",
        index,
        "--embeddings",
        rows,
        "--rerank-param",
        "k1=3",
        "--out",
        tmp_path / "r.json",
    )
    assert out.returncode == 2 and "give --rerank" in out.stderr


def test_the_rerank_table_keeps_models_of_the_same_file_name_apart(tmp_path):
    from dml.rerank_table import labels_of
    from dml.rerank_table import main as table_main

    assert labels_of(["a/x.npz", "b/x.npz", "c/y.npz"]) == ["a/x.npz", "b/x.npz", "y.npz"]
    for name, seed in (("a", 3), ("b", 4)):
        x, y = data(seed)
        (tmp_path / name).mkdir()
        EmbeddingSet(x, [f"t{i}" for i in range(len(x))], y, {"split": "train"}).save(
            str(tmp_path / name / "x.npz")
        )
    text = table_main(
        [str(tmp_path / "a" / "x.npz"), str(tmp_path / "b" / "x.npz"), "--rerank", "alpha_qe"]
    )
    assert text.startswith("The train split")
    assert sum(line.count("| plain |") for line in text.splitlines()) == 2
