"""A data set of image files (or zip members) with integer labels; items are
(image, label, index).

An unreadable image raises ``UnreadableImageError`` naming the file. With ``skip_unreadable``
the item is dropped from its batch instead (``collate_skipping``) and flagged in ``unreadable``,
one byte per image shared with the DataLoader workers, so that the run reports each bad file
once, by name, however often it was read.
"""

from __future__ import annotations

import multiprocessing as mp
import zipfile
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import numpy as np
from PIL import Image, ImageOps
from torch.utils.data import Dataset, default_collate


class UnreadableImageError(RuntimeError):
    pass


def open_image(source) -> Image.Image:
    """The image of a file (a path or a binary file object) as a viewer shows it: loaded, and
    turned by its EXIF orientation tag (a phone photo stored sideways with orientation 6 is
    rotated upright). Every reader of images in the package uses this."""
    with Image.open(source) as img:
        img.load()
        return ImageOps.exif_transpose(img)


@dataclass
class ImageList:
    """Paths (files, or members of ``archive``) and their original class ids."""

    paths: List[str]
    labels: np.ndarray
    archive: Optional[str] = None

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.paths) != len(self.labels):
            raise ValueError("ImageList: one label per path is required")

    def __len__(self):
        return len(self.paths)

    def subset(self, mask: np.ndarray) -> "ImageList":
        idx = np.flatnonzero(mask)
        return ImageList([self.paths[i] for i in idx], self.labels[idx], self.archive)

    @property
    def num_classes(self) -> int:
        return len(np.unique(self.labels))


class ImageListDataset(Dataset):
    """Images of an ``ImageList`` with labels remapped to 0..C-1 (sorted original ids)."""

    def __init__(
        self,
        images: ImageList,
        transform: Optional[Callable] = None,
        skip_unreadable: bool = False,
        encoded: bool = False,
        train: bool = False,
    ):
        """encoded: items are the file's bytes for ``dml.data.device_decode`` (decoded on the
        training device), with a training augmentation seed when ``train``."""
        self.images = images
        self.paths = images.paths
        classes, self.labels = np.unique(images.labels, return_inverse=True)
        self.original_classes = classes
        self.transform = transform
        self.skip_unreadable = skip_unreadable
        self.encoded, self.train = encoded, train
        # shared memory, inherited by forked loader workers
        self.unreadable = mp.RawArray("b", max(len(self.paths), 1))
        self._zip: Optional[zipfile.ZipFile] = None

    def __len__(self) -> int:
        return len(self.paths)

    def _open(self, path: str) -> Image.Image:
        if self.images.archive is None:
            return open_image(path)
        if self._zip is None:  # one handle per worker process, opened lazily
            self._zip = zipfile.ZipFile(self.images.archive)
        with self._zip.open(path) as f:
            return open_image(f)

    def _read(self, path: str) -> bytes:
        if self.images.archive is None:
            with open(path, "rb") as f:
                return f.read()
        if self._zip is None:
            self._zip = zipfile.ZipFile(self.images.archive)
        return self._zip.read(path)

    @property
    def takes_seed(self) -> bool:
        """Encoded items carry their augmentation seed (``dml.data.seeding``)."""
        return self.encoded

    def item(self, index: int, seed: int):
        """An encoded item: (bytes, label, index, seed, file name); seed -1 for evaluation
        items."""
        import torch

        try:
            data = self._read(self.paths[index])
        except (OSError, KeyError) as error:  # a missing file, or a member missing in a zip
            return self._unreadable(index, error)
        # an empty file stays an item: no decoder reads it, and that is where it is named
        encoded = (
            torch.frombuffer(bytearray(data), dtype=torch.uint8)
            if data
            else torch.empty(0, dtype=torch.uint8)
        )
        return (
            encoded,
            int(self.labels[index]),
            index,
            seed if self.train else -1,
            self.where(index),
        )

    def __getitem__(self, index: int):
        if self.encoded:  # a training item outside the seeded loader draws its own seed
            import torch

            return self.item(index, int(torch.randint(0, 2**62, ())) if self.train else -1)
        try:
            img = self._open(self.paths[index])
        except Exception as error:  # truncated JPEG, not an image, missing file...
            return self._unreadable(index, error)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[index]), index

    def _unreadable(self, index: int, error: Exception) -> None:
        """With ``skip_unreadable`` the item is None (dropped from its batch) and the file
        flagged; otherwise an ``UnreadableImageError`` naming it."""
        if self.skip_unreadable:
            self.unreadable[index] = 1
            return None
        raise UnreadableImageError(
            f"cannot read image {self.where(index)}: {error}. Replace the file, or set "
            f"data.init_args.skip_unreadable: true to skip unreadable images"
        ) from error

    def where(self, index: int) -> str:
        path = self.paths[index]
        return f"{self.images.archive}:{path}" if self.images.archive else path

    def unreadable_files(self) -> List[str]:
        """Every file found unreadable so far (each once), in data-set order."""
        flags = np.frombuffer(self.unreadable, dtype=np.int8)[: len(self.paths)]
        return [self.where(i) for i in np.flatnonzero(flags)]

    def __getstate__(self):  # zip handles do not cross process boundaries
        state = self.__dict__.copy()
        state["_zip"] = None
        return state


def collate_skipping(batch: Sequence):
    """default_collate without the items an image list skipped (None)."""
    return default_collate([item for item in batch if item is not None])
