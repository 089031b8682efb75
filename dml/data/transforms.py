"""The standard DML image transforms.

train: RandomResizedCrop(crop) + horizontal flip; eval: Resize(resize) + CenterCrop(crop);
ImageNet normalisation, mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225).
crop = 224 for ResNet settings, 227 for the BN-Inception (MLRC) settings; resize = 256.
Grey and one-bit images (Omniglot, a few CUB and SOP files) are converted to RGB first.
"""

from __future__ import annotations

from typing import Sequence

from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_rgb(img):
    return img if img.mode == "RGB" else img.convert("RGB")


def train_transform(crop: int = 224, hflip: bool = True, scale: Sequence[float] = (0.08, 1.0)):
    steps = [T.Lambda(to_rgb), T.RandomResizedCrop(crop, scale=tuple(scale))]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose(steps + [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def eval_transform(crop: int = 224, resize: int = 256):
    return T.Compose(
        [
            T.Lambda(to_rgb),
            T.Resize(resize),
            T.CenterCrop(crop),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
