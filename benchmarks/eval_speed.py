"""Evaluator speed at SOP test scale: dml.metrics vs what a user would otherwise run.

Data: 60,502 x 512 float32 embeddings in 11,316 classes of 2-12 images (mean 5.35, as SOP's
test split). Classes are Gaussian clusters in a 16-d latent space embedded isometrically into
512-d plus small isotropic noise, so that the metrics are far from trivial (plain 512-d Gaussian
clusters separate perfectly).

Timed in one process, same data, same threads:
- ours: dml.metrics.retrieval_metrics, ks = 1, 10, 100, 1000 (R@K, MAP@R, R-Precision).
- baseline: pytorch-metric-learning's AccuracyCalculator (precision_at_1, MAP@R, R-Precision,
  k="max_bin_count", faiss k-NN) plus a faiss IndexFlatL2 search with k = 1001 and the hit-rate
  Recall@K computed from it: what a user needs to get the same numbers.

Usage: python benchmarks/eval_speed.py [--n 60502] [--classes 11316] [--dim 512]
Results are written down in benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def sop_like(n: int, classes: int, dim: int, seed: int = 0, latent: int = 16,
             spread: float = 0.55):
    rng = np.random.default_rng(seed)
    mean_size = n / classes
    sizes = 2 + rng.binomial(10, (mean_size - 2) / 10, size=classes)
    diff = n - sizes.sum()
    while diff != 0:  # adjust to exactly n images, keeping every class within [2, 12]
        i = rng.integers(classes)
        if diff > 0 and sizes[i] < 12:
            sizes[i] += 1
            diff -= 1
        elif diff < 0 and sizes[i] > 2:
            sizes[i] -= 1
            diff += 1
    labels = np.repeat(np.arange(classes), sizes)
    z = rng.normal(size=(classes, latent))[labels] + spread * rng.normal(size=(n, latent))
    basis, _ = np.linalg.qr(rng.normal(size=(dim, latent)))
    x = z @ basis.T + 0.02 * rng.normal(size=(n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels.astype(np.int64)


def baseline(x: np.ndarray, y: np.ndarray, ks):
    import faiss
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r",
                                       "r_precision"), k="max_bin_count")
    acc = calc.get_accuracy(torch.from_numpy(x), torch.from_numpy(y))
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    _, nn = index.search(x, max(ks) + 1)
    # Remove self by index (as the evaluator does), then the hit rate at each K.
    is_self = nn == np.arange(len(x))[:, None]
    is_self[~is_self.any(1), -1] = True
    nn = nn[~is_self].reshape(len(x), -1)
    hits = y[nn] == y[:, None]
    out = {f"R@{k}": float(hits[:, :k].any(1).mean()) for k in ks}
    out.update({"P@1": acc["precision_at_1"], "MAP@R": acc["mean_average_precision_at_r"],
                "R-Precision": acc["r_precision"]})
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=60502)
    parser.add_argument("--classes", type=int, default=11316)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()

    from dml.metrics import retrieval_metrics

    ks = [1, 10, 100, 1000]
    x, y = sop_like(args.n, args.classes, args.dim)
    print(f"data: {len(x)} x {x.shape[1]}, {len(np.unique(y))} classes, "
          f"sizes {np.bincount(y).min()}-{np.bincount(y).max()}, torch threads "
          f"{torch.get_num_threads()}", flush=True)

    t0 = time.perf_counter()
    ours = retrieval_metrics(x, y, ks, backend=args.backend)
    t_ours = time.perf_counter() - t0
    print(f"ours ({args.backend}): {t_ours:.1f} s  {json.dumps(ours)}", flush=True)

    t0 = time.perf_counter()
    ref = baseline(x, y, ks)
    t_ref = time.perf_counter() - t0
    print(f"baseline (PML AccuracyCalculator + faiss k={max(ks) + 1}): {t_ref:.1f} s  "
          f"{json.dumps(ref)}", flush=True)

    agree = all(abs(ours[k] - ref[k]) < 1e-6 for k in ["MAP@R", "R-Precision"] +
                [f"R@{k}" for k in ks]) and abs(ours["R@1"] - ref["P@1"]) < 1e-6
    print(f"ratio ours / baseline = {t_ours / t_ref:.3f}   metrics agree: {agree}")


if __name__ == "__main__":
    main()
