"""DataModules of the image benchmarks: CUB-200-2011, Cars196, SOP, In-Shop and Omniglot.

All share ``ImageDataModule``: parse the official metadata (``dml.data.benchmarks``), check the
published split sizes, build the standard transforms, and optionally follow the MLRC protocol
(``mlrc_fold``: validate on one of 4 class-disjoint folds of the training classes, train on the
other 3, never look at the test split during training).
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from dml.data.benchmarks import (
    DatasetNotFound,
    IncompleteDataset,
    parse_cars,
    parse_cub,
    parse_inshop,
    parse_omniglot,
    parse_sop,
)
from dml.data.datamodule import DMLDataModule
from dml.data.device_decode import (
    UndecodableImages,
    collate_encoded,
    images_on_device,
    is_encoded_batch,
)
from dml.data.image_list import ImageList, ImageListDataset, UnreadableImageError, collate_skipping
from dml.data.transforms import eval_transform, train_transform
from dml.errors import ConfigError

MLRC_FOLDS = 4


def mlrc_fold_mask(labels: np.ndarray, fold: int, num_folds: int = MLRC_FOLDS) -> np.ndarray:
    """True for the images whose class is in validation fold ``fold``.

    The sorted training class ids are cut into ``num_folds`` contiguous, nearly equal chunks;
    fold f is chunk f. Deterministic and class-disjoint.
    """
    if not 0 <= fold < num_folds:
        raise ConfigError(
            f"data.init_args.mlrc_fold: expected 0..{num_folds - 1} or null, got {fold}"
        )
    classes = np.unique(labels)
    chunks = np.array_split(classes, num_folds)
    return np.isin(labels, chunks[fold])


class ImageDataModule(DMLDataModule):
    """Base of the image benchmarks. Args beyond ``DMLDataModule``'s:
    root: folder holding the data set as its official archive unpacks.
    crop, resize: training crop / evaluation resize then centre crop (224/256; 227 for
        the BN-Inception settings).
    hflip, crop_scale: training augmentation.
    mlrc_fold: None (validate on the test split) or 0..3 (MLRC protocol).
    verify: check the published split sizes and that every image file exists.
    skip_unreadable: skip (and count) unreadable images instead of stopping.
    decode: "cpu" (PIL in the loader workers) or "device": the workers read the files and
        the JPEGs are decoded and augmented on the training device, nvJPEG on a GPU
        (``dml.data.device_decode``; frees the CPU cores a 224 px pipeline needs).
    """

    name = "?"
    # split -> (images, classes) of the complete official data
    expected: Dict[str, Tuple[int, int]] = {}
    guidance = ""

    def __init__(
        self,
        root: str = "data",
        crop: int = 224,
        resize: int = 256,
        hflip: bool = True,
        crop_scale: Sequence[float] = (0.08, 1.0),
        mlrc_fold: Optional[int] = None,
        verify: bool = True,
        skip_unreadable: bool = False,
        classes_per_batch: int = 8,
        samples_per_class: int = 4,
        eval_batch_size: int = 128,
        num_workers: Optional[int] = None,
        recall_ks: Optional[List[int]] = None,
        batches_per_epoch: Optional[int] = None,
        seed: int = 0,
        decode: str = "cpu",
    ):
        super().__init__(
            classes_per_batch,
            samples_per_class,
            eval_batch_size,
            num_workers,
            recall_ks,
            batches_per_epoch,
            seed,
        )
        if decode not in ("cpu", "device"):
            raise ConfigError(f"data.init_args.decode: expected cpu or device, got {decode!r}")
        self.decode = decode
        self.root = os.path.expanduser(root)
        self.crop, self.resize, self.hflip, self.crop_scale = crop, resize, hflip, crop_scale
        if mlrc_fold is not None:
            mlrc_fold_mask(np.arange(MLRC_FOLDS), mlrc_fold)  # validates the index
        self.mlrc_fold = mlrc_fold
        self.verify = verify
        self.skip_unreadable = skip_unreadable
        if skip_unreadable:
            self.collate_fn = collate_skipping
        if decode == "device":
            self.collate_fn = collate_encoded
        self._splits: Optional[Dict[str, ImageList]] = None
        self.skipped_on_device: set = set()  # files decode: device found unreadable

    # --- parsing --------------------------------------------------------------------------
    def parse(self) -> Dict[str, ImageList]:
        raise NotImplementedError

    @property
    def splits(self) -> Dict[str, ImageList]:
        if self._splits is None:
            if not os.path.exists(self.root):
                raise DatasetNotFound(self.not_found_message(f"{self.root} does not exist"))
            try:
                splits = self.parse()
            except DatasetNotFound as error:
                raise DatasetNotFound(self.not_found_message(str(error))) from error
            if self.verify:
                self.check_complete(splits)
            self._splits = splits
        return self._splits

    def not_found_message(self, what: str) -> str:
        return (
            f"{self.name}: {what}. {self.guidance} Then pass its folder as "
            f"data.init_args.root (now {self.root!r})."
        )

    def check_complete(self, splits: Dict[str, ImageList]) -> None:
        for split, (n_images, n_classes) in self.expected.items():
            got = (len(splits[split]), splits[split].num_classes)
            if got != (n_images, n_classes):
                raise IncompleteDataset(
                    f"{self.name} at {self.root}: the {split} split should have {n_images} "
                    f"images in {n_classes} classes, found {got[0]} in {got[1]}. The archive "
                    f"looks incomplete or modified; unpack it again, or set "
                    f"data.init_args.verify: false to use it as it is."
                )
        for split, images in splits.items():
            if images.archive is not None:
                continue
            missing = [p for p in images.paths if not os.path.isfile(p)]
            if missing:
                raise IncompleteDataset(
                    f"{self.name} at {self.root}: {len(missing)} image file(s) of the {split} "
                    f"split listed in the metadata are missing, e.g. {missing[:3]}. Unpack the "
                    f"archive again, or set data.init_args.verify: false."
                )

    # --- splits -> datasets -----------------------------------------------------------------
    def _train_list(self) -> ImageList:
        train = self.splits["train"]
        if self.mlrc_fold is None:
            return train
        return train.subset(~mlrc_fold_mask(train.labels, self.mlrc_fold))

    def train_labels(self):
        return np.unique(self._train_list().labels, return_inverse=True)[1]

    @property
    def num_train_classes(self) -> int:
        return self._train_list().num_classes

    def _dataset(self, images: ImageList, train: bool) -> ImageListDataset:
        if self.decode == "device":
            return ImageListDataset(images, None, self.skip_unreadable, encoded=True, train=train)
        transform = (
            train_transform(self.crop, self.hflip, self.crop_scale)
            if train
            else eval_transform(self.crop, self.resize)
        )
        return ImageListDataset(images, transform, self.skip_unreadable)

    def device_batch(self, batch, device):
        """(images, labels, indices) on ``device``: with ``decode: device`` the encoded batch
        is decoded and transformed there."""
        if not is_encoded_batch(batch):
            return super().device_batch(batch, device)
        data, labels, indices, seeds, names = batch
        try:
            images = images_on_device(
                data, seeds, device, self.crop, self.resize, self.crop_scale, self.hflip
            )
        except UndecodableImages as error:
            files = [names[i] for i in error.positions]
            if not self.skip_unreadable:
                raise UnreadableImageError(
                    f"cannot decode image {files[0]}"
                    f"{f' (and {len(files) - 1} more in its batch)' if len(files) > 1 else ''}"
                    f": {error.errors[0].split(': ', 1)[-1]}. Replace the file, or set "
                    f"data.init_args.skip_unreadable: true to skip unreadable images"
                ) from None
            self.skipped_on_device.update(files)  # named once, at the end (teardown)
            keep = [i for i in range(len(data)) if i not in set(error.positions)]
            if not keep:
                return (
                    torch.empty(0, 3, self.crop, self.crop, device=device),
                    labels[:0].to(device),
                    indices[:0].to(device),
                )
            data = [data[i] for i in keep]
            labels, indices, seeds = labels[keep], indices[keep], seeds[keep]
            images = images_on_device(
                data, seeds, device, self.crop, self.resize, self.crop_scale, self.hflip
            )
        return images, labels.to(device), indices.to(device)

    def build_train(self):
        return self._dataset(self._train_list(), train=True)

    def build_eval(self):
        names = ["query", "gallery"] if "query" in self.splits else ["test"]
        return {n: self._dataset(self.splits[n], train=False) for n in names}

    def build_val(self):
        if self.mlrc_fold is None:
            return self.eval_datasets
        train = self.splits["train"]
        return {
            "test": self._dataset(
                train.subset(mlrc_fold_mask(train.labels, self.mlrc_fold)), train=False
            )
        }

    def split_sizes(self) -> Dict[str, object]:
        """The JSON line of ``python -m dml.data.check``."""
        s = self.splits
        out: Dict[str, object] = {
            "dataset": self.name,
            "train_images": len(s["train"]),
            "train_classes": s["train"].num_classes,
        }
        if "query" in s:
            test_labels = np.concatenate([s["query"].labels, s["gallery"].labels])
            out.update(
                test_images=len(s["query"]) + len(s["gallery"]),
                test_classes=len(np.unique(test_labels)),
                query_images=len(s["query"]),
                gallery_images=len(s["gallery"]),
            )
        else:
            out.update(test_images=len(s["test"]), test_classes=s["test"].num_classes)
        return out

    def unreadable_files(self) -> List[str]:
        """The files skipped as unreadable so far (``skip_unreadable``; read in the loader
        workers, or decoded on the device), each once."""
        return sorted(
            {f for ds in self._all_datasets() for f in ds.unreadable_files()}
            | self.skipped_on_device
        )

    def teardown(self, stage: Optional[str] = None) -> None:
        bad = self.unreadable_files()
        if bad:  # each process names the files it skipped (they see different images)
            import warnings

            world, rank = self._world()
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            who = f" (process {rank} of {world})" if world > 1 else ""
            warnings.warn(
                f"{self.name}{who}: skipped {len(bad)} unreadable image file(s): "
                f"{', '.join(bad[:5])}{more}",
                stacklevel=2,
            )

    def _all_datasets(self):
        sets = [self._train] + list((self._eval or {}).values()) + list((self._val or {}).values())
        return [d for d in sets if isinstance(d, ImageListDataset)]


class CUBDataModule(ImageDataModule):
    """CUB-200-2011: classes 1-100 train (5,864 images), 101-200 test (5,924)."""

    name = "cub"
    expected = {"train": (5864, 100), "test": (5924, 100)}
    guidance = (
        "Download CUB_200_2011.tgz (`make data DATASET=cub`, or "
        "https://data.caltech.edu/records/65de6-vp158) and unpack it."
    )

    def parse(self):
        return parse_cub(self.root)


class CarsDataModule(ImageDataModule):
    """Cars196: classes 1-98 train (8,054 images), 99-196 test (8,131)."""

    name = "cars"
    expected = {"train": (8054, 98), "test": (8131, 98)}
    guidance = (
        "Cars196 has no official download any more: get cars_annos.mat and car_ims.tgz "
        "(from a mirror of the Stanford Cars data set) and unpack car_ims/ next to "
        "cars_annos.mat."
    )

    def parse(self):
        return parse_cars(self.root)


class SOPDataModule(ImageDataModule):
    """Stanford Online Products: Ebay_train.txt (11,318 classes / 59,551 images) and
    Ebay_test.txt (11,316 / 60,502). Recall@1/10/100/1000."""

    name = "sop"
    expected = {"train": (59551, 11318), "test": (60502, 11316)}
    standard_recall_ks = (1, 10, 100, 1000)
    guidance = (
        "Download Stanford_Online_Products.zip (`make data DATASET=sop`, or "
        "https://cvgl.stanford.edu/projects/lifted_struct/) and unpack it."
    )

    def parse(self):
        return parse_sop(self.root)


class InShopDataModule(ImageDataModule):
    """In-Shop Clothes Retrieval: train 3,997 items / 25,882 images; test 3,985 items in
    14,218 query and 12,612 gallery images; queries search the gallery. Recall@1/10/20/30/40."""

    name = "inshop"
    expected = {"train": (25882, 3997), "query": (14218, 3985), "gallery": (12612, 3985)}
    standard_recall_ks = (1, 10, 20, 30, 40)
    guidance = (
        "Download the In-shop Clothes Retrieval Benchmark of DeepFashion "
        "(https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html: "
        "img.zip and Eval/list_eval_partition.txt, from its Google Drive) and unpack "
        "img/ next to Eval/."
    )

    def parse(self):
        return parse_inshop(self.root)


class OmniglotDataModule(ImageDataModule):
    """Omniglot, read from the official zip archives; class = alphabet/character.

    subset "full": images_background.zip (964 classes) = train, images_evaluation.zip (659) =
    test. subset "small": train on images_background_small1.zip (136 classes, 2,720 images),
    test on the three alphabets only small2 has (106 classes, 2,120 images). Characters are
    not flipped (a mirrored character is another character).
    """

    name = "omniglot"
    guidance = (
        "Download the Omniglot archives (`make data DATASET=omniglot`, or "
        "https://github.com/brendenlake/omniglot/tree/master/python)."
    )
    EXPECTED = {
        "full": {"train": (19280, 964), "test": (13180, 659)},
        "small": {"train": (2720, 136), "test": (2120, 106)},
    }

    def __init__(
        self,
        root: str = "data/omniglot",
        subset: str = "full",
        crop: int = 64,
        resize: int = 64,
        hflip: bool = False,
        crop_scale: Sequence[float] = (0.7, 1.0),
        **kwargs,
    ):
        if subset not in self.EXPECTED:
            raise ConfigError(f"data.init_args.subset: expected 'full' or 'small', got {subset!r}")
        self.subset = subset
        self.expected = self.EXPECTED[subset]
        kwargs.setdefault("num_workers", 0)
        super().__init__(root, crop, resize, hflip, crop_scale, **kwargs)

    def parse(self):
        return parse_omniglot(self.root, self.subset)

    def split_sizes(self):
        out = super().split_sizes()
        out["dataset"] = f"omniglot-{self.subset}"
        return out


DATAMODULES = {
    "cub": CUBDataModule,
    "cars": CarsDataModule,
    "sop": SOPDataModule,
    "inshop": InShopDataModule,
    "omniglot": OmniglotDataModule,
}
