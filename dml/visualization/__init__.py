"""Figures for dashboards and notebooks: retrieval grids, pooling-weight heatmaps, 2-D
projections of embeddings. Plain matplotlib figures; ``save_png`` writes them to disk."""

from dml.visualization.figures import (
    display_image,
    embedding_projection,
    pooling_heatmaps,
    retrieval_grid,
    save_png,
    top_k_neighbours,
)

__all__ = [
    "display_image",
    "embedding_projection",
    "pooling_heatmaps",
    "retrieval_grid",
    "save_png",
    "top_k_neighbours",
]
