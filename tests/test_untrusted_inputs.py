"""Files from strangers: a checkpoint that would run code runs nothing at any entry point; a
search returns real neighbours with their cosine, or fewer, never a placeholder; every input
size from 0 rows up is a result or one line naming the file.

The command-line entry points run in this process (``dml.inference.cli.main``, ``dml.cli.main``:
what ``python -m dml`` calls), and once each as a subprocess, ``python -m dml`` and ``make
resume``, to see the printed line as a user does."""

import json
import math
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from dml.compose import config_args
from dml.errors import ConfigError
from dml.inference import EmbeddingSet, SearchIndex
from dml.inference.cli import main as use_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint carries."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_checkpoints(folder):
    """The payload as a torch zip file and as a raw (legacy) pickle; the marker it would make."""
    marker = folder / "MARKER"
    payload = {
        "state_dict": {},
        "hyper_parameters": {},
        "dml_config": RunsCode(marker),
        "epoch": 0,
        "global_step": 0,
    }
    zipped, raw = folder / "zip.ckpt", folder / "raw.ckpt"
    torch.save(payload, zipped)
    with open(raw, "wb") as f:
        pickle.dump(payload, f)
    return marker, [zipped, raw]


def one_line_error(capsys, run):
    """Run a CLI entry point: it fails with status 2 and one stderr line, which is returned."""
    try:
        status = run()
    except SystemExit as exit_:
        status = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith("error: "), (status, err)
    return err[0]


def strict_json(path):
    """json.load that refuses NaN and Infinity (which json.dump writes by default)."""

    def refuse(name):
        raise ValueError(f"{path}: {name} is not JSON")

    with open(path) as f:
        return json.load(f, parse_constant=refuse)


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def embeddings_file(path, x, labels=None):
    labels = np.zeros(len(x), np.int64) if labels is None else labels
    EmbeddingSet(np.asarray(x, np.float32), [f"g{i}" for i in range(len(x))], labels).save(
        str(path)
    )
    return str(path)


# --- loading never runs code --------------------------------------------------------------------
def test_every_entry_point_taking_a_checkpoint_refuses_code_and_runs_nothing(
    tmp_path, capsys, monkeypatch
):
    from dml.cli import main as train

    monkeypatch.setattr(sys, "argv", ["python -m dml"])  # pytest's own arguments are not ours

    marker, files = evil_checkpoints(tmp_path)
    image = tmp_path / "q.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    emb = embeddings_file(tmp_path / "g.npz", unit(np.eye(64)[:8]))
    use_checkpoint(["index", emb, "--out", str(tmp_path / "g.index")])
    capsys.readouterr()
    fit = config_args("synthetic", "baseline")
    for ckpt in map(str, files):
        entry_points = {
            "embed": lambda: use_checkpoint(
                ["embed", ckpt, "--images", str(tmp_path), "--out", str(tmp_path / "e.npz")]
            ),
            "export": lambda: use_checkpoint(
                ["export", ckpt, "--format", "torchscript", "--out", str(tmp_path / "m.pt")]
            ),
            "search --ckpt": lambda: use_checkpoint(
                [
                    "search",
                    str(tmp_path / "g.index"),
                    str(image),
                    "--ckpt",
                    ckpt,
                    "--out",
                    str(tmp_path / "r.json"),
                ]
            ),
            "fit --ckpt_path": lambda: train(
                ["fit", *fit, "--ckpt_path", ckpt, "--trainer.default_root_dir", str(tmp_path)]
            ),
            "test --ckpt_path": lambda: train(
                ["test", *fit, "--ckpt_path", ckpt, "--trainer.default_root_dir", str(tmp_path)]
            ),
        }
        for name, run in entry_points.items():
            line = one_line_error(capsys, run)
            assert ckpt in line and "refused" in line and "could run code" in line, (name, line)
            assert not marker.exists(), f"{name} ran the checkpoint's code"
    assert not (tmp_path / "runs").exists()  # no run folder for a refused checkpoint
    # the notebooks' loaders: the embedder and LightningModule.load_from_checkpoint
    from dml.inference import Embedder
    from dml.module import DMLModule

    for ckpt in map(str, files):
        with pytest.raises(ConfigError, match="could run code"):
            Embedder.from_checkpoint(ckpt)
        with pytest.raises(pickle.UnpicklingError):
            DMLModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    assert not marker.exists()


