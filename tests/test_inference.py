"""python -m dml embed | index | search | export on a model trained here for two epochs: search
results against dml.metrics, approximate recall against a recount, the HTML page, exports
against PyTorch, and one clear line for each bad input."""

import base64
import html.parser
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from run_helpers import train_tiny_checkpoint

from dml.inference import Embedder, EmbeddingSet, SearchIndex
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


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return train_tiny_checkpoint(tmp_path_factory.mktemp("trained"))


def test_search_results_give_the_evaluations_recall_exactly(ckpt, tmp_path):
    emb, idx, res = tmp_path / "test.npz", tmp_path / "test.index", tmp_path / "r.json"
    assert dml("embed", ckpt, "--split", "test", "--out", emb).returncode == 0
    rows = EmbeddingSet.load(str(emb))
    assert rows.embeddings.shape == (144, 64) and rows.has_labels
    assert np.allclose(np.linalg.norm(rows.embeddings, axis=1), 1, atol=1e-5)
    assert dml("index", emb, "--out", idx).returncode == 0
    page_path = tmp_path / "r.html"
    out = dml(
        "search",
        idx,
        "--embeddings",
        emb,
        "--exclude-self",
        "--k",
        "4",
        "--out",
        res,
        "--html",
        page_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.load(open(res))
    assert len(results) == 144 * 4
    firsts = [r for r in results if r["rank"] == 1]
    assert all(r["path"] != r["query"] for r in firsts)
    recall_1 = np.mean([r["match"] for r in firsts])
    expected = retrieval_metrics(rows.embeddings, rows.labels, [1, 4])
    assert recall_1 == expected["R@1"]
    by_query = {}
    for r in results:
        by_query.setdefault(r["query"], []).append(r["match"])
    assert np.mean([any(m) for m in by_query.values()]) == expected["R@4"]
    # the embeddings are the ones the validation scores: same split, same transform
    embedder = Embedder.from_checkpoint(ckpt, device="cpu")
    assert embedder.dim == 64
    # the page shows the generated images themselves: the query test/5 is image 5 of the split
    page = Images()
    page.feed(page_path.read_text())
    assert len(page.sources) == 144 * (1 + 4)
    assert all(src.startswith("data:image/jpeg;base64,") for src in page.sources)
    shown = [decoded(page.sources[i * 5]) for i in range(3)]  # the first 3 queries' tiles
    from dml.data.synthetic import SyntheticShapes
    from dml.inference.generated_images import to_pil

    data = SyntheticShapes(
        "test", **{k: v for k, v in rows.meta["generated"].items() if k not in ("dataset", "split")}
    )
    queries = [int(r["query"].split("/")[1]) for r in firsts[:3]]
    for got, q in zip(shown, queries):  # the image closest to the tile is the query's own
        size = got.shape[:2][::-1]
        gaps = [
            np.abs(got - np.asarray(to_pil(x).resize(size, 0), np.float32)).mean()
            for x in data.images
        ]
        assert int(np.argmin(gaps)) == q and gaps[q] < 15


def decoded(src):
    return np.asarray(
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"),
        np.float32,
    )


def test_generated_images_are_made_again_only_when_their_checksum_matches():
    import hashlib

    from dml.data.synthetic import SyntheticShapes
    from dml.inference.generated_images import generated_meta, resolver

    data = SyntheticShapes("test", num_classes=3, images_per_class=2, image_size=16, seed=4)
    digest = hashlib.sha1(data.images.contiguous().numpy().tobytes()).hexdigest()
    meta = {"generated": generated_meta(data), "content": digest}
    image = resolver(meta)
    assert image("test/5").size == (16, 16)
    assert image("test/6") is None and image("train/0") is None and image("test/x") is None
    assert image("test/\u00b2") is None and image("test/\uff10") is None  # not ASCII digits
    assert resolver(dict(meta, content="0" * 40)) is None  # other pixels under these names
    for key, bad in [("num_classes", 10**9), ("image_size", True), ("seed", "4"), ("split", "x")]:
        assert resolver(dict(meta, generated=dict(meta["generated"], **{key: bad}))) is None
    assert resolver({}) is None and resolver({"generated": "SyntheticShapes"}) is None


def test_generated_images_past_the_cap_are_not_made(monkeypatch):
    """Arguments from a stranger's file, each in its range, whose images would hold more than
    MAX_VALUES pixel values (rendering 381 images of 512 px took 22 s and 7 GB here): nothing
    is rendered, the page shows names."""
    import dml.data.synthetic
    from dml.inference.generated_images import MAX_VALUES, resolver

    def refuse(*args, **kwargs):
        raise AssertionError("rendered")

    monkeypatch.setattr(dml.data.synthetic, "SyntheticShapes", refuse)
    spec = {"dataset": "SyntheticShapes", "split": "test", "images_per_class": 1, "seed": 0}
    for size in (512, 20):
        n = MAX_VALUES // (3 * size * size) + 1
        meta = {"generated": dict(spec, num_classes=n, image_size=size), "content": "0" * 40}
        assert resolver(meta) is None
    assert MAX_VALUES // (3 * 512 * 512) < 100  # a few dozen images at the largest size


def clustered_rows(n=2000, dim=32, classes=100, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    x = rng.standard_normal((classes, dim))[labels] + 0.8 * rng.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return EmbeddingSet(x.astype(np.float32), [f"row{i}" for i in range(n)], labels)


@pytest.mark.parametrize("kind", ["ivf", "hnsw", "ivfpq"])
def test_approximate_indexes_report_the_recall_a_recount_gives(kind, tmp_path):
    rows = clustered_rows()
    built = SearchIndex.build(rows, kind, recall_sample=300)
    recall = built.meta["recall@10"]
    assert 0.0 <= recall <= 1.0
    # recount by distance: a neighbour the index returns counts when its float64 distance is at
    # or inside the row's exact 10th (brute force, float64)
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(len(rows), 300, replace=False))
    x = rows.embeddings.astype(np.float64)
    d = ((x[sample, None] - x[None]) ** 2).sum(-1)
    d[np.arange(300), sample] = np.inf
    tenth = np.sort(d, axis=1)[:, 9]
    _, found = built.index.search(rows.embeddings[sample], 11)
    found = [[j for j in f if j != s and j >= 0][:10] for f, s in zip(found.tolist(), sample)]
    recount = np.mean([(d[q, f] <= tenth[q] + 1e-5).sum() / 10 for q, f in enumerate(found)])
    assert recall == pytest.approx(recount, abs=1e-9)
    if kind != "ivfpq":
        assert recall > 0.5  # approximate, not broken
    built.save(str(tmp_path / "x.index"))
    loaded = SearchIndex.load(str(tmp_path / "x.index"))
    assert loaded.kind == kind and len(loaded) == 2000 and loaded.meta["recall@10"] == recall


def write_images(folder, n=6, size=40):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)).save(
            os.path.join(folder, f"img{i}.png")
        )


