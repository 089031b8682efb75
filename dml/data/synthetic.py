"""The embedded default data set: textured shapes rendered on the fly from a seed (no download).

A class is a (shape, grating orientation, grating frequency) triple drawn at random; train and
test classes are disjoint draws. Each image jitters the class's factors (orientation +- 6 deg,
frequency +- 8 %, position, scale) and randomises nuisances that dominate the raw pixels:
foreground and background colours, grating phase, contrast and Gaussian noise. An untrained
network therefore groups images by colour, not class; a trained one must learn the geometry.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset

SHAPES = ("disk", "square", "diamond", "ring", "cross")


def sample_classes(num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """(num_classes, 3): shape id, orientation in [0, pi), frequency in [1.5, 5] cycles/image."""
    shape = torch.randint(len(SHAPES), (num_classes,), generator=generator).float()
    theta = torch.rand(num_classes, generator=generator) * math.pi
    freq = 1.5 + 3.5 * torch.rand(num_classes, generator=generator)
    return torch.stack([shape, theta, freq], 1)


def _shape_mask(shape_id: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Soft masks (B, S, S) of unit-size shapes on centred coordinates x, y (B, S, S)."""
    r = torch.sqrt(x * x + y * y)
    inf = torch.maximum(x.abs(), y.abs())
    l1 = x.abs() + y.abs()
    sharp = 12.0
    masks = torch.stack(
        [
            torch.sigmoid(sharp * (1.0 - r)),  # disk
            torch.sigmoid(sharp * (0.85 - inf)),  # square
            torch.sigmoid(sharp * (1.15 - l1)),  # diamond
            torch.sigmoid(sharp * (1.0 - r)) * torch.sigmoid(sharp * (r - 0.55)),  # ring
            torch.sigmoid(sharp * (1.0 - inf))
            * torch.sigmoid(sharp * (0.35 - torch.minimum(x.abs(), y.abs()))),  # cross
        ],
        1,
    )
    return masks[torch.arange(len(shape_id)), shape_id.long()]


def render(
    class_params: torch.Tensor, labels: torch.Tensor, size: int, generator: torch.Generator
) -> torch.Tensor:
    """Images (B, 3, size, size) in [0, 1] for ``labels`` indexing rows of ``class_params``."""
    b = len(labels)
    p = class_params[labels]
    g = generator
    theta = p[:, 1] + math.radians(6.0) * torch.randn(b, generator=g)
    freq = p[:, 2] * (1.0 + 0.08 * torch.randn(b, generator=g))
    phase = 2 * math.pi * torch.rand(b, generator=g)
    scale = 0.55 + 0.2 * torch.rand(b, generator=g)
    shift = 0.25 * (2 * torch.rand(b, 2, generator=g) - 1)
    coords = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    xx, yy = xx.expand(b, -1, -1), yy.expand(b, -1, -1)
    u = xx * torch.cos(theta)[:, None, None] + yy * torch.sin(theta)[:, None, None]
    grating = torch.sin(2 * math.pi * freq[:, None, None] * u + phase[:, None, None])
    mask = _shape_mask(
        p[:, 0],
        (xx - shift[:, 0, None, None]) / scale[:, None, None],
        (yy - shift[:, 1, None, None]) / scale[:, None, None],
    )
    background = torch.rand(b, 3, 1, 1, generator=g)
    foreground = torch.rand(b, 3, 1, 1, generator=g)
    contrast = 0.35 + 0.35 * torch.rand(b, 1, 1, 1, generator=g)
    texture = foreground + contrast * grating[:, None]
    img = background + mask[:, None] * (texture - background)
    img = img + 0.06 * torch.randn(img.shape, generator=g)
    return img.clamp(0, 1)


class SyntheticShapes(Dataset):
    """``num_classes`` x ``images_per_class`` rendered images; items are (image, label, index).

    ``split`` selects an independent stream of classes ("train" or "test"), so the two splits
    share no class. Images are normalised to zero mean, unit variance per channel (0.5, 0.25).
    """

    def __init__(
        self,
        split: str = "train",
        num_classes: int = 48,
        images_per_class: int = 40,
        image_size: int = 32,
        seed: int = 0,
    ):
        if split not in ("train", "test"):
            raise ValueError(f"SyntheticShapes: split must be 'train' or 'test', got {split!r}")
        # how to make these images again (dml.inference.generated_images)
        self.arguments = {
            "split": split,
            "num_classes": int(num_classes),
            "images_per_class": int(images_per_class),
            "image_size": int(image_size),
            "seed": int(seed),
        }
        stream = {"train": 0, "test": 1}[split]
        g = torch.Generator().manual_seed(seed * 1000 + stream)
        self.class_params = sample_classes(num_classes, g)
        self.labels = torch.arange(num_classes).repeat_interleave(images_per_class)
        images = render(self.class_params, self.labels, image_size, g)
        self.images = (images - 0.5) / 0.25
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], int(self.labels[index]), index