def test_python_m_dml_and_make_resume_print_one_line_and_run_nothing(tmp_path):
    marker, (zipped, _) = evil_checkpoints(tmp_path)
    env = dict(os.environ, WANDB_MODE="disabled")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dml",
            "embed",
            str(zipped),
            "--split",
            "test",
            "--out",
            str(tmp_path / "e.npz"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "could run code" in out.stderr and not marker.exists()
    if not os.path.exists(os.path.join(REPO, ".venv", ".installed")):
        pytest.skip("make resume runs the repository's .venv, which `make test` creates")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    os.replace(zipped, run / "checkpoints" / "last.ckpt")
    (run / "config.yaml").write_text(
        "trainer:\n  max_epochs: 1\ndata:\n  class_path: dml.data.SyntheticDataModule\n"
    )
    out = subprocess.run(
        ["make", "-s", "resume", f"RUN={run}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode != 0 and not marker.exists(), out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "last.ckpt" in errors[0] and "could run code" in errors[0], (
        out.stderr
    )


def test_no_loader_in_the_repository_may_unpickle():
    """Every torch.load passes weights_only=True and every np.load allow_pickle=False: in the
    package, the benchmarks and the notebooks (tests load their own files and are exempt)."""
    calls = []
    for folder in ("dml", "benchmarks", "notebooks"):
        for root, _, files in os.walk(os.path.join(REPO, folder)):
            for name in files:
                if name.endswith((".py", ".ipynb")):
                    text = open(os.path.join(root, name)).read()
                    for m in re.finditer(r"(torch\.load|np\.load|load_from_checkpoint)\(", text):
                        call = text[m.start() : text.find(")", m.end()) + 1]
                        calls.append((name, call))
    assert calls, "the scan found no loader at all: it is scanning the wrong place"
    for name, call in calls:
        if call.startswith("np.load"):
            assert "allow_pickle=False" in call, (name, call)
        else:
            assert "weights_only=True" in call, (name, call)


def test_embedding_files_that_are_not_data_are_one_line(tmp_path, capsys):
    good = embeddings_file(
        tmp_path / "good.npz", unit(np.random.default_rng(0).normal(size=(20, 8)))
    )
    data = open(good, "rb").read()
    (tmp_path / "truncated.npz").write_bytes(data[: len(data) // 2])
    np.savez(
        tmp_path / "pickled.npz",
        embeddings=np.zeros((2, 8), np.float32),
        paths=np.array([RunsCode(tmp_path / "M"), "b"], dtype=object),
        labels=np.zeros(2, np.int64),
        meta=np.asarray("{}"),
    )
    np.savez(tmp_path / "nolabels.npz", embeddings=np.zeros((2, 8), np.float32))
    np.save(tmp_path / "bare.npy", np.zeros((2, 8), np.float32))
    (tmp_path / "empty.npz").write_bytes(b"")
    expected = {
        "truncated.npz": "truncated or not an .npz",
        "pickled.npz": "could run code",
        "nolabels.npz": "no array named paths, labels, meta",
        "bare.npy": "a single .npy array",
        "empty.npz": "truncated or not an .npz",
        "missing.npz": "no such embeddings file",
    }
    for name, says in expected.items():
        line = one_line_error(
            capsys,
            lambda: use_checkpoint(
                ["index", str(tmp_path / name), "--out", str(tmp_path / "x.index")]
            ),
        )
        assert name in line and says in line, line
        line = one_line_error(
            capsys,
            lambda: use_checkpoint(
                [
                    "search",
                    str(tmp_path / "none.index"),
                    "--embeddings",
                    str(tmp_path / name),
                    "--out",
                    str(tmp_path / "r.json"),
                ]
            ),
        )
        assert "none.index: no such index" in line
    assert not (tmp_path / "M").exists() and not (tmp_path / "x.index").exists()
    # an index whose rows file was swapped for a pickle
    use_checkpoint(["index", good, "--out", str(tmp_path / "g.index")])
    os.replace(tmp_path / "pickled.npz", tmp_path / "g.index.rows.npz")
    line = one_line_error(
        capsys,
        lambda: use_checkpoint(
            [
                "search",
                str(tmp_path / "g.index"),
                "--embeddings",
                good,
                "--out",
                str(tmp_path / "r.json"),
            ]
        ),
    )
    assert "g.index.rows.npz" in line and "could run code" in line
    assert not (tmp_path / "M").exists() and not (tmp_path / "r.json").exists()


def npy_bytes(array=None, header=None, data=b""):
    """An .npy member: ``array`` saved, or a hand-written ``header`` followed by ``data``."""
    import io

    out = io.BytesIO()
    if array is not None:
        np.save(out, array)
    else:
        np.lib.format.write_array_header_1_0(out, header)
        out.write(data)
    return out.getvalue()


def test_embedding_files_whose_headers_claim_more_than_they_hold_allocate_nothing(tmp_path, capsys):
    """A 1 KB file whose header claims (10**7, 10**5) floats (3.6 TiB, which np.load would
    allocate), and a deflate bomb (200,000 x 64 zeros, 50 KB compressed, one path): each is one
    line, decided from the headers before any array is inflated."""
    import tracemalloc
    import zipfile

    rest = {
        "paths.npy": npy_bytes(np.array(["a"])),
        "labels.npy": npy_bytes(np.zeros(1, np.int64)),
        "meta.npy": npy_bytes(np.asarray("{}")),
    }
    liar = tmp_path / "liar.npz"
    claim = {"descr": "<f4", "fortran_order": False, "shape": (10**7, 10**5)}
    with zipfile.ZipFile(liar, "w") as z:
        z.writestr("embeddings.npy", npy_bytes(header=claim, data=b"\0" * 1024))
        for name, data in rest.items():
            z.writestr(name, data)
    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("embeddings.npy", npy_bytes(np.zeros((200_000, 64), np.float32)))
        for name, data in rest.items():
            z.writestr(name, data)
    assert os.path.getsize(bomb) < 200_000
    expected = {
        "liar.npz": "its array 'embeddings' claims shape (10000000, 100000) of float32",
        "bomb.npz": "200000 embeddings, 1 paths and 1 labels",
    }
    for name, says in expected.items():
        tracemalloc.start()
        line = one_line_error(
            capsys,
            lambda: use_checkpoint(
                ["index", str(tmp_path / name), "--out", str(tmp_path / "x.index")]
            ),
        )
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert name in line and says in line, line
        assert peak < 20 * 2**20, peak  # the bomb inflates to 51 MB


# --- a search returns real neighbours -----------------------------------------------------------
@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """1,000 unit vectors, 64-d, 30 classes; its flat and ivf (25 cells) indexes."""
    folder = tmp_path_factory.mktemp("gallery")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 30, 1000)
    x = unit(rng.standard_normal((30, 64))[labels] + 1.5 * rng.standard_normal((1000, 64)))
    emb = embeddings_file(folder / "g.npz", x, labels)
    for kind in ("flat", "ivf"):
        assert (
            use_checkpoint(["index", emb, "--kind", kind, "--out", str(folder / f"{kind}.index")])
            == 0
        )
    return folder, x


def check_results(results, x, gallery_paths, k):
    """Every row is a real gallery row at its path; similarities are numpy's cosines, in
    [-1, 1], nearest first; no query has more than k hits."""
    by_query = {}
    for r in results:
        by_query.setdefault(r["query"], []).append(r)
    for query, hits in by_query.items():
        q = int(query[1:])
        assert len(hits) <= k and [h["rank"] for h in hits] == list(range(1, len(hits) + 1))
        rows = np.array([h["row"] for h in hits])
        assert (rows >= 0).all() and (rows < len(x)).all() and q not in rows
        assert [h["path"] for h in hits] == [gallery_paths[j] for j in rows]
        sims = np.array([h["similarity"] for h in hits])
        assert np.all(np.isfinite(sims)) and np.all(np.abs(sims) <= 1)
        np.testing.assert_allclose(sims, x[rows].astype(np.float64) @ x[q], atol=2e-6)
        assert np.all(np.diff(sims) <= 1e-6)
    return by_query


def test_an_ivf_search_past_its_candidates_returns_fewer_hits_never_a_placeholder(
    gallery, tmp_path, capsys
):
    folder, x = gallery
    paths = [f"g{i}" for i in range(len(x))]
    out = tmp_path / "r.json"
    # 2 of 25 cells probed: about 80 candidates per query, 200 asked for
    search = ["--embeddings", str(folder / "g.npz"), "--exclude-self", "--k", "200"]
    assert (
        use_checkpoint(
            ["search", str(folder / "ivf.index"), *search, "--nprobe", "2", "--out", str(out)]
        )
        == 0
    )
    printed = capsys.readouterr().out
    by_query = check_results(strict_json(out), x, paths, 200)
    short = sum(len(h) < 200 for h in by_query.values())
    assert short > 0 and len(by_query) == 1000
    assert f"{short} queries got fewer than 200 hits" in printed
    # --exact-fallback: every query gets 200 hits, the exact ones (the flat index's)
    for index, extra in (("ivf", ["--exact-fallback", "--nprobe", "2"]), ("flat", [])):
        assert (
            use_checkpoint(
                [
                    "search",
                    str(folder / f"{index}.index"),
                    *search,
                    *extra,
                    "--out",
                    str(tmp_path / f"{index}.csv"),
                ]
            )
            == 0
        )
    import csv

    with open(tmp_path / "ivf.csv") as f, open(tmp_path / "flat.csv") as g:
        fallback, flat = list(csv.DictReader(f)), list(csv.DictReader(g))
    assert len(fallback) == len(flat) == 1000 * 200
    exact_queries = {q for q, h in by_query.items() if len(h) < 200}
    picked = [(a["query"], a["row"]) for a in fallback if a["query"] in exact_queries]
    assert picked == [(b["query"], b["row"]) for b in flat if b["query"] in exact_queries]
    assert "fewer than" not in capsys.readouterr().out


def test_non_finite_queries_are_refused_naming_how_many(gallery, tmp_path, capsys):
    folder, x = gallery
    q = x[:10].copy()
    q[[2, 5, 7], 3] = np.nan
    q[8, 0] = np.inf
    emb = embeddings_file(tmp_path / "q.npz", q)
    for kind in ("flat", "ivf"):
        line = one_line_error(
            capsys,
            lambda: use_checkpoint(
                [
                    "search",
                    str(folder / f"{kind}.index"),
                    "--embeddings",
                    emb,
                    "--out",
                    str(tmp_path / "r.json"),
                ]
            ),
        )
        assert "q.npz: 4 of 10 query embeddings hold NaN or inf" in line
    line = one_line_error(
        capsys, lambda: use_checkpoint(["index", emb, "--out", str(tmp_path / "q.index")])
    )
    assert "q.npz: 4 of 10 embeddings hold NaN or inf" in line
    with pytest.raises(ConfigError, match="4 of 10 rows hold NaN or inf"):
        SearchIndex.load(str(folder / "flat.index")).search(q, 5)
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "q.index").exists()


def test_rows_that_are_not_unit_length_give_cosines_in_cosine_order(tmp_path, capsys):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 32)) * rng.uniform(0.2, 5.0, (200, 1))
    emb = embeddings_file(tmp_path / "g.npz", x)
    queries = embeddings_file(tmp_path / "q.npz", 3.0 * x[:20] + 0.1)
    for kind in ("flat", "hnsw"):
        assert (
            use_checkpoint(["index", emb, "--kind", kind, "--out", str(tmp_path / f"{kind}.index")])
            == 0
        )
        assert (
            "200 of 200 rows were not of unit length and were L2-normalised"
            in capsys.readouterr().err
        )
        assert (
            use_checkpoint(
                [
                    "search",
                    str(tmp_path / f"{kind}.index"),
                    "--embeddings",
                    queries,
                    "--k",
                    "5",
                    "--out",
                    str(tmp_path / "r.json"),
                ]
            )
            == 0
        )
        results = strict_json(tmp_path / "r.json")
        cos = (3.0 * x[:20] + 0.1) @ x.T
        cos /= np.linalg.norm(3.0 * x[:20] + 0.1, axis=1)[:, None] * np.linalg.norm(x, axis=1)
        for q in range(20):
            hits = [r for r in results if r["query"] == f"g{q}"]
            order = np.argsort(-cos[q], kind="stable")[:5]
            assert [h["row"] for h in hits] == order.tolist()
            np.testing.assert_allclose([h["similarity"] for h in hits], cos[q][order], atol=2e-6)


