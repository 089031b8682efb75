"""DataModules on small trees written in the official formats, and on the real Omniglot subsets."""

import json
import os
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from dml.data import (
    CarsDataModule,
    CUBDataModule,
    DatasetNotFound,
    IncompleteDataset,
    InShopDataModule,
    MetadataError,
    OmniglotDataModule,
    SOPDataModule,
    UnreadableImageError,
    mlrc_fold_mask,
)
from dml.data import check as data_check
from dml.data import download as data_download
from dml.errors import ConfigError

OMNIGLOT = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "omniglot")
needs_omniglot = pytest.mark.skipif(
    not os.path.isdir(OMNIGLOT), reason="../shared/data/omniglot is absent"
)


def jpeg(path, seed=0, size=(50, 40)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def small(cls, root, **kw):
    kw.setdefault("verify", False)
    return cls(root=str(root), num_workers=0, crop=32, resize=36, **kw)


# --- CUB ----------------------------------------------------------------------------------
def make_cub(root, classes=(1, 2, 3, 101, 102, 103), per_class=3):
    base = root / "CUB_200_2011"
    images, labels, names = [], [], []
    image_id = 0
    for c in classes:
        folder = f"{c:03d}.Bird_{c}"
        names.append(f"{c} {folder}")
        for j in range(per_class):
            image_id += 1
            rel = f"{folder}/Bird_{c}_{j:04d}.jpg"
            jpeg(str(base / "images" / rel), seed=image_id)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c}")
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (base / "classes.txt").write_text("\n".join(names) + "\n")
    return base


def test_cub_splits_labels_and_items(tmp_path):
    make_cub(tmp_path)
    dm = small(CUBDataModule, tmp_path)
    assert dm.split_sizes() == {
        "dataset": "cub",
        "train_images": 9,
        "train_classes": 3,
        "test_images": 9,
        "test_classes": 3,
    }
    assert set(dm.splits["train"].labels) == {1, 2, 3}
    assert set(dm.splits["test"].labels) == {101, 102, 103}
    train = dm.train_dataset
    assert sorted(set(train.labels.tolist())) == [0, 1, 2]  # contiguous ids
    image, label, index = train[4]
    assert image.shape == (3, 32, 32) and label == 1 and index == 4
    test = dm.eval_datasets["test"]
    assert sorted(set(test.labels.tolist())) == [0, 1, 2]
    assert test.paths[0].endswith("101.Bird_101/Bird_101_0000.jpg")
    assert dm.recall_ks == [1, 2, 4, 8]


def test_cub_incomplete_archive_is_reported(tmp_path):
    make_cub(tmp_path)
    with pytest.raises(IncompleteDataset, match="5864 images in 100 classes, found 9 in 3"):
        _ = small(CUBDataModule, tmp_path, verify=True).splits


def test_missing_image_file_is_reported(tmp_path, monkeypatch):
    base = make_cub(tmp_path)
    os.remove(base / "images" / "002.Bird_2" / "Bird_2_0001.jpg")
    monkeypatch.setattr(CUBDataModule, "expected", {"train": (9, 3), "test": (9, 3)})
    with pytest.raises(IncompleteDataset, match="Bird_2_0001.jpg"):
        _ = small(CUBDataModule, tmp_path, verify=True).splits


