"""Decoding and augmenting on the training device (``data.init_args.decode: device``).

The loader workers only read the files: each item is the encoded bytes, the label, the index and
an augmentation seed (``dml.data.seeding``'s, >= 0, for a training item; -1 for an evaluation
item: ``ImageListDataset.item``). The batch goes to
the device as it is; there JPEGs are decoded in one batched call (``torchvision.io.decode_jpeg``,
nvJPEG on a GPU; other formats, and a JPEG the batched call refuses, one by one on the CPU),
turned by their EXIF orientation, and transformed as ``dml.data.transforms`` does with PIL:

- training: RandomResizedCrop(crop, scale) and a horizontal flip, their parameters drawn by the
  same torchvision calls from a generator seeded with the item's seed (the PIL path under the
  same seed picks the same box and flip);
- evaluation: resize of the shorter side to ``resize``, centre crop ``crop``;
- both: bilinear with antialiasing on uint8, then /255 and ImageNet normalisation.

On a CPU the same code runs on CPU tensors (tested against the PIL path there).
"""

from __future__ import annotations

from typing import List, Sequence

import torch
from torch.utils.data import default_collate
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms import functional as F

from dml.data.seeding import seeded
from dml.data.transforms import IMAGENET_MEAN, IMAGENET_STD

RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's default aspect ratios


def collate_encoded(batch: Sequence[tuple]):
    """(list of uint8 byte tensors, labels, indices, seeds, file names); skipped items (None)
    dropped."""
    batch = [item for item in batch if item is not None]
    data = [item[0] for item in batch]
    labels, indices, seeds = default_collate([item[1:4] for item in batch])
    return data, labels, indices, seeds, [item[4] for item in batch]


def is_encoded_batch(batch) -> bool:
    return isinstance(batch, (list, tuple)) and len(batch) == 5 and isinstance(batch[0], list)


class UndecodableImages(ValueError):
    """Items of a batch that no decoder reads: ``positions`` in the batch, ``errors`` (one
    message each)."""

    def __init__(self, positions: List[int], errors: List[str]):
        super().__init__("; ".join(errors))
        self.positions, self.errors = positions, errors


def decode(data: List[torch.Tensor], device: torch.device) -> List[torch.Tensor]:
    """RGB uint8 images (3, H, W) on ``device``, turned by their EXIF orientation as a viewer
    shows them (as ``dml.data.image_list.open_image``); ``UndecodableImages`` lists every item
    that no decoder reads (truncated, not an image)."""
    out: List[torch.Tensor] = [None] * len(data)  # type: ignore[list-item]
    jpeg = [i for i, d in enumerate(data) if len(d) > 2 and int(d[0]) == 0xFF and int(d[1]) == 0xD8]
    if jpeg:
        try:
            decoded = decode_jpeg(
                [data[i] for i in jpeg],
                mode=ImageReadMode.RGB,
                device=device,
                apply_exif_orientation=True,
            )
            for i, img in zip(jpeg, decoded):
                out[i] = img
        except RuntimeError:  # a truncated JPEG, or a CMYK one nvJPEG refuses: one by one
            pass
    bad, errors = [], []
    for i, img in enumerate(out):
        if img is None:
            try:
                out[i] = decode_image(
                    data[i], mode=ImageReadMode.RGB, apply_exif_orientation=True
                ).to(device)
            except RuntimeError as error:
                bad.append(i)
                errors.append(f"item {i} of the batch: {error}")
    if bad:
        raise UndecodableImages(bad, errors)
    return out


def train_view(
    img: torch.Tensor, seed: int, crop: int, scale: Sequence[float], hflip: bool
) -> torch.Tensor:
    """RandomResizedCrop + flip of one uint8 image, parameters drawn under ``seed``."""
    with seeded(seed):
        top, left, height, width = T.RandomResizedCrop.get_params(img, list(scale), list(RATIO))
        flip = hflip and bool(torch.rand(1) < 0.5)
    view = F.resized_crop(
        img,
        top,
        left,
        height,
        width,
        [crop, crop],
        interpolation=T.InterpolationMode.BILINEAR,
        antialias=True,
    )
    return F.hflip(view) if flip else view


def eval_view(img: torch.Tensor, crop: int, resize: int) -> torch.Tensor:
    view = F.resize(img, [resize], interpolation=T.InterpolationMode.BILINEAR, antialias=True)
    return F.center_crop(view, [crop, crop])


def normalize(views: List[torch.Tensor]) -> torch.Tensor:
    x = torch.stack(views).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def images_on_device(
    data: List[torch.Tensor],
    seeds: torch.Tensor,
    device: torch.device,
    crop: int,
    resize: int,
    scale: Sequence[float],
    hflip: bool,
) -> torch.Tensor:
    """The batch's images, decoded and transformed on ``device``: (B, 3, crop, crop)."""
    decoded = decode(data, device)
    views = [
        train_view(img, int(s), crop, scale, hflip) if int(s) >= 0 else eval_view(img, crop, resize)
        for img, s in zip(decoded, seeds.tolist())
    ]
    return normalize(views)