def test_recall_of_approximate_indexes_is_counted_by_distance_on_exact_duplicates(tmp_path, capsys):
    rng = np.random.default_rng(2)
    x = np.repeat(unit(rng.standard_normal((40, 32))), 50, axis=0)  # 40 vectors x 50 copies
    emb = embeddings_file(tmp_path / "dup.npz", x, np.repeat(np.arange(40), 50))
    for kind in ("hnsw", "ivf"):
        assert (
            use_checkpoint(["index", emb, "--kind", kind, "--out", str(tmp_path / f"{kind}.index")])
            == 0
        )
        assert "Recall@10 against exact search 1.0000" in capsys.readouterr().out
    # and a miss is still a miss: an index that answers far rows scores below 1
    built = SearchIndex.build(
        EmbeddingSet(x, [str(i) for i in range(len(x))], np.zeros(len(x))), "hnsw"
    )
    assert built.meta["recall@10"] == 1.0

    class FarAnswers:  # every row answered by the rows of the next vector (distance > 0)
        def search(self, q, k):
            rows = np.array([[(r + 50 + j) % len(x) for j in range(k)] for r in sampled])
            return np.zeros(rows.shape, np.float32), rows

    sampled = np.sort(np.random.default_rng(0).choice(len(x), 100, replace=False))
    built.index = FarAnswers()
    assert built.recall_against_exact(x, 100, seed=0) == 0.0