def test_malformed_metadata_line_names_file_and_line(tmp_path):
    base = make_cub(tmp_path)
    lines = (base / "image_class_labels.txt").read_text().splitlines()
    lines[4] = "5 two"
    (base / "image_class_labels.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(MetadataError, match=r"image_class_labels.txt, line 5: class_id"):
        _ = small(CUBDataModule, tmp_path).splits
    lines[4] = "5"
    (base / "image_class_labels.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(MetadataError, match=r"image_class_labels.txt, line 5: expected 2"):
        _ = small(CUBDataModule, tmp_path).splits


def test_missing_folder_says_where_to_get_the_data(tmp_path):
    with pytest.raises(DatasetNotFound, match="make data DATASET=cub"):
        _ = small(CUBDataModule, tmp_path / "nowhere").splits
    with pytest.raises(DatasetNotFound, match="cars_annos.mat"):
        _ = small(CarsDataModule, tmp_path).splits


def test_unreadable_image_names_the_file_or_is_skipped(tmp_path):
    base = make_cub(tmp_path)
    bad = base / "images" / "001.Bird_1" / "Bird_1_0001.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    dm = small(CUBDataModule, tmp_path)
    with pytest.raises(UnreadableImageError, match="Bird_1_0001.jpg"):
        dm.train_dataset[1]
    dm = small(CUBDataModule, tmp_path, skip_unreadable=True)
    dm.setup("fit")
    images, labels, _ = next(iter(dm._eval_loader(dm.train_dataset)))
    assert len(labels) == 8
    for _ in range(3):  # read again: still one file, named
        dm.train_dataset[1]
    assert dm.unreadable_files() == [str(bad)]


# --- Cars196 ------------------------------------------------------------------------------
def make_cars(root, classes=(1, 2, 99, 100), per_class=3):
    from scipy.io import savemat

    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    records = np.zeros((1, len(classes) * per_class), dtype=[(f, "O") for f in fields])
    i = 0
    for c in classes:
        for j in range(per_class):
            rel = f"car_ims/{i + 1:06d}.jpg"
            jpeg(str(root / rel), seed=i)
            # the .mat's own train/test flag disagrees with the DML class split on purpose
            records[0, i] = (
                np.array([rel]),
                np.array([[1]]),
                np.array([[2]]),
                np.array([[30]]),
                np.array([[20]]),
                np.array([[c]], np.uint8),
                np.array([[j % 2]], np.uint8),
            )
            i += 1
    savemat(str(root / "cars_annos.mat"), {"annotations": records})


def test_cars_reads_the_mat_file_and_splits_by_class(tmp_path):
    make_cars(tmp_path)
    dm = small(CarsDataModule, tmp_path)
    assert set(dm.splits["train"].labels) == {1, 2}
    assert set(dm.splits["test"].labels) == {99, 100}
    assert dm.splits["train"].paths[0].endswith("car_ims/000001.jpg")
    assert dm.train_dataset[0][0].shape == (3, 32, 32)


def test_cars_unreadable_mat_is_a_clear_error(tmp_path):
    (tmp_path / "cars_annos.mat").write_bytes(b"garbage")
    with pytest.raises(MetadataError, match="cars_annos.mat"):
        _ = small(CarsDataModule, tmp_path).splits


# --- SOP ----------------------------------------------------------------------------------
def make_sop(root):
    base = root / "Stanford_Online_Products"
    header = "image_id class_id super_class_id path"
    for name, classes in (("Ebay_train.txt", (1, 2, 3)), ("Ebay_test.txt", (11319, 11320))):
        rows, image_id = [header], 0
        for c in classes:
            for j in range(2 + c % 2):
                image_id += 1
                rel = f"bicycle_final/{c}_{j}.JPG"
                jpeg(str(base / rel), seed=image_id)
                rows.append(f"{image_id} {c} 1 {rel}")
        (base / name).write_text("\n".join(rows) + "\n")
    return base


def test_sop_parses_both_files(tmp_path):
    make_sop(tmp_path)
    dm = small(SOPDataModule, tmp_path)
    sizes = dm.split_sizes()
    assert (sizes["train_classes"], sizes["test_classes"]) == (3, 2)
    assert sizes["train_images"] == 3 + 2 + 3 and sizes["test_images"] == 3 + 2
    assert dm.recall_ks == [1, 10, 100, 1000]


def test_sop_bad_header_is_reported(tmp_path):
    base = make_sop(tmp_path)
    text = (base / "Ebay_test.txt").read_text().replace("super_class_id", "superclass")
    (base / "Ebay_test.txt").write_text(text)
    with pytest.raises(MetadataError, match="Ebay_test.txt, line 1"):
        _ = small(SOPDataModule, tmp_path).splits


# --- In-Shop ------------------------------------------------------------------------------
def make_inshop(root):
    rows = []
    for item, status, n in (
        (1, "train", 3),
        (2, "train", 2),
        (7, "query", 2),
        (7, "gallery", 2),
        (8, "query", 1),
        (8, "gallery", 3),
    ):
        for j in range(n):
            rel = f"img/WOMEN/Dresses/id_{item:08d}/{status}_{j}_front.jpg"
            jpeg(str(root / rel), seed=len(rows))
            rows.append(f"{rel} id_{item:08d} {status}")
    (root / "Eval").mkdir()
    text = f"{len(rows)}\nimage_name item_id evaluation_status\n" + "\n".join(rows) + "\n"
    (root / "Eval" / "list_eval_partition.txt").write_text(text)


def test_inshop_query_gallery_membership(tmp_path):
    make_inshop(tmp_path)
    dm = small(InShopDataModule, tmp_path)
    assert dm.split_sizes() == {
        "dataset": "inshop",
        "train_images": 5,
        "train_classes": 2,
        "test_images": 8,
        "test_classes": 2,
        "query_images": 3,
        "gallery_images": 5,
    }
    sets = dm.eval_datasets
    assert set(sets) == {"query", "gallery"} and dm.protocol(sets) == "query_gallery"
    assert all("query" in p for p in sets["query"].paths)
    assert all("gallery" in p for p in sets["gallery"].paths)
    # query and gallery share one label space (item 7 -> same id in both)
    q_item7 = sets["query"].labels[[("id_00000007" in p) for p in sets["query"].paths]]
    g_item7 = sets["gallery"].labels[[("id_00000007" in p) for p in sets["gallery"].paths]]
    assert len(set(q_item7)) == 1 and set(q_item7) == set(g_item7)
    assert dm.recall_ks == [1, 10, 20, 30, 40]
    assert len(dm.val_dataloader()) == 2


def test_inshop_count_line_must_match(tmp_path):
    make_inshop(tmp_path)
    path = tmp_path / "Eval" / "list_eval_partition.txt"
    path.write_text("99\n" + path.read_text().split("\n", 1)[1])
    with pytest.raises(MetadataError, match="line 1: announces 99 images"):
        _ = small(InShopDataModule, tmp_path).splits


# --- MLRC folds ---------------------------------------------------------------------------
def test_mlrc_folds_are_class_disjoint_and_cover_the_training_classes():
    labels = np.repeat(np.arange(1, 11), 3)
    masks = [mlrc_fold_mask(labels, f) for f in range(4)]
    assert np.array_equal(np.sum(masks, axis=0), np.ones(len(labels)))
    fold_classes = [set(labels[m]) for m in masks]
    assert all(len(fold_classes[a] & fold_classes[b]) == 0 for a in range(4) for b in range(a))
    with pytest.raises(ValueError, match="mlrc_fold"):
        mlrc_fold_mask(labels, 4)


def test_mlrc_fold_trains_on_three_folds_validates_on_one_tests_untouched(tmp_path):
    make_cub(tmp_path, classes=(1, 2, 3, 4, 5, 6, 7, 8, 101, 102), per_class=2)
    dm = small(CUBDataModule, tmp_path, mlrc_fold=1)
    train_files = set(dm.train_dataset.paths)
    val_files = set(dm.val_datasets["test"].paths)
    assert not train_files & val_files
    assert len(train_files) + len(val_files) == 16
    assert dm.num_train_classes == 6
    assert set(dm.eval_datasets["test"].paths) == set(dm.splits["test"].paths)


def test_unreadable_files_are_named_once_across_loader_workers(tmp_path):
    base = make_cub(tmp_path, per_class=6)
    bad = [
        base / "images" / "001.Bird_1" / "Bird_1_0002.jpg",
        base / "images" / "102.Bird_102" / "Bird_102_0004.jpg",
    ]
    for path in bad:
        path.write_bytes(b"\xff\xd8 truncated")
    dm = CUBDataModule(
        root=str(tmp_path),
        verify=False,
        num_workers=2,
        crop=32,
        resize=36,
        skip_unreadable=True,
        classes_per_batch=3,
        samples_per_class=2,
    )
    dm.setup("fit")
    for _ in range(2):  # two epochs: each file fails twice, in worker processes
        for loader in [dm.train_dataloader(), *dm.val_dataloader()]:
            for _ in loader:
                pass
    assert dm.unreadable_files() == sorted(str(p) for p in bad)
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image file\(s\): .*Bird_1_0002"):
        dm.teardown("fit")


# --- the check and download commands -------------------------------------------------------
def test_data_check_decode_lists_the_unreadable_images(tmp_path, capsys):
    base = make_cub(tmp_path)
    assert data_check.main(["cub", str(tmp_path), "--no-verify", "--decode", "--workers", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["unreadable"] == 0
    bad = base / "images" / "101.Bird_101" / "Bird_101_0001.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # a truncated JPEG: the parse alone passes it
    assert data_check.main(["cub", str(tmp_path), "--no-verify"]) == 0
    capsys.readouterr()
    assert data_check.main(["cub", str(tmp_path), "--no-verify", "--decode", "--workers", "2"]) == 1
    captured = capsys.readouterr()
    assert f"1 unreadable image(s): {bad}" in captured.err
    assert json.loads(captured.out)["unreadable"] == 1


def test_omniglot_configs_default_to_where_make_data_puts_them():
    # `make data DATASET=omniglot` downloads into data/omniglot (both subsets); the tests
    # point at ../shared themselves
    import yaml

    for name in ("omniglot", "omniglot_small"):
        with open(f"experiments/data/{name}.yaml") as f:
            assert yaml.safe_load(f)["data"]["init_args"]["root"] == "data/omniglot", name


def test_data_check_prints_one_json_line(tmp_path, capsys):
    make_inshop(tmp_path)
    assert data_check.main(["inshop", str(tmp_path), "--no-verify"]) == 0
    out = json.loads(capsys.readouterr().out.strip())
    assert out["query_images"] == 3 and out["gallery_images"] == 5
    assert data_check.main(["inshop", str(tmp_path)]) == 1  # published counts do not hold
    assert "25882" in capsys.readouterr().err


def test_download_verifies_the_checksum_and_unpacks(tmp_path, monkeypatch):
    import hashlib
    import tarfile

    payload = tmp_path / "payload.tgz"
    make_cub(tmp_path / "src")
    with tarfile.open(payload, "w:gz") as tar:
        tar.add(tmp_path / "src" / "CUB_200_2011", arcname="CUB_200_2011")
    md5 = hashlib.md5(payload.read_bytes()).hexdigest()

    def fake_download(url, root, filename, md5_expected):
        data = payload.read_bytes()
        if hashlib.md5(data).hexdigest() != md5_expected:
            raise RuntimeError("File not found or corrupted.")
        (tmp_path / "out" / filename).write_bytes(data)

    import torchvision.datasets.utils as tvu

    monkeypatch.setattr(tvu, "download_url", fake_download)
    monkeypatch.setitem(data_download.DOWNLOADS, "cub", [("https://x/CUB.tgz", "CUB.tgz", md5)])
    assert data_download.main(["cub", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "CUB_200_2011" / "images.txt").is_file()
    monkeypatch.setitem(data_download.DOWNLOADS, "cub", [("https://x/CUB.tgz", "C2.tgz", "0" * 32)])
    assert data_download.main(["cub", str(tmp_path / "out")]) == 1


def test_a_failed_download_names_the_url_file_checksum_and_the_manual_route(
    tmp_path, monkeypatch, capsys
):
    import urllib.error

    import torchvision.datasets.utils as tvu

    def offline(url, root, filename, md5):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tvu, "download_url", offline)
    root = tmp_path / "cub"
    assert data_download.main(["cub", str(root)]) == 1
    err = capsys.readouterr().err
    url, filename, md5 = data_download.DOWNLOADS["cub"][0]
    assert "downloading cub failed" in err and "name resolution" in err
    assert url in err and str(root / filename) in err and md5 in err
    assert f"make data DATASET=cub DATA_ROOT={root}" in err
    # a file put in place by hand with the wrong content: named, with both checksums
    (root / filename).write_bytes(b"not the archive")
    assert data_download.main(["cub", str(root)]) == 1
    err = capsys.readouterr().err
    assert f"{root / filename}: its MD5 is " in err and f"not {md5}" in err


def test_datasets_without_public_download_print_guidance(capsys):
    assert data_download.main(["cars"]) == 2
    assert "cars_annos.mat" in capsys.readouterr().out


# --- Omniglot (real data) -----------------------------------------------------------------
@needs_omniglot
def test_omniglot_small_subsets_published_split():
    dm = OmniglotDataModule(root=OMNIGLOT, subset="small", verify=True)
    assert dm.split_sizes() == {
        "dataset": "omniglot-small",
        "train_images": 2720,
        "train_classes": 136,
        "test_images": 2120,
        "test_classes": 106,
    }
    test_alphabets = {p.split("/")[1] for p in dm.splits["test"].paths}
    assert test_alphabets == {"Japanese_(katakana)", "Sanskrit", "Tagalog"}
    image, label, index = dm.train_dataset[0]
    assert image.shape == (3, 64, 64) and label == 0
    # one-bit strokes on white: after RGB conversion and normalisation, two grey levels
    assert torch.unique(dm.eval_datasets["test"][0][0][0].round(decimals=3)).numel() > 1


@needs_omniglot
def test_omniglot_zip_with_bad_layout(tmp_path):
    with zipfile.ZipFile(tmp_path / "images_background.zip", "w") as z:
        z.writestr("images_background/Latin/a.png", b"")
    with zipfile.ZipFile(tmp_path / "images_evaluation.zip", "w") as z:
        z.writestr("images_evaluation/x/character01/1_01.png", b"")
    with pytest.raises(MetadataError, match="Latin/a.png"):
        _ = OmniglotDataModule(root=str(tmp_path), verify=False).splits


@needs_omniglot
def test_short_training_on_omniglot_small1_generalises_to_unseen_alphabets(tmp_path):
    import pytorch_lightning as pl

    from dml.module import BackboneConfig, DMLModule, OptimizerConfig

    pl.seed_everything(0)
    dm = OmniglotDataModule(
        root=OMNIGLOT,
        subset="small",
        crop=32,
        resize=32,
        classes_per_batch=16,
        samples_per_class=4,
        eval_batch_size=512,
    )
    module = DMLModule(
        backbone=BackboneConfig("small_cnn", pretrained=False, width=16),
        embedding_dim=64,
        optimizer=OptimizerConfig(lr=2e-3),
        num_classes=dm.num_train_classes,
    )
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=-1,
        use_distributed_sampler=False,
    )
    trainer.fit(module, dm)
    before, after = module.initial_metrics, module.last_metrics
    print(
        f"omniglot small1 -> unseen alphabets: R@1 {before['R@1']:.3f} -> {after['R@1']:.3f}, "
        f"MAP@R {before['MAP@R']:.3f} -> {after['MAP@R']:.3f}"
    )
    assert after["R@1"] > before["R@1"] + 0.2
    assert after["MAP@R"] > 2 * before["MAP@R"]


# --- augmentation seeds ---------------------------------------------------------------------------
def training_batches(dm, epoch, count=3):
    loader = dm.train_dataloader()
    loader.batch_sampler.set_epoch(epoch)
    return [batch for _, batch in zip(range(count), loader)]


def test_training_crops_depend_on_seed_epoch_and_position_not_on_workers_or_rng(tmp_path):
    """A resumed run (fresh loader, other global RNG state) and a run with loader workers see
    the same random crops and flips as the run they continue."""
    make_cub(tmp_path, per_class=6)
    dm = small(
        CUBDataModule, tmp_path, classes_per_batch=2, samples_per_class=3, crop_scale=(0.2, 1.0)
    )
    dm.setup("fit")
    torch.manual_seed(0)
    first = training_batches(dm, epoch=1)
    torch.manual_seed(123)  # another global stream: what a resumed process has
    again = training_batches(dm, epoch=1)
    dm.num_workers = 2
    with_workers = training_batches(dm, epoch=1)
    for a, b, c in zip(first, again, with_workers):
        assert torch.equal(a[0], b[0]) and torch.equal(a[0], c[0])
        assert torch.equal(a[2], b[2]) and torch.equal(a[2], c[2])
    dm.num_workers = 0
    # the crops are random: the same images in another epoch or batch position differ
    other = training_batches(dm, epoch=2)
    assert not any(torch.equal(a[0], b[0]) for a, b in zip(first, other))
    images = first[0][0]
    same_file = [
        (i, j) for i in range(len(images)) for j in range(i) if first[0][2][i] == first[0][2][j]
    ]
    assert all(not torch.equal(images[i], images[j]) for i, j in same_file)


# --- decode on the device ---------------------------------------------------------------------
def photo_like(path, seed, size=(96, 72)):
    """A smooth image (JPEG artefacts and interpolation stay small on it)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]] / max(size)
    a, b, c = rng.uniform(1, 4, 3)
    pixels = np.stack([np.sin(a * x + b * y), np.cos(b * x - c * y), np.sin(c * x * y + a)], -1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray((127.5 * (pixels + 1)).astype(np.uint8)).save(path, quality=95)


def test_decoding_on_the_device_matches_the_pil_path(tmp_path):
    """decode: device on a CPU: the same crops and flips as the PIL pipeline (same seed), pixels
    equal up to JPEG decoding and interpolation differences; the loop's batches too."""
    from dml.data.device_decode import eval_view, normalize, train_view
    from dml.data.transforms import eval_transform, train_transform

    path = str(tmp_path / "img.jpg")
    photo_like(path, 0)
    data = torch.frombuffer(bytearray(open(path, "rb").read()), dtype=torch.uint8)
    from torchvision.io import ImageReadMode, decode_jpeg

    img = decode_jpeg(data, mode=ImageReadMode.RGB)
    pil = Image.open(path).convert("RGB")
    pil_train = train_transform(48, True, (0.2, 1.0))
    for seed in range(12):
        torch.manual_seed(seed)
        expected = pil_train(pil)
        got = normalize([train_view(img, seed, 48, (0.2, 1.0), True)])[0]
        assert got.shape == expected.shape
        assert (got - expected).abs().mean() < 0.02, (
            seed
        )  # normalised units; another seed's crop: 0.26-0.62
    expected = eval_transform(48, 56)(pil)
    got = normalize([eval_view(img, 48, 56)])[0]
    assert (got - expected).abs().mean() < 0.02

    make_cub(tmp_path / "cub", per_class=4)
    for folder in (tmp_path / "cub" / "CUB_200_2011" / "images").iterdir():
        for f in sorted(folder.iterdir()):
            photo_like(str(f), hash(f.name) % 1000)
    kwargs = dict(classes_per_batch=2, samples_per_class=2, crop_scale=(0.3, 1.0))
    pil_dm = small(CUBDataModule, tmp_path / "cub", **kwargs)
    device_dm = small(CUBDataModule, tmp_path / "cub", decode="device", **kwargs)
    for dm in (pil_dm, device_dm):
        dm.setup("fit")
    for a, b in zip(training_batches(pil_dm, 0, 2), training_batches(device_dm, 0, 2)):
        images, labels, indices = device_dm.device_batch(b, torch.device("cpu"))
        assert torch.equal(labels, a[1]) and torch.equal(indices, a[2])
        assert images.shape == a[0].shape and (images - a[0]).abs().mean() < 0.02
    test = next(iter(device_dm.val_dataloader()[0]))
    images, _, _ = device_dm.device_batch(test, torch.device("cpu"))
    reference = next(iter(pil_dm.val_dataloader()[0]))[0]
    assert (images - reference).abs().mean() < 0.02
    with pytest.raises(ConfigError, match="data.init_args.decode"):
        small(CUBDataModule, tmp_path / "cub", decode="gpu")


# --- EXIF orientation and unreadable images on every path ----------------------------------
def rotated_photo(path, size=(96, 48)):
    """A landscape photo stored with EXIF orientation 6 ("rotate 90 degrees clockwise to
    view"): a viewer shows it as the portrait ``stored.transpose(ROTATE_270)``. Returns the
    upright image as a viewer shows it."""
    y, x = np.mgrid[0 : size[1], 0 : size[0]] / max(size)
    pixels = np.stack([np.sin(3 * x + y), x * np.ones_like(y), y * np.ones_like(x)], -1)
    stored = Image.fromarray((255 * (pixels - pixels.min()) / np.ptp(pixels)).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    os.makedirs(os.path.dirname(path), exist_ok=True)
    stored.save(path, quality=95, exif=exif.tobytes())
    return stored.transpose(Image.Transpose.ROTATE_270)


@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_a_photo_is_embedded_as_a_viewer_shows_it(tmp_path, decode):
    from dml.data.transforms import eval_transform

    base = make_cub(tmp_path)
    path = base / "images" / "101.Bird_101" / "Bird_101_0000.jpg"
    upright = rotated_photo(str(path))
    assert upright.size == (48, 96)
    dm = small(CUBDataModule, tmp_path, decode=decode)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()[0]))
    images, _, indices = dm.device_batch(batch, torch.device("cpu"))
    got = images[indices.tolist().index(0)]
    expected = eval_transform(32, 36)(upright)
    as_stored = eval_transform(32, 36)(Image.open(path).convert("RGB"))
    # pixels equal up to JPEG decoding and interpolation; far from the unrotated image
    assert (got - expected).abs().mean() < 0.05
    assert (got - as_stored).abs().mean() > 0.3


def test_embed_and_thumbnails_turn_photos_upright(tmp_path):
    import base64
    import io

    from dml.data.transforms import eval_transform
    from dml.inference.embedder import ImageFiles
    from dml.inference.report import thumbnail

    path = str(tmp_path / "photo.jpg")
    upright = rotated_photo(path)
    image, _ = ImageFiles([path], eval_transform(32, 36))[0]
    assert (image - eval_transform(32, 36)(upright)).abs().mean() < 0.05
    uri = thumbnail(path, size=40)
    shown = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert shown.size == (20, 40)  # portrait, as the photo is shown


@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_every_kind_of_unreadable_image_is_skipped_and_named_once(tmp_path, decode):
    """A truncated JPEG, an empty file, a missing file and a text file, on both decoders."""
    base = make_cub(tmp_path)
    folder = base / "images" / "102.Bird_102"
    truncated, empty, missing = (folder / f"Bird_102_{j:04d}.jpg" for j in range(3))
    truncated.write_bytes(open(truncated, "rb").read()[:200])
    empty.write_bytes(b"")
    missing.unlink()
    text = base / "images" / "103.Bird_103" / "Bird_103_0000.jpg"
    text.write_text("not an image")
    bad = sorted(str(p) for p in (truncated, empty, missing, text))
    dm = small(CUBDataModule, tmp_path, decode=decode)
    dm.setup("test")
    with pytest.raises(UnreadableImageError, match="Bird_10[23]_000[0-2].jpg"):
        for batch in dm.test_dataloader()[0]:
            dm.device_batch(batch, torch.device("cpu"))
    dm = small(CUBDataModule, tmp_path, decode=decode, skip_unreadable=True)
    dm.setup("test")
    for _ in range(2):  # twice: still named once
        rows = []
        for batch in dm.test_dataloader()[0]:
            images, labels, indices = dm.device_batch(batch, torch.device("cpu"))
            assert len(images) == len(labels) == len(indices)
            rows += indices.tolist()
    assert sorted(rows) == [0, 1, 2, 7, 8]  # of 9 test images, 4 unreadable
    assert dm.unreadable_files() == bad
