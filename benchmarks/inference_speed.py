"""Inference speed: embedding throughput against a bare loop, and search latency per query.

1. Embedding: ``Embedder.embed_files`` (reading, the evaluation transform, the network, in
   batches of 128) against a bare loop that runs ``model.eval()`` under ``torch.no_grad`` over
   the same DataLoader of the same files: images/s of each, alternating rounds.
2. Search: a gallery of SOP's test size (60,502 x 512: eval_speed.py's "hard" regime, classes
   of SOP's sizes clustered in a 16-d latent space, R@1 about 0.53), 1,000 queries drawn from
   it (each left out of its own results): ms per query for the flat index and the approximate
   ones, with their Recall@10 against the flat index's answers.

    python benchmarks/inference_speed.py [--images 512] [--size 224] [--rows 60502]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from timing import compare, format_ratio, ratio


def make_checkpoint(folder: str, size: int) -> str:
    """A ResNet-50 checkpoint (random weights) as `python -m dml fit` would write it."""
    from dml.module import BackboneConfig, DMLModule

    module = DMLModule(backbone=BackboneConfig("resnet50", pretrained=False), num_classes=10)
    path = os.path.join(folder, "model.ckpt")
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "dml_config": {
                "data": {
                    "class_path": "dml.data.CUBDataModule",
                    "init_args": {"crop": size, "resize": size * 8 // 7},
                }
            },
        },
        path,
    )
    return path


def make_images(folder: str, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"{i:05d}.jpg")
        Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def embedding(args):
    from torch.utils.data import DataLoader

    from dml.inference import Embedder
    from dml.inference.embedder import ImageFiles, collate_readable

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_images(tmp, args.images)
        embedder = Embedder.from_checkpoint(make_checkpoint(tmp, args.size))
        device = embedder.device
        model = embedder.module

        def ours():
            embedder.embed_files(paths, batch_size=128, num_workers=args.workers, progress=False)

        def bare():
            loader = DataLoader(
                ImageFiles(paths, embedder.transform),
                batch_size=128,
                num_workers=args.workers,
                collate_fn=collate_readable,
            )
            with torch.no_grad():
                for images, _, _ in loader:
                    model(images.to(device))

        timings = compare({"ours": ours, "bare": bare}, device, rounds=args.rounds, warmup=1)
        rate = {k: args.images / t.median for k, t in timings.items()}
        print(
            f"embedding {args.images} JPEGs (500x375) at {args.size} px, ResNet-50, {device}, "
            f"{args.workers} workers: ours {rate['ours']:.1f} img/s, bare loop "
            f"{rate['bare']:.1f} img/s; time ours / bare = "
            f"{format_ratio(ratio(timings, 'ours', 'bare'))}",
            flush=True,
        )


def search(args):
    from eval_speed import REGIMES, sop_like

    from dml.inference import EmbeddingSet, SearchIndex

    x, y = sop_like(args.rows, round(args.rows / 5.35), 512, spread=REGIMES["hard"])
    rows = EmbeddingSet(x, [f"{i}" for i in range(len(x))], y)
    rng = np.random.default_rng(0)
    picked = np.sort(rng.choice(len(x), 1000, replace=False))
    queries = rows.embeddings[picked]
    flat = SearchIndex.build(rows, "flat")
    t0 = time.perf_counter()
    flat.search(queries, 11)
    flat_ms = 1000 * (time.perf_counter() - t0) / len(queries)
    print(
        f"search, {len(x)} x {x.shape[1]} gallery, 1,000 queries, k = 10: flat "
        f"{flat_ms:.3f} ms/query (exact)",
        flush=True,
    )
    for kind in ("ivf", "hnsw", "ivfpq"):
        t0 = time.perf_counter()
        built = SearchIndex.build(rows, kind, recall_sample=1000)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        built.search(queries, 11)
        ms = 1000 * (time.perf_counter() - t0) / len(queries)
        # Recall@10 of 1,000 sampled rows, a neighbour counted when it lies at or inside the
        # exact 10th distance (SearchIndex.recall_against_exact)
        print(
            f"  {kind:>5}: {ms:.3f} ms/query ({flat_ms / ms:.1f}x flat), Recall@10 "
            f"{built.meta['recall@10']:.4f} (build {build_s:.1f} s)",
            flush=True,
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=60502)
    parser.add_argument("--skip-embedding", action="store_true")
    args = parser.parse_args()
    print(f"torch threads {torch.get_num_threads()}", flush=True)
    if not args.skip_embedding:
        embedding(args)
    search(args)


if __name__ == "__main__":
    main()
