"""Figure builders. Inputs are tensors as the data sets return them (C, H, W), normalised or
not: ``display_image`` rescales each image to [0, 1] for display."""

from __future__ import annotations

import os
from typing import Optional, Sequence

import matplotlib.pyplot as plt  # without a display matplotlib falls back to Agg by itself
import numpy as np
import torch
import torch.nn.functional as F

from dml.metrics import knn


def display_image(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) tensor -> (H, W, 3) array in [0, 1] (per-image min-max; grey to RGB)."""
    x = image.detach().float().cpu()
    x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-8)
    if x.shape[0] == 1:
        x = x.repeat(3, 1, 1)
    return x.permute(1, 2, 0).numpy()


def top_k_neighbours(query: torch.Tensor, reference: Optional[torch.Tensor], k: int):
    """Indices (n_q, k) of each query's k nearest references (itself excluded when
    ``reference`` is None)."""
    return knn(query, reference, k, backend="torch")[1]


def retrieval_grid(
    query_images: Sequence[torch.Tensor], neighbour_images, correct, title: str = ""
) -> plt.Figure:
    """One row per query: the query, then its top-k neighbours framed green (same class) or
    red (other class). ``neighbour_images[i][j]``, ``correct[i][j]``."""
    rows, k = len(query_images), len(neighbour_images[0])
    fig, axes = plt.subplots(rows, k + 1, figsize=(1.6 * (k + 1), 1.6 * rows), squeeze=False)
    for i in range(rows):
        axes[i, 0].imshow(display_image(query_images[i]))
        axes[i, 0].set_title("query" if i == 0 else "", fontsize=8)
        for j in range(k):
            ax = axes[i, j + 1]
            ax.imshow(display_image(neighbour_images[i][j]))
            colour = "#1a9641" if correct[i][j] else "#d7191c"
            for side in ax.spines.values():
                side.set_edgecolor(colour)
                side.set_linewidth(4)
            if i == 0:
                ax.set_title(f"#{j + 1}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    axes[0, 0].spines[:].set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def grey(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) -> (H, W) luminance in [0, 1], for overlays that must read over any image."""
    rgb = display_image(image)
    return rgb @ np.array([0.299, 0.587, 0.114])


