"""Parsers of the official archive layouts of the DML benchmarks (docs/data.md).

Each parser reads the metadata only (no image is opened) and returns ``ImageList`` splits keyed
"train" and "test", or "train", "query" and "gallery" (In-Shop). Malformed metadata raises
``MetadataError`` with the file and line number; a missing folder raises ``DatasetNotFound``
with where to get the data.
"""

from __future__ import annotations

import os
import re
import zipfile
from typing import Dict, List, Tuple

import numpy as np

from dml.data.image_list import ImageList
from dml.errors import ConfigError


class MetadataError(ValueError):
    pass


class DatasetNotFound(FileNotFoundError):
    pass


class IncompleteDataset(RuntimeError):
    pass


def _rows(path: str, n_fields: int, skip: int = 0) -> List[Tuple[int, List[str]]]:
    """(line number, fields) of a whitespace-separated text file, after ``skip`` header lines."""
    if not os.path.isfile(path):
        raise DatasetNotFound(f"missing metadata file {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if lineno <= skip or not line.strip():
                continue
            fields = line.split()
            if len(fields) != n_fields:
                raise MetadataError(
                    f"{path}, line {lineno}: expected {n_fields} fields, got "
                    f"{len(fields)}: {line.rstrip()!r}"
                )
            rows.append((lineno, fields))
    return rows


def _int(path: str, lineno: int, value: str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise MetadataError(
            f"{path}, line {lineno}: {what} must be an integer, got {value!r}"
        ) from None


# --- CUB-200-2011 ---------------------------------------------------------------------------
def parse_cub(root: str) -> Dict[str, ImageList]:
    """``CUB_200_2011/images.txt`` + ``image_class_labels.txt``; classes 1-100 train, 101-200
    test."""
    base = os.path.join(root, "CUB_200_2011")
    if not os.path.isdir(base):
        base = root if os.path.isfile(os.path.join(root, "images.txt")) else base
    images_txt = os.path.join(base, "images.txt")
    labels_txt = os.path.join(base, "image_class_labels.txt")
    paths = {}
    for lineno, (image_id, rel) in _rows(images_txt, 2):
        iid = _once(paths, _int(images_txt, lineno, image_id, "image_id"), images_txt, lineno)
        paths[iid] = os.path.join(base, "images", rel)
    labels = {}
    for lineno, (image_id, class_id) in _rows(labels_txt, 2):
        iid = _once(labels, _int(labels_txt, lineno, image_id, "image_id"), labels_txt, lineno)
        if iid not in paths:
            raise MetadataError(
                f"{labels_txt}, line {lineno}: image_id {iid} is not in {images_txt}"
            )
        labels[iid] = _in_range(
            _int(labels_txt, lineno, class_id, "class_id"), 1, 200, labels_txt, lineno, "class_id"
        )
    missing = sorted(set(paths) - set(labels))
    if missing:
        raise MetadataError(f"{labels_txt}: no class for image_id(s) {missing[:5]}")
    ids = sorted(paths)
    all_images = ImageList([paths[i] for i in ids], np.array([labels[i] for i in ids]))
    return {
        "train": all_images.subset(all_images.labels <= 100),
        "test": all_images.subset(all_images.labels > 100),
    }


def _once(seen, key: int, path: str, lineno: int) -> int:
    """``key``, or a MetadataError if ``seen`` already holds it (a duplicate id)."""
    if key in seen:
        raise MetadataError(f"{path}, line {lineno}: image_id {key} appears twice")
    return key


def _in_range(value: int, low: int, high: int, path: str, lineno: int, what: str) -> int:
    if not low <= value <= high:
        raise MetadataError(f"{path}, line {lineno}: {what} must be in {low}..{high}, got {value}")
    return value


# --- Cars196 --------------------------------------------------------------------------------
def parse_cars(root: str) -> Dict[str, ImageList]:
    """``cars_annos.mat`` (relative_im_path, class, test, bbox) + ``car_ims/``; classes 1-98
    train, 99-196 test (the DML split ignores the .mat's own train/test flag)."""
    mat_path = os.path.join(root, "cars_annos.mat")
    if not os.path.isfile(mat_path):
        raise DatasetNotFound(f"missing {mat_path}")
    from scipy.io import loadmat

    try:
        annotations = loadmat(mat_path)["annotations"][0]
    except Exception as error:
        raise MetadataError(
            f"{mat_path}: cannot read the 'annotations' struct ({error})"
        ) from error
    paths, labels = [], []
    for i, record in enumerate(annotations):
        try:
            rel = str(record["relative_im_path"][0])
            label = int(np.asarray(record["class"]).reshape(-1)[0])
        except Exception as error:
            raise MetadataError(
                f"{mat_path}: annotation {i} lacks relative_im_path/class ({error})"
            ) from error
        if not 1 <= label <= 196:
            raise MetadataError(f"{mat_path}: annotation {i}: class must be in 1..196, got {label}")
        paths.append(os.path.join(root, rel))
        labels.append(label)
    all_images = ImageList(paths, np.array(labels))
    return {
        "train": all_images.subset(all_images.labels <= 98),
        "test": all_images.subset(all_images.labels > 98),
    }


# --- Stanford Online Products ---------------------------------------------------------------
SOP_HEADER = ["image_id", "class_id", "super_class_id", "path"]
SOP_CLASSES = {"Ebay_train.txt": (1, 11318), "Ebay_test.txt": (11319, 22634)}


def _parse_sop_file(base: str, name: str) -> ImageList:
    path = os.path.join(base, name)
    rows = _rows(path, 4)
    if not rows or rows[0][1] != SOP_HEADER:
        raise MetadataError(f"{path}, line 1: expected the header {' '.join(SOP_HEADER)!r}")
    paths, labels, seen = [], [], {}
    low, high = SOP_CLASSES[name]
    for lineno, (image_id, class_id, _, rel) in rows[1:]:
        seen[_once(seen, _int(path, lineno, image_id, "image_id"), path, lineno)] = True
        labels.append(
            _in_range(_int(path, lineno, class_id, "class_id"), low, high, path, lineno, "class_id")
        )
        paths.append(os.path.join(base, rel))
    return ImageList(paths, np.array(labels))


def parse_sop(root: str) -> Dict[str, ImageList]:
    base = os.path.join(root, "Stanford_Online_Products")
    if not os.path.isdir(base):
        base = root if os.path.isfile(os.path.join(root, "Ebay_train.txt")) else base
    return {
        "train": _parse_sop_file(base, "Ebay_train.txt"),
        "test": _parse_sop_file(base, "Ebay_test.txt"),
    }


# --- In-Shop Clothes ------------------------------------------------------------------------
def parse_inshop(root: str) -> Dict[str, ImageList]:
    """``Eval/list_eval_partition.txt``: line 1 the count, line 2 the header
    ``image_name item_id evaluation_status``, then rows; images under ``img/``."""
    path = os.path.join(root, "Eval", "list_eval_partition.txt")
    if not os.path.isfile(path):
        raise DatasetNotFound(f"missing {path}")
    with open(path, encoding="utf-8") as f:
        first = f.readline().strip()
        header = f.readline().split()
    count = _int(path, 1, first, "the image count")
    if header != ["image_name", "item_id", "evaluation_status"]:
        raise MetadataError(
            f"{path}, line 2: expected the header 'image_name item_id "
            f"evaluation_status', got {' '.join(header)!r}"
        )
    rows = _rows(path, 3, skip=2)
    if len(rows) != count:
        raise MetadataError(f"{path}, line 1: announces {count} images, the file lists {len(rows)}")
    splits: Dict[str, Tuple[list, list]] = {
        "train": ([], []),
        "query": ([], []),
        "gallery": ([], []),
    }
    for lineno, (name, item_id, status) in rows:
        if status not in splits:
            raise MetadataError(
                f"{path}, line {lineno}: evaluation_status must be train, query "
                f"or gallery, got {status!r}"
            )
        match = re.fullmatch(r"id_0*(\d+)", item_id)
        if match is None:
            raise MetadataError(
                f"{path}, line {lineno}: item_id must look like id_00000001, got {item_id!r}"
            )
        # image_name starts with img/; it is relative to the data root.
        splits[status][0].append(os.path.join(root, name))
        splits[status][1].append(int(match.group(1)))
    return {k: ImageList(p, np.array(y)) for k, (p, y) in splits.items()}


# --- Omniglot (read from the official zip archives) ----------------------------------------
OMNIGLOT_SMALL_TEST_ALPHABETS = ("Japanese_(katakana)", "Sanskrit", "Tagalog")


def _omniglot_zip(path: str) -> ImageList:
    """Members ``<archive>/<alphabet>/characterNN/<id>_<drawer>.png``; class =
    alphabet/character."""
    if not os.path.isfile(path):
        raise DatasetNotFound(f"missing {path}")
    try:
        with zipfile.ZipFile(path) as z:
            names = sorted(n for n in z.namelist() if n.lower().endswith(".png"))
    except zipfile.BadZipFile as error:
        raise MetadataError(f"{path}: not a readable zip archive ({error})") from error
    classes: Dict[str, int] = {}
    paths, labels = [], []
    for name in names:
        parts = name.split("/")
        if len(parts) != 4:
            raise MetadataError(
                f"{path}: member {name!r} is not <archive>/<alphabet>/<character>/<file>.png"
            )
        key = f"{parts[1]}/{parts[2]}"
        labels.append(classes.setdefault(key, len(classes)))
        paths.append(name)
    return ImageList(paths, np.array(labels), archive=path)


def _alphabet_of(images: ImageList) -> np.ndarray:
    return np.array([p.split("/")[1] for p in images.paths])


def parse_omniglot(root: str, subset: str = "full") -> Dict[str, ImageList]:
    """full: images_background.zip = train, images_evaluation.zip = test.
    small: images_background_small1.zip = train; test = the alphabets of small2 that small1
    lacks (Japanese_(katakana), Sanskrit, Tagalog)."""
    if subset == "full":
        return {
            "train": _omniglot_zip(os.path.join(root, "images_background.zip")),
            "test": _omniglot_zip(os.path.join(root, "images_evaluation.zip")),
        }
    if subset == "small":
        train = _omniglot_zip(os.path.join(root, "images_background_small1.zip"))
        small2 = _omniglot_zip(os.path.join(root, "images_background_small2.zip"))
        seen = set(_alphabet_of(train))
        test = small2.subset(~np.isin(_alphabet_of(small2), list(seen)))
        return {"train": train, "test": test}
    raise ConfigError(f"data.init_args.subset: expected 'full' or 'small', got {subset!r}")
