"""The validation hook's arithmetic: collect embeddings, gather them across processes, score them.

Embeddings arrive per batch with their data-set indices. Under DDP each rank holds a shard
(``DistributedSampler`` pads shards to equal length by repeating items); ``gather_by_index``
all-gathers, drops the repeated indices and restores data-set order, so every rank ends with the
exact single-process arrays.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch

from dml.metrics import nmi, retrieval_metrics


class EmbeddingBuffer:
    """Per-loader lists of (embeddings, labels, indices) for one evaluation pass."""

    def __init__(self):
        self.parts: Dict[int, List[tuple]] = {}

    def add(self, loader_idx: int, embeddings: torch.Tensor, labels: torch.Tensor,
            indices: torch.Tensor) -> None:
        self.parts.setdefault(loader_idx, []).append(
            (embeddings.detach().float(), labels.detach(), indices.detach()))

    def concatenated(self, loader_idx: int):
        emb, lab, idx = zip(*self.parts[loader_idx])
        return torch.cat(emb), torch.cat(lab), torch.cat(idx)

    def clear(self) -> None:
        self.parts = {}


def gather_by_index(embeddings: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
                    all_gather: Optional[Callable] = None, world_size: int = 1):
    """All-gather a sharded evaluation set and return it deduplicated, in data-set order."""
    if world_size > 1 and all_gather is not None:
        embeddings = all_gather(embeddings).reshape(-1, embeddings.shape[-1])
        labels = all_gather(labels).reshape(-1)
        indices = all_gather(indices).reshape(-1)
    indices = indices.cpu()
    order = torch.argsort(indices, stable=True)
    sorted_idx = indices[order]
    first = torch.ones_like(sorted_idx, dtype=torch.bool)
    first[1:] = sorted_idx[1:] != sorted_idx[:-1]
    keep = order[first]
    return embeddings.cpu()[keep], labels.cpu()[keep], indices[keep]


def score(protocol: str, sets: Dict[str, tuple], ks: Sequence[int], with_nmi: bool = True,
          nmi_seed: int = 0, backend: str = "auto", device=None) -> Dict[str, float]:
    """Recall@K, MAP@R, R-Precision (and NMI) for the 'test' or 'query_gallery' protocol.

    ``device``: where the retrieval metrics compute (the model's GPU during training)."""
    if protocol == "test":
        emb, lab = sets["test"][:2]
        out = retrieval_metrics(emb, lab, ks, backend=backend, device=device)
        if with_nmi:
            out["NMI"] = nmi(emb, lab, seed=nmi_seed, backend="auto")
        return out
    q, ql = sets["query"][:2]
    g, gl = sets["gallery"][:2]
    out = retrieval_metrics(q, ql, ks, gallery_embeddings=g, gallery_labels=gl, backend=backend,
                            device=device)
    if with_nmi:  # clustering quality of the whole test split (query and gallery together)
        out["NMI"] = nmi(torch.cat([q, g]), torch.cat([ql, gl]), seed=nmi_seed)
    return out
