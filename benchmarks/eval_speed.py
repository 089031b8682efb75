"""Evaluator speed at SOP test scale, against the bare distance GEMM and PML + faiss.

dml.metrics against the floor and against what a user would otherwise run.

Data: 60,502 x 512 float32 embeddings in 11,316 classes of 2-12 images (mean 5.35, as SOP's
test split), L2-normalised. Classes are Gaussian clusters in a 16-d latent space embedded
isometrically into 512-d plus small isotropic noise; ``--regime`` sets how far apart:
- ``hard``: latent spread 0.55 (R@1 about 0.53, MAP@R 0.32: a mid-training SOP model);
- ``separable``: spread 0.3 (R@1 about 0.99: a well-trained one);
- ``unstructured``: i.i.d. Gaussian vectors, labels ignored by the geometry (an untrained
  model; the hardest case for the candidate filter of the rank back end);
- ``isotropic-1.6``, ``isotropic-2``, ``isotropic-3``: class centres drawn in all 512
  dimensions, within-class noise isotropic in all 512 at that standard deviation per
  dimension (distances concentrate; R@1 1.00, 0.94 and 0.11);
- ``latent+noise``: the ``separable`` latent classes plus isotropic noise of 0.04 per
  dimension in all 512 (about the norm of the latent part);
- ``mixture``: half the classes as ``separable``, half as ``isotropic-2``;
- ``collapsed``, ``two-points``: every row the same vector (a collapsed model), or one of two
  vectors, labels shuffled: every distance ties; ``collapsed-descending``: labels falling with
  the row index, the order that makes each new block of references precede the ones seen;
- ``--embeddings FILE.npz`` instead of a regime: real embeddings, the ``embeddings`` and
  ``labels`` arrays of ``python -m dml embed``, read with ``allow_pickle=False``; several files
  are stacked, their labels must not overlap unless ``--relabel`` says that each file's labels
  name its own classes (a model's train and test splits: each numbered from 0).

Timed in one process, same data, same threads:
- floor: the bare float32 distance GEMM of the same sizes, ||q||^2 + ||r||^2 - 2 q.r over all
  n x n pairs in 1024 x 1024 blocks (4096 on a GPU); nothing is compared or kept.
- ours: dml.metrics.retrieval_metrics, ks = 1, 10, 100, 1000 (R@K, MAP@R, R-Precision), exact
  under the (distance, index) tie rule.
- baseline: pytorch-metric-learning's AccuracyCalculator (precision_at_1, MAP@R, R-Precision,
  k="max_bin_count", faiss k-NN) plus a faiss IndexFlatL2 search with k = 1001 and the hit-rate
  Recall@K computed from it: what a user needs to get the same numbers.

The three are timed in alternating rounds (``timing.compare``), ratios per round.

Usage: python benchmarks/eval_speed.py [--regime hard|separable|unstructured|...] [--n 60502]
       [--dim 512] [--classes N] [--embeddings a.npz [b.npz] [--relabel]] [--skip-baseline]
       [--rounds 2] [--device cuda] [--json results.json]
(``--embeddings`` replaces ``--regime``, ``--n``, ``--dim`` and ``--classes``.)
Results are written down in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from timing import compare, format_ratio, ratio

REGIMES = {
    "hard": 0.55,
    "separable": 0.3,
    "unstructured": None,
    "isotropic-1.6": 1.6,
    "isotropic-2": 2.0,
    "isotropic-3": 3.0,
    "latent+noise": 0.3,
    "mixture": 0.3,
    "collapsed": None,
    "collapsed-descending": None,
    "two-points": None,
}


def make_data(regime: str, n: int, classes: int, dim: int, seed: int = 0):
    """The embeddings and labels of a regime (module docstring), L2-normalised."""
    x, y = sop_like(n, classes, dim, seed, spread=REGIMES[regime])
    if regime in ("collapsed", "collapsed-descending", "two-points"):
        return tied_rows(regime, x, y, seed)
    if not regime.startswith(("isotropic", "latent+noise", "mixture")):
        return x, y
    rng = np.random.default_rng(seed + 1)
    if regime == "latent+noise":
        x = x + 0.04 * rng.normal(size=x.shape)
    else:
        sigma = 2.0 if regime == "mixture" else REGIMES[regime]
        iso = rng.normal(size=(classes, dim))[y] + sigma * rng.normal(size=x.shape)
        iso /= np.linalg.norm(iso, axis=1, keepdims=True)
        x = iso if regime != "mixture" else np.where((y % 2 == 0)[:, None], x, iso)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), y


def tied_rows(regime: str, x: np.ndarray, y: np.ndarray, seed: int):
    """Every distance tied: all rows one vector, or two vectors alternating with the index;
    labels shuffled, or (``collapsed-descending``) falling with the index, so that each block
    of references comes before the blocks already seen in the tie order."""
    rng = np.random.default_rng(seed + 2)
    if regime == "two-points":
        x = np.where((np.arange(len(x)) % 2 == 0)[:, None], x[0], x[1])
    else:
        x = np.repeat(x[:1], len(x), axis=0)
    y = y[::-1].copy() if regime == "collapsed-descending" else rng.permutation(y)
    return np.ascontiguousarray(x, np.float32), y


def load_embeddings(paths, relabel: bool = False):
    """Rows and labels of ``python -m dml embed`` files, stacked, L2-normalised; ``relabel``:
    each file's classes are its own (labels offset past the previous files'). A file that is
    not such a file is one line naming it (SystemExit)."""
    xs, ys = [], []
    for path in paths:
        try:
            with np.load(path, allow_pickle=False) as f:
                if "embeddings" not in f or "labels" not in f:
                    raise SystemExit(
                        f"{path}: expected the arrays 'embeddings' and 'labels' "
                        f"(python -m dml embed), found {sorted(f.files)}"
                    )
                x, y = f["embeddings"], f["labels"]
        except (OSError, ValueError) as error:  # missing, not an .npz, pickled objects
            raise SystemExit(f"{path}: not readable as an embeddings file ({error})") from None
        if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating) or len(x) != len(y):
            raise SystemExit(
                f"{path}: expected embeddings (n, d) of floats and n labels, got "
                f"{x.shape} {x.dtype} and {y.shape}"
            )
        if not np.issubdtype(y.dtype, np.integer):
            raise SystemExit(f"{path}: labels must be integers, got {y.dtype}")
        if len(y) and y.min() < 0:
            raise SystemExit(
                f"{path}: {int((y < 0).sum())} rows without a label (-1): a "
                "retrieval benchmark needs labelled rows"
            )
        if xs and x.shape[1] != xs[0].shape[1]:
            raise SystemExit(
                f"{path}: {x.shape[1]}-d embeddings, {paths[0]} has {xs[0].shape[1]}-d"
            )
        xs.append(np.asarray(x, np.float32))
        ys.append(np.asarray(y, np.int64))
    if relabel:
        offset = 0
        for i, y in enumerate(ys):
            _, ys[i] = np.unique(y, return_inverse=True)
            ys[i] = ys[i].astype(np.int64) + offset
            offset = int(ys[i].max()) + 1 if len(y) else offset
    for i in range(len(ys)):
        for j in range(i):
            if np.intersect1d(ys[i], ys[j]).size:
                raise SystemExit(
                    f"{paths[i]} and {paths[j]} share labels; stacking them would "
                    "merge classes (--relabel: each file's labels are its own "
                    "classes)"
                )
    x = np.concatenate(xs)
    if len(x) < 2:
        raise SystemExit(f"{', '.join(paths)}: {len(x)} rows; a benchmark needs at least 2")
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, np.concatenate(ys)


def sop_like(n: int, classes: int, dim: int, seed: int = 0, latent: int = 16, spread: float = 0.55):
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
    if spread is None:
        x = rng.normal(size=(n, dim))
    else:
        z = rng.normal(size=(classes, latent))[labels] + spread * rng.normal(size=(n, latent))
        basis, _ = np.linalg.qr(rng.normal(size=(dim, latent)))
        x = z @ basis.T + 0.02 * rng.normal(size=(n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels.astype(np.int64)


def bare_gemm(x: torch.Tensor, rows: int, cols: int) -> None:
    """Every n x n squared distance, computed in rows x cols blocks, nothing kept."""
    sq = (x * x).sum(1)
    n = len(x)
    for i in range(0, n, rows):
        for j in range(0, n, cols):
            block = sq[i : i + rows, None] + sq[None, j : j + cols]
            block.addmm_(x[i : i + rows], x[j : j + cols].T, alpha=-2.0)


def baseline(x: np.ndarray, y: np.ndarray, ks):
    import faiss
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calc = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r", "r_precision"), k="max_bin_count"
    )
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
    out.update(
        {
            "P@1": acc["precision_at_1"],
            "MAP@R": acc["mean_average_precision_at_r"],
            "R-Precision": acc["r_precision"],
        }
    )
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--regime", choices=sorted(REGIMES), default="hard")
    parser.add_argument("--n", type=int, default=60502)
    parser.add_argument(
        "--classes", type=int, default=None, help="default: n / 5.35, as SOP's test split"
    )
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument(
        "--rounds", type=int, default=2, help="alternating rounds of floor, ours and baseline"
    )
    parser.add_argument(
        "--embeddings",
        nargs="+",
        default=None,
        help="time on these .npz files of python -m dml embed instead of a generated regime",
    )
    parser.add_argument(
        "--relabel",
        action="store_true",
        help="--embeddings: each file's labels name its own classes",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()

    from dml.metrics import retrieval_metrics

    ks = [1, 10, 100, 1000]
    if args.embeddings:
        x, y = load_embeddings(args.embeddings, args.relabel)
        regime = "embeddings: " + ", ".join(args.embeddings)
    else:
        classes = args.classes or round(args.n / 5.35)
        if not 2 * classes <= args.n <= 12 * classes:  # SOP's class sizes, 2-12 images
            parser.error(
                f"--n {args.n} rows in --classes {classes}: the generated classes hold 2-12 "
                f"images each (SOP's sizes), so --classes must be between {-(-args.n // 12)} "
                f"and {args.n // 2}"
            )
        x, y = make_data(args.regime, args.n, classes, args.dim)
        regime = args.regime
    sizes = np.unique(y, return_counts=True)[1]
    print(
        f"data ({regime}): {len(x)} x {x.shape[1]}, {len(sizes)} classes, "
        f"sizes {sizes.min()}-{sizes.max()}, torch threads "
        f"{torch.get_num_threads()}",
        flush=True,
    )

    device = torch.device(args.device)
    xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    block = 1024 if device.type == "cpu" else 4096
    results = {}

    def ours():
        results["ours"] = retrieval_metrics(xt, yt, ks, backend=args.backend, device=device)

    def reference():
        results["baseline"] = baseline(x, y, ks)

    variants = {"floor": lambda: bare_gemm(xt, block, block), "ours": ours}
    if not args.skip_baseline:
        variants["baseline"] = reference
    timings = compare(variants, device, rounds=args.rounds, warmup=int(device.type == "cuda"))
    print(f"floor: bare distance GEMM in {block} x {block} blocks: {timings['floor']}", flush=True)
    print(
        f"ours ({args.backend}, {device}): {timings['ours']}  {json.dumps(results['ours'])}",
        flush=True,
    )
    print(
        f"ratio ours / bare GEMM = {format_ratio(ratio(timings, 'ours', 'floor'))} "
        f"(median [range] over {args.rounds} alternating rounds)",
        flush=True,
    )
    record = {
        "regime": regime,
        "rows": len(x),
        "dim": int(x.shape[1]),
        "device": str(device),
        "rounds": args.rounds,
        "metrics": results["ours"],
        "seconds": {name: t.rounds for name, t in timings.items()},
        "ours_over_floor": ratio(timings, "ours", "floor").rounds,
    }
    if args.skip_baseline:
        write_json(args.json, record)
        return
    ref = results["baseline"]
    print(
        f"baseline (PML AccuracyCalculator + faiss k={max(ks) + 1}): {timings['baseline']}  "
        f"{json.dumps(ref)}",
        flush=True,
    )
    agree = (
        all(
            abs(results["ours"][k] - ref[k]) < 1e-6
            for k in ["MAP@R", "R-Precision"] + [f"R@{k}" for k in ks]
        )
        and abs(results["ours"]["R@1"] - ref["P@1"]) < 1e-6
    )
    print(
        f"ratio ours / baseline = {format_ratio(ratio(timings, 'ours', 'baseline'))}   "
        f"metrics agree: {agree}"
    )
    record.update(
        baseline=ref, ours_over_baseline=ratio(timings, "ours", "baseline").rounds, agree=agree
    )
    write_json(args.json, record)


def write_json(path, record) -> None:
    if path:  # atomically: a reader never sees half a file
        from dml.atomic_files import write_text_atomic

        write_text_atomic(path, json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
