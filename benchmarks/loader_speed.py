"""Training DataLoader throughput on a generated CUB-like tree of 500x375 JPEGs.

Compares, in one process, images per second of:
- ours: CUBDataModule's training loader (class-balanced P x M batches, standard transforms:
  RandomResizedCrop(224) + flip + ImageNet normalisation);
- alternative: torchvision ImageFolder over the same files with the same transforms and a
  shuffled DataLoader of the same batch size (what a user would otherwise write);
- ours, decode on the device: the same loader with ``decode: device`` (the workers read the
  bytes; JPEG decoding, crop, flip and normalisation run batched on ``--device``, nvJPEG on a
  GPU), the device work included in the time;
with 0 and 2 worker processes (``--workers``). Every batch ends on ``--device`` (the CPU-decoded
ones copied there), so the three deliver the same thing: augmented images ready for the model.

Usage: python benchmarks/loader_speed.py [--images 640] [--batches 20] [--workers 0 2]
       [--device cuda] [--json results.json]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
from PIL import Image


def make_tree(root: str, n_images: int, n_classes: int = 20, seed: int = 0):
    """CUB layout: classes 1..n/2 train, the rest test; 500x375 photos-like JPEGs."""
    rng = np.random.default_rng(seed)
    base = os.path.join(root, "CUB_200_2011")
    images, labels = [], []
    per_class = n_images // n_classes
    yy, xx = np.mgrid[0:375, 0:500]
    image_id = 0
    for c in range(1, n_classes + 1):
        cls = 0 if c <= n_classes // 2 else 100  # train classes 1.., test classes 101..
        folder = f"{c + cls:03d}.Class_{c}"
        os.makedirs(os.path.join(base, "images", folder), exist_ok=True)
        for j in range(per_class):
            image_id += 1
            # smooth gradients plus noise: JPEG sizes close to natural photos (~40-60 KB)
            img = (
                (
                    np.stack([xx * rng.random(), yy * rng.random(), (xx + yy) * rng.random()], -1)
                    % 256
                    + rng.normal(0, 20, (375, 500, 3))
                )
                .clip(0, 255)
                .astype(np.uint8)
            )
            rel = f"{folder}/img_{j:04d}.jpg"
            Image.fromarray(img).save(os.path.join(base, "images", rel), quality=90)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c + cls}")
    with open(os.path.join(base, "images.txt"), "w") as f:
        f.write("\n".join(images) + "\n")
    with open(os.path.join(base, "image_class_labels.txt"), "w") as f:
        f.write("\n".join(labels) + "\n")


def throughput(loader, batches: int, finish=None) -> float:
    """Images per second over ``batches`` batches; ``finish(batch)`` (the device step) is
    included in the time."""
    import torch

    finish = finish or (lambda batch: None)
    it = iter(loader)
    finish(next(it))  # worker start-up and first batch are not counted
    n, t0 = 0, time.perf_counter()
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        finish(batch)
        n += len(batch[1])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=640)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()

    import json

    import torch
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from dml.data import CUBDataModule
    from dml.data.transforms import train_transform

    torch.manual_seed(0)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    record = {"device": str(device), "images": args.images, "batches": args.batches, "workers": {}}
    with tempfile.TemporaryDirectory() as root:
        make_tree(root, args.images)
        size = os.path.getsize(
            next(
                os.path.join(d, f)
                for d, _, fs in os.walk(os.path.join(root, "CUB_200_2011", "images"))
                for f in fs
            )
        )
        print(
            f"{args.images} JPEGs of 500x375 (~{size // 1024} KB each), batch 32 (8 x 4), "
            f"{args.batches} batches timed, torch threads {torch.get_num_threads()}; every "
            f"batch ends on {device}"
        )
        for workers in args.workers:
            dm = CUBDataModule(
                root=root,
                verify=False,
                num_workers=workers,
                classes_per_batch=8,
                samples_per_class=4,
            )
            ours = throughput(
                dm.train_dataloader(), args.batches, lambda batch: dm.device_batch(batch, device)
            )
            folder = ImageFolder(
                os.path.join(root, "CUB_200_2011", "images"), transform=train_transform(224)
            )
            alt_loader = DataLoader(
                folder,
                batch_size=32,
                shuffle=True,
                num_workers=workers,
                persistent_workers=workers > 0,
            )
            alt = throughput(
                alt_loader,
                args.batches,
                lambda batch: [t.to(device, non_blocking=True) for t in batch],
            )
            encoded = CUBDataModule(
                root=root,
                verify=False,
                num_workers=workers,
                classes_per_batch=8,
                samples_per_class=4,
                decode="device",
            )
            on_device = throughput(
                encoded.train_dataloader(),
                args.batches,
                lambda batch: encoded.device_batch(batch, device),
            )
            print(
                f"workers={workers}: ours {ours:.0f} img/s, ImageFolder {alt:.0f} img/s, "
                f"ratio ours/alternative = {ours / alt:.2f}; decode on {device} "
                f"{on_device:.0f} img/s, ratio to ours {on_device / ours:.2f}",
                flush=True,
            )
            record["workers"][str(workers)] = {
                "ours": ours,
                "imagefolder": alt,
                "decode_on_device": on_device,
            }
            if args.json:  # atomically: a reader never sees half a file
                from dml.atomic_files import write_text_atomic

                write_text_atomic(args.json, json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