# --- every input size ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_one_row_and_zero_queries(kind, tmp_path, capsys):
    one = embeddings_file(tmp_path / "one.npz", unit(np.ones((1, 8))))
    assert use_checkpoint(["index", one, "--kind", kind, "--out", str(tmp_path / "1.index")]) == 0
    captured = capsys.readouterr()
    assert f"{kind} index of 1 rows" in captured.out
    if kind != "flat":
        assert "no recall check: one row has no neighbour" in captured.err
    assert (
        use_checkpoint(
            [
                "search",
                str(tmp_path / "1.index"),
                "--embeddings",
                one,
                "--k",
                "5",
                "--out",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    assert "k 5 clamped to 1" in capsys.readouterr().err
    (hit,) = strict_json(tmp_path / "r.json")
    assert hit["row"] == 0 and hit["similarity"] == pytest.approx(1.0, abs=1e-6)
    line = one_line_error(
        capsys,
        lambda: use_checkpoint(
            [
                "search",
                str(tmp_path / "1.index"),
                "--embeddings",
                one,
                "--exclude-self",
                "--out",
                str(tmp_path / "r2.json"),
            ]
        ),
    )
    assert "no row to return" in line and not (tmp_path / "r2.json").exists()
    none = embeddings_file(tmp_path / "none.npz", np.zeros((0, 8)))
    assert (
        use_checkpoint(
            [
                "search",
                str(tmp_path / "1.index"),
                "--embeddings",
                none,
                "--out",
                str(tmp_path / "r3.json"),
            ]
        )
        == 0
    )
    assert strict_json(tmp_path / "r3.json") == []
    assert capsys.readouterr().out.startswith("0 queries")
    line = one_line_error(
        capsys,
        lambda: use_checkpoint(["index", none, "--kind", kind, "--out", str(tmp_path / "0.index")]),
    )
    assert "none.npz: 0 embeddings, there is nothing to index" in line


def test_approximate_parameters_are_clamped_and_said(tmp_path, capsys):
    rng = np.random.default_rng(3)
    emb = embeddings_file(tmp_path / "g.npz", unit(rng.standard_normal((100, 16))))
    assert (
        use_checkpoint(
            ["index", emb, "--kind", "ivf", "--nprobe", "50", "--out", str(tmp_path / "g.index")]
        )
        == 0
    )
    cells = SearchIndex.load(str(tmp_path / "g.index")).index.nlist
    assert cells == max(1, min(int(4 * math.sqrt(100)), 100 // 39)) == 2
    assert "nprobe 50 clamped to the 2 cells of 100 rows" in capsys.readouterr().err
    for bad, says in (
        (["--k", "0"], "k 0: expected a number of neighbours >= 1"),
        (["--nprobe", "0"], "--nprobe 0: expected a number of cells >= 1"),
    ):
        line = one_line_error(
            capsys,
            lambda: use_checkpoint(
                [
                    "search",
                    str(tmp_path / "g.index"),
                    "--embeddings",
                    emb,
                    "--out",
                    str(tmp_path / "r.json"),
                    *bad,
                ]
            ),
        )
        assert says in line
    # a zero row has no cosine
    z = unit(rng.standard_normal((5, 16)))
    z[1] = 0
    line = one_line_error(
        capsys,
        lambda: use_checkpoint(
            ["index", embeddings_file(tmp_path / "z.npz", z), "--out", str(tmp_path / "z.index")]
        ),
    )
    assert "z.npz: the embeddings: 1 of 5 rows have length 0" in line


def test_a_config_file_with_a_python_tag_is_refused_and_runs_nothing(tmp_path, capsys, monkeypatch):
    """Config files are read with YAML's safe loader: a python/object tag is an error naming
    the file and line, and the call it names is never made."""
    from dml.cli import main as train

    monkeypatch.setattr(sys, "argv", ["python -m dml"])
    marker = tmp_path / "MARKER"
    config = tmp_path / "evil.yaml"
    config.write_text(
        f'trainer:\n  max_epochs: !!python/object/apply:os.system ["touch {marker}"]\n'
    )
    line = one_line_error(capsys, lambda: train(["fit", "--config", str(config)]))
    assert "evil.yaml: not valid YAML at line 2" in line and not marker.exists()


def test_a_checkpoint_of_plain_data_naming_outside_code_is_refused(tmp_path, capsys):
    """Weights-only loading keeps pickles out; the class paths a checkpoint's settings name
    (model.terms, the memory, the data module) would still be imported and called: outside
    the dml package they are refused unless the user trusts the module."""
    from helpers import small_module

    from dml.module import DMLModule

    marker = tmp_path / "MARKER"
    module = small_module()
    hparams = dict(module.hparams)
    evil = {"class_path": "os.system", "init_args": {"command": f"touch {marker}"}}
    hparams["terms"] = {"shell": evil}
    path = str(tmp_path / "terms.ckpt")
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams}, path)
    listed = str(tmp_path / "listed.ckpt")  # the list of checkpoints before terms had names
    torch.save(
        {"state_dict": module.state_dict(), "hyper_parameters": dict(hparams, terms=[evil])}, listed
    )
    data = str(tmp_path / "data.ckpt")
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "dml_config": {"data": {"class_path": "this.s"}},
        },
        data,
    )
    for ckpt, key in (
        (path, "model.terms.shell.class_path"),
        (listed, "model.terms.system.class_path"),
        (data, "data.class_path"),
    ):
        for args in (
            ["embed", ckpt, "--split", "test", "--out", str(tmp_path / "e.npz")],
            ["export", ckpt, "--format", "torchscript", "--out", str(tmp_path / "m.pt")],
        ):
            line = one_line_error(capsys, lambda: use_checkpoint(args))
            assert f"its {key} names" in line and "--trust-module" in line, line
    assert not marker.exists() and not (tmp_path / "e.npz").exists()
    assert DMLModule  # the package's own classes still load: the other tests embed with them


def test_outputs_and_options_that_cannot_work_are_one_line_before_anything_is_written(
    gallery, tmp_path, capsys
):
    folder, x = gallery
    emb = str(folder / "g.npz")
    # a new folder for the output is made
    assert (
        use_checkpoint(
            [
                "search",
                str(folder / "flat.index"),
                "--embeddings",
                emb,
                "--k",
                "2",
                "--out",
                str(tmp_path / "new" / "r.json"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    (tmp_path / "adir.json").mkdir()
    cases = [
        (
            [
                "search",
                str(folder / "flat.index"),
                "--embeddings",
                emb,
                "--out",
                str(tmp_path / "adir.json"),
            ],
            "adir.json: is a folder",
        ),
        (
            [
                "search",
                str(folder / "flat.index"),
                "--embeddings",
                emb,
                "--out",
                str(tmp_path / "same.json"),
                "--html",
                str(tmp_path / "same.json"),
            ],
            "same.json: is also an input or another output",
        ),
        (["index", emb, "--out", emb], "g.npz: is also an input"),
        (
            [
                "search",
                str(folder / "flat.index"),
                "--embeddings",
                emb,
                "--nprobe",
                "4",
                "--out",
                str(tmp_path / "r.json"),
            ],
            "--nprobe: a flat index has no cells",
        ),
        (
            ["index", emb, "--kind", "hnsw", "--nprobe", "4", "--out", str(tmp_path / "h.index")],
            "--nprobe: a hnsw index has no cells",
        ),
    ]
    for args, says in cases:
        line = one_line_error(capsys, lambda: use_checkpoint(args))
        assert says in line, line
    assert not (tmp_path / "same.json").exists() and not (tmp_path / "r.json").exists()
    # other queries with --exclude-self: refused, never searched against each other
    other = embeddings_file(
        tmp_path / "other.npz", unit(np.random.default_rng(5).normal(size=(len(x), x.shape[1])))
    )
    for kind in ("flat", "ivf"):
        line = one_line_error(
            capsys,
            lambda: use_checkpoint(
                [
                    "search",
                    str(folder / f"{kind}.index"),
                    "--embeddings",
                    other,
                    "--exclude-self",
                    "--out",
                    str(tmp_path / "r.json"),
                ]
            ),
        )
        assert "other.npz: exclude_self: the queries must be the index's own rows" in line
    # queries of another size name their file
    small = embeddings_file(tmp_path / "d8.npz", unit(np.ones((3, 8))))
    line = one_line_error(
        capsys,
        lambda: use_checkpoint(
            [
                "search",
                str(folder / "flat.index"),
                "--embeddings",
                small,
                "--out",
                str(tmp_path / "r.json"),
            ]
        ),
    )
    assert "d8.npz: the queries are 8-d embeddings, the index holds 64-d" in line


def test_rows_beyond_float32_in_either_direction_keep_their_cosine(gallery, tmp_path):
    folder, x = gallery
    built = SearchIndex.load(str(folder / "flat.index"))
    q = x[:3].astype(np.float64)
    for scale in (1e300, 1e-13, 1e-300):
        hits = built.search(q * scale, 4)
        np.testing.assert_array_equal(hits.rows[0], built.search(q, 4).rows[0])
        np.testing.assert_allclose(hits.similarities[0][0], 1.0, atol=1e-6)