class Images(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def test_folders_embed_index_search_and_the_html_page(ckpt, tmp_path):
    write_images(tmp_path / "gallery")
    write_images(tmp_path / "queries", n=2)
    (tmp_path / "gallery" / "broken.jpg").write_bytes(b"not an image")
    out = dml("embed", ckpt, "--images", tmp_path / "gallery", "--out", tmp_path / "g.npz")
    assert out.returncode == 0 and "broken.jpg" in out.stderr and "1 unreadable" in out.stdout
    gallery = EmbeddingSet.load(str(tmp_path / "g.npz"))
    assert len(gallery) == 6 and gallery.meta["unreadable"][0].endswith("broken.jpg")
    assert dml("index", tmp_path / "g.npz", "--out", tmp_path / "g.index").returncode == 0
    out = dml(
        "search",
        tmp_path / "g.index",
        "--images",
        tmp_path / "queries",
        "--ckpt",
        ckpt,
        "--k",
        "3",
        "--out",
        tmp_path / "r.csv",
        "--html",
        tmp_path / "r.html",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(open(tmp_path / "r.csv").read().strip().splitlines()) == 1 + 2 * 3
    page = Images()
    page.feed(open(tmp_path / "r.html").read())
    assert len(page.sources) == 2 * (1 + 3)
    for src in page.sources:  # every image the page shows is in it
        assert src.startswith("data:image/jpeg;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    # the page's query images are the files' embeddings searched against the gallery's
    embedder = Embedder.from_checkpoint(ckpt, device="cpu")
    q = embedder.embed_files([str(tmp_path / "queries" / "img0.png")], progress=False)
    first = [r for r in __import__("csv").DictReader(open(tmp_path / "r.csv"))][0]
    assert float(first["similarity"]) == pytest.approx(
        float((gallery.embeddings @ q.embeddings[0]).max()), abs=1e-5
    )


def cli(capsys, *args):
    """``python -m dml`` in this process (no interpreter start): (status, stdout, stderr)."""
    from dml.inference.cli import main

    try:
        status = main([str(a) for a in args])
    except SystemExit as exit_:
        status = exit_.code
    out = capsys.readouterr()
    return status, out.out, out.err


def test_unreadable_query_images_are_named_and_a_nan_model_writes_nothing(ckpt, tmp_path, capsys):
    """search --images: an unreadable query image is named and counted, not dropped without a
    word; a checkpoint whose weights are NaN embeds nothing (embed) and searches nothing."""
    write_images(tmp_path / "gallery")
    write_images(tmp_path / "queries", n=2)
    (tmp_path / "queries" / "broken.png").write_bytes(b"not an image")
    assert (
        cli(capsys, "embed", ckpt, "--images", tmp_path / "gallery", "--out", tmp_path / "g.npz")[0]
        == 0
    )
    assert cli(capsys, "index", tmp_path / "g.npz", "--out", tmp_path / "g.index")[0] == 0
    search = ["search", tmp_path / "g.index", "--images", tmp_path / "queries", "--k", "2"]
    status, out, err = cli(capsys, *search, "--ckpt", ckpt, "--out", tmp_path / "r.csv")
    assert status == 0, err[-2000:]
    assert f"unreadable, skipped: {tmp_path / 'queries' / 'broken.png'}" in err
    assert "2 queries x top 2" in out and "1 unreadable query image(s) skipped" in out
    state = torch.load(ckpt, weights_only=True, map_location="cpu")
    for key, value in state["state_dict"].items():
        if value.is_floating_point():
            state["state_dict"][key] = torch.full_like(value, float("nan"))
    broken = tmp_path / "nan.ckpt"
    torch.save(state, broken)
    for args in (
        ["embed", broken, "--images", tmp_path / "gallery", "--out", tmp_path / "n.npz"],
        [*search, "--ckpt", broken, "--out", tmp_path / "n.csv"],
    ):
        status, _, err = cli(capsys, *args)
        lines = err.strip().splitlines()
        assert status == 2 and len(lines) == 1, err[-2000:]
        assert f"{broken}: the network's embeddings of " in lines[0] and "NaN or inf" in lines[0]
    assert not (tmp_path / "n.npz").exists() and not (tmp_path / "n.csv").exists()


def test_the_search_page_shows_images_stored_in_a_zip_archive(tmp_path, capsys):
    """Omniglot's items are members of a zip file (the embeddings' meta names it): the search
    page shows their thumbnails, as the compare report does, not their names."""
    import zipfile

    archive = tmp_path / "images_background.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for i in range(6):
            buffer = io.BytesIO()
            Image.new("L", (30, 30), 40 * i).save(buffer, format="PNG")
            z.writestr(f"alphabet/char{i % 2}/{i}.png", buffer.getvalue())
    paths = [f"alphabet/char{i % 2}/{i}.png" for i in range(6)]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 8)).astype(np.float32)
    rows = EmbeddingSet(x, paths, np.arange(6) % 2, {"archive": str(archive)})
    rows.save(str(tmp_path / "e.npz"))
    assert cli(capsys, "index", tmp_path / "e.npz", "--out", tmp_path / "e.index")[0] == 0
    status, _, err = cli(
        capsys,
        "search",
        tmp_path / "e.index",
        "--embeddings",
        tmp_path / "e.npz",
        "--k",
        "2",
        "--exclude-self",
        "--out",
        tmp_path / "r.csv",
        "--html",
        tmp_path / "r.html",
    )
    assert status == 0, err[-2000:]
    page = Images()
    page.feed((tmp_path / "r.html").read_text())
    assert len(page.sources) == 6 * (1 + 2)
    assert all(src.startswith("data:image/jpeg;base64,") for src in page.sources)


def test_the_page_shows_each_query_row_once_and_at_most_the_first_n(tmp_path):
    """Two queries with the same file name stay two rows of the page; the page shows the first
    ``max_queries`` and says where all of them are (a test split's page would weigh hundreds
    of MB)."""
    from types import SimpleNamespace

    from dml.inference.report import result_rows, write_html

    for i in range(3):
        Image.new("RGB", (20, 20), (40 * i, 90, 10)).save(tmp_path / f"g{i}.png")
    gallery = [str(tmp_path / f"g{i}.png") for i in range(3)]
    hits = SimpleNamespace(
        rows=np.array([[0, 1], [1, 2], [2, 0]]),
        similarities=np.array([[0.9, 0.5], [0.8, 0.4], [0.7, 0.3]]),
        rerank_distances=None,
    )
    queries = [gallery[0], gallery[0], gallery[1]]  # the same path twice
    rows = result_rows(queries, None, hits, gallery, None)
    assert [r["query_row"] for r in rows] == [0, 0, 1, 1, 2, 2]
    for limit, shown in [(0, 3), (2, 2), (5, 3)]:
        write_html(rows, str(tmp_path / "p.html"), "t", max_queries=limit, listed_in="r.csv")
        text = (tmp_path / "p.html").read_text()
        page = Images()
        page.feed(text)
        assert len(page.sources) == shown * (1 + 2)
        assert text.count('<div class="row">') == shown
        note = "3 queries, the first 2 shown (all in r.csv)"
        assert (note in text) == (shown < 3)


def test_a_negative_page_size_is_one_line(tmp_path, capsys):
    status, _, err = cli(
        capsys, "search", tmp_path / "x.index", "--out", tmp_path / "r.csv", "--html-queries", "-1"
    )
    assert status == 2
    assert err.strip().splitlines() == ["error: --html-queries -1: expected 0 (all) or more"], err


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exports_equal_pytorch(ckpt, tmp_path, fmt):
    pytest.importorskip("onnxruntime") if fmt == "onnx" else None
    path = tmp_path / f"model.{fmt}"
    out = dml("export", ckpt, "--format", fmt, "--out", path)
    assert out.returncode == 0, out.stderr[-2000:]
    info = json.load(open(f"{path}.json"))
    assert info["dim"] == 64 and info["max_abs_diff_vs_pytorch"] <= 1e-4
    embedder = Embedder.from_checkpoint(ckpt, device="cpu")
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    expected = embedder.embed_tensors(images).numpy()
    if fmt == "torchscript":
        got = torch.jit.load(str(path))(images).detach().numpy()
    else:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {"images": images.numpy()})[0]
    assert np.abs(got - expected).max() <= 1e-4