def pooling_heatmaps(
    images: torch.Tensor, weights: torch.Tensor, grid: Sequence[int], title: str = ""
) -> plt.Figure:
    """Each image, and below it its per-location pooling weights (B, h*w) upsampled over the
    image in grey, on one colour scale for all images: weight / mean weight (1 = what GAP gives
    every location), with a colour bar."""
    h, w = grid
    maps = weights.detach().float().cpu().view(-1, 1, h, w)
    maps = maps / maps.mean(dim=(2, 3), keepdim=True).clamp_min(1e-12)
    maps = F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)
    top = max(float(maps.max()), 1.0)
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(1.8 * n + 0.8, 3.8), squeeze=False)
    for i in range(n):
        axes[0, i].imshow(display_image(images[i]))
        axes[1, i].imshow(grey(images[i]), cmap="gray", vmin=0, vmax=1)
        shown = axes[1, i].imshow(maps[i, 0].numpy(), cmap="magma", alpha=0.6, vmin=0, vmax=top)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    axes[0, 0].set_ylabel("image", fontsize=8)
    axes[1, 0].set_ylabel("pooling weight", fontsize=8)
    bar = fig.colorbar(shown, ax=axes[1, :].tolist(), fraction=0.03, pad=0.02)
    bar.set_label("weight / mean (GAP = 1)", fontsize=7)
    bar.ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def embedding_projection(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    method: str = "pca",
    max_points: int = 2000,
    seed: int = 0,
    title: str = "",
    colored: int = 10,
) -> plt.Figure:
    """A 2-D projection (PCA, or t-SNE from scikit-learn) of at most ``max_points`` embeddings
    (a seeded subsample): the ``colored`` most frequent classes in distinct colours with a
    legend, the others grey (20 colours cannot tell 100 classes apart)."""
    x, y = embeddings.detach().float().cpu(), labels.detach().cpu()
    if len(x) > max_points:
        keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:max_points]
        x, y = x[keep], y[keep]
    if method == "pca":
        centred = x - x.mean(0)
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        points = (centred @ v[:2].T).numpy()
    elif method == "tsne":
        from sklearn.manifold import TSNE

        points = TSNE(
            2, init="pca", random_state=seed, perplexity=min(30.0, max(2.0, (len(x) - 1) / 3))
        ).fit_transform(x.numpy())
    else:
        raise ValueError(f"embedding_projection: method must be pca or tsne, got {method!r}")
    fig, ax = plt.subplots(figsize=(7.0, 5.5))
    classes, codes, counts = np.unique(y.numpy(), return_inverse=True, return_counts=True)
    shown = np.argsort(-counts, kind="stable")[:colored]  # the most frequent classes
    rest = ~np.isin(codes, shown)
    if rest.any():
        ax.scatter(
            points[rest, 0],
            points[rest, 1],
            c="#c8c8c8",
            s=5,
            alpha=0.6,
            label=f"{len(classes) - len(shown)} other classes",
        )
    palette = plt.get_cmap("tab20" if len(shown) > 10 else "tab10")
    for n, c in enumerate(shown):
        on = codes == c
        ax.scatter(
            points[on, 0],
            points[on, 1],
            color=palette(n % palette.N),
            s=9,
            alpha=0.9,
            label=f"class {classes[c]}",
        )
    ax.set_xticks([]), ax.set_yticks([])
    ax.legend(
        fontsize=7, markerscale=1.5, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False
    )
    ax.set_title(
        title
        or f"{method.upper()} of {len(x)} embeddings, {len(classes)} classes "
        f"({len(shown)} coloured)",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def training_diagnostics(history: dict, title: str = "") -> Optional[plt.Figure]:
    """The logged training diagnostics over the steps (``Objective.diagnostics``): each loss
    term's gradient norm at the head's output (log scale), the share of stored negatives the
    memory's loss acts on, the stored positives and negatives per anchor, and the cosine between
    stored rows and their images embedded again (``dml.callbacks.MemoryDrift``). ``history``:
    {key: [(step, value), ...]} with keys ``grad_norm/<term>`` and ``memory/<quantity>``.
    None when nothing was logged."""
    norms = {k: v for k, v in history.items() if k.startswith("grad_norm/") and v}
    memory = {k: v for k, v in history.items() if k.startswith("memory/") and v}
    if not norms and not memory:
        return None
    drift = {k: v for k, v in memory.items() if k.startswith("memory/drift_cosine")}
    panels = [
        p
        for p in ("norms", "active", "counts", "drift")
        if (p == "norms" and norms)
        or (p == "drift" and drift)
        or (p in ("active", "counts") and memory)
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "norms":
            for key, points in sorted(norms.items()):
                steps, values = zip(*points)
                ax.plot(steps, values, label=key.split("/", 1)[1])
            ax.set_yscale("log")
            ax.set_title("gradient norm at the head's output, per term")
        elif panel == "active":
            points = memory.get("memory/active_negatives", [])
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values)
            ax.set_ylim(0, 1)
            ax.set_title("stored negatives inside the margin (share)")
        elif panel == "drift":
            names = {
                "memory/drift_cosine": "stored rows",
                "memory/drift_cosine_newest": "newest batch (reference)",
            }
            for key, name in names.items():
                if drift.get(key):
                    steps, values = zip(*drift[key])
                    ax.plot(steps, values, marker=".", label=name)
            ax.set_title("cos(stored row, same image embedded now)")
        else:
            for key in ("memory/positives_per_anchor", "memory/negatives_per_anchor"):
                if memory.get(key):
                    steps, values = zip(*memory[key])
                    ax.plot(steps, values, label=key.split("/", 1)[1].replace("_", " "))
            ax.set_yscale("log")
            ax.set_title("stored rows per anchor")
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def save_png(fig: plt.Figure, path: str, dpi: int = 100) -> str:
    """Write the figure to ``path`` atomically (a reader never sees half a PNG) and close it."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    folder = os.path.dirname(path) or "."
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.partial")
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