def test_bad_inputs_are_one_line_naming_the_file_and_write_nothing(ckpt, tmp_path, capsys):
    """In this process, through what ``python -m dml`` calls (``dml.inference.cli.main``);
    tests/test_untrusted_inputs.py runs the same line through a subprocess."""
    from dml.inference.cli import main

    out_file = tmp_path / "out.npz"

    def fails(*args, says):
        status = main([str(a) for a in args])
        lines = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and len(lines) == 1 and says in lines[0], lines
        return lines[0]

    fails(
        "embed",
        tmp_path / "none.ckpt",
        "--split",
        "test",
        "--out",
        out_file,
        says="none.ckpt: no such checkpoint",
    )
    (tmp_path / "bad.ckpt").write_bytes(b"garbage")
    fails(
        "embed",
        tmp_path / "bad.ckpt",
        "--split",
        "test",
        "--out",
        out_file,
        says="bad.ckpt: not a readable checkpoint",
    )
    os.makedirs(tmp_path / "empty")
    fails(
        "embed",
        ckpt,
        "--images",
        tmp_path / "empty",
        "--out",
        out_file,
        says="empty: no image files",
    )
    assert not out_file.exists()
    other = clustered_rows(200, dim=16)  # the checkpoint embeds into 64-d
    SearchIndex.build(other).save(str(tmp_path / "d16.index"))
    write_images(tmp_path / "q", n=1)
    fails(
        "search",
        tmp_path / "d16.index",
        "--images",
        tmp_path / "q",
        "--ckpt",
        ckpt,
        "--out",
        tmp_path / "r.json",
        says="embeds into 64-d, the index",
    )
    other.save(str(tmp_path / "d16.npz"))
    SearchIndex.build(clustered_rows(200)).save(str(tmp_path / "d32.index"))  # 32-d
    fails(
        "search",
        tmp_path / "d32.index",
        "--embeddings",
        tmp_path / "d16.npz",
        "--out",
        tmp_path / "r.json",
        says="16-d embeddings, the index holds 32-d",
    )
    os.remove(tmp_path / "d32.index.rows.npz")
    fails(
        "search",
        tmp_path / "d32.index",
        "--embeddings",
        tmp_path / "d16.npz",
        "--out",
        tmp_path / "r.json",
        says="its rows file",
    )
    assert not (tmp_path / "r.json").exists()


OMNIGLOT = os.path.join(REPO, "..", "shared", "data", "omniglot")


@pytest.mark.skipif(not os.path.isdir(OMNIGLOT), reason="../shared/data/omniglot is absent")
def test_a_split_of_another_data_set_embeds_with_its_own_settings(ckpt, tmp_path):
    out = dml(
        "embed",
        ckpt,
        "--split",
        "test",
        "--dataset",
        "omniglot_small",
        "--root",
        OMNIGLOT,
        "--out",
        tmp_path / "o.npz",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = EmbeddingSet.load(str(tmp_path / "o.npz"))
    assert len(rows) == 2120 and len(np.unique(rows.labels)) == 106  # small2's 3 alphabets
    assert rows.meta["dataset"] == "OmniglotDataModule" and rows.paths[0].endswith(".png")


NETWORKS = {  # backbone config, pooling
    "small_cnn-gsp": ({"name": "small_cnn", "width": 8}, "gsp"),
    "vit-cls": (
        {
            "name": "timm:vit_small_patch16_224.dino",
            "timm_args": {
                "img_size": 32,
                "patch_size": 8,
                "embed_dim": 48,
                "depth": 2,
                "num_heads": 3,
            },
        },
        "cls",
    ),
    "vit-gsp": (
        {
            "name": "timm:vit_small_patch16_224.dino",
            "timm_args": {
                "img_size": 32,
                "patch_size": 8,
                "embed_dim": 48,
                "depth": 2,
                "num_heads": 3,
            },
        },
        "gsp",
    ),
}


@pytest.mark.parametrize("network", sorted(NETWORKS))
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_networks_export_and_agree_with_pytorch(tmp_path, fmt, network):
    """GSP's solver stops when converged and has a custom backward: the export runs it as plain
    ops for all its iterations; a timm ViT exports with its class token (cls) or its patch-token
    grid (GSP). Each export agrees with the PyTorch model on other inputs and batch sizes."""
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    backbone, pooling = NETWORKS[network]
    if backbone["name"].startswith("timm:"):
        pytest.importorskip("timm")
    from dml.inference import export
    from dml.module import BackboneConfig, DMLModule, LossConfig, PoolingConfig

    torch.manual_seed(0)
    module = DMLModule(
        backbone=BackboneConfig(pretrained=False, **backbone),
        pooling=PoolingConfig(pooling, {"num_prototypes": 4} if pooling == "gsp" else {}),
        embedding_dim=16,
        num_classes=10,
        loss=LossConfig("contrastive"),
    )
    if pooling == "gsp":
        module.pooling.initialize(torch.randn(40, 16))
    torch.save(
        {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)},
        tmp_path / "net.ckpt",
    )
    embedder = Embedder.from_checkpoint(str(tmp_path / "net.ckpt"), device="cpu")
    info = export(embedder, fmt, str(tmp_path / f"net.{fmt}"), batch=3)
    assert info["max_abs_diff_vs_pytorch"] <= 1e-4
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    expected = embedder.embed_tensors(images).numpy()
    if fmt == "torchscript":
        got = torch.jit.load(str(tmp_path / "net.torchscript"))(images).detach().numpy()
    else:
        import onnxruntime

        session = onnxruntime.InferenceSession(
            str(tmp_path / "net.onnx"), providers=["CPUExecutionProvider"]
        )
        got = session.run(None, {"images": images.numpy()})[0]
    assert np.abs(got - expected).max() <= 1e-4
