"""Evaluation during training and testing: accumulate -> gather -> (refine) -> score.

``Evaluator`` collects each evaluation batch's embeddings with their labels and data-set
indices; ``collect`` gathers every process's shard (``gather_by_index``: the
``DistributedSampler``'s padding duplicates dropped, data-set order restored) into an
``EvalSets``; ``score`` computes Recall@K, MAP@R, R-Precision (and NMI) exactly
(``dml.metrics``). An optional ``refine`` step maps the sets to new ones before scoring (IBC's
pseudo-test). The last scored sets stay in ``last_sets`` (on the CPU) for dashboards and
notebooks.

``EvalSets`` is the one description of what is searched: a query set and a reference set, the
same set (CUB, Cars, SOP: each query excluded from its own search) or two (In-Shop's query and
gallery). ``EvalSets.from_named`` is the only place that reads the data modules' names
("test", or "query" and "gallery").
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence

import torch

from dml.metrics import nmi
from dml.metrics.per_query import QueryResults
from dml.metrics.retrieval import query_results, results_from_distances


@dataclass
class EvalSet:
    """One evaluation set: its data-set name, embeddings (n, D), labels (n,), indices (n,)."""

    name: str
    embeddings: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor

    def to(self, device) -> "EvalSet":
        return replace(
            self,
            embeddings=self.embeddings.to(device),
            labels=self.labels.to(device),
            indices=self.indices.to(device),
        )


@dataclass
class EvalSets:
    """What is searched: ``query`` against ``reference``; ``same`` when they are one set."""

    query: EvalSet
    reference: EvalSet

    @property
    def same(self) -> bool:
        return self.query is self.reference

    @property
    def sets(self) -> List[EvalSet]:
        """The distinct sets (one or two)."""
        return [self.query] if self.same else [self.query, self.reference]

    @classmethod
    def from_named(cls, named: Dict[str, EvalSet]) -> "EvalSets":
        if set(named) == {"test"}:
            return cls(named["test"], named["test"])
        if set(named) == {"query", "gallery"}:
            return cls(named["query"], named["gallery"])
        raise ValueError(
            f"evaluation sets must be named test, or query and gallery; got {sorted(named)}"
        )

    def map(self, fn: Callable[[EvalSet], EvalSet]) -> "EvalSets":
        if self.same:
            new = fn(self.query)
            return EvalSets(new, new)
        return EvalSets(fn(self.query), fn(self.reference))

    def cpu(self) -> "EvalSets":
        return self.map(lambda s: s.to("cpu"))


def gather_by_index(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    indices: torch.Tensor,
    all_gather: Optional[Callable] = None,
    world_size: int = 1,
):
    """All-gather a sharded evaluation set and return it deduplicated, in data-set order.
    Processes may hold different numbers of rows (images skipped as unreadable): each pads
    to the largest count with rows of index -1, which are dropped after the gather."""
    if world_size > 1 and all_gather is not None:
        counts = all_gather(torch.tensor([len(indices)], device=indices.device)).reshape(-1)
        pad = int(counts.max()) - len(indices)
        if pad:
            embeddings = torch.cat([embeddings, embeddings.new_zeros(pad, embeddings.shape[-1])])
            labels = torch.cat([labels, labels.new_zeros(pad)])
            indices = torch.cat([indices, indices.new_full((pad,), -1)])
        embeddings = all_gather(embeddings).reshape(-1, embeddings.shape[-1])
        labels = all_gather(labels).reshape(-1)
        indices = all_gather(indices).reshape(-1)
        real = indices >= 0
        embeddings, labels, indices = embeddings[real], labels[real], indices[real]
    indices = indices.cpu()
    order = torch.argsort(indices, stable=True)
    sorted_idx = indices[order]
    first = torch.ones_like(sorted_idx, dtype=torch.bool)
    first[1:] = sorted_idx[1:] != sorted_idx[:-1]
    keep = order[first]
    return embeddings.cpu()[keep], labels.cpu()[keep], indices[keep]


class Evaluator:
    """Args:
    nmi: also cluster the embeddings (k-means, k = classes; costly at SOP scale).
    nmi_seed: k-means seed.
    backend: the retrieval back end (``dml.metrics.retrieval_metrics``).
    refine: an optional ``EvalSets -> EvalSets`` step before scoring.
    rerank: re-rankings (``dml.reranking``) scored beside the plain metrics when ``score``
        is asked to, keyed ``<name>/<metric>``; ``rerank_params``: their parameters.
    """

    def __init__(
        self,
        nmi: bool = True,
        nmi_seed: int = 0,
        backend: str = "auto",
        refine: Optional[Callable[[EvalSets], EvalSets]] = None,
        rerank: Sequence[str] = (),
        rerank_params: Optional[Dict] = None,
    ):
        self.with_nmi, self.nmi_seed, self.backend, self.refine = nmi, nmi_seed, backend, refine
        self.rerank, self.rerank_params = list(rerank), dict(rerank_params or {})
        self.parts: Dict[int, List[tuple]] = {}
        self.last_sets: Optional[EvalSets] = None
        self.last_results: Optional[QueryResults] = None

    def reset(self) -> None:
        self.parts = {}

    def add(
        self, loader_idx: int, embeddings: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
    ) -> None:
        self.parts.setdefault(loader_idx, []).append(
            (embeddings.detach().float(), labels.detach(), indices.detach())
        )

    def collect(
        self, names: Sequence[str], all_gather: Optional[Callable] = None, world_size: int = 1
    ) -> EvalSets:
        """Every process's shards of the loaders (in loader order, named ``names``)."""
        named = {}
        for i, name in enumerate(names):
            emb, lab, idx = (torch.cat(t) for t in zip(*self.parts[i]))
            named[name] = EvalSet(name, *gather_by_index(emb, lab, idx, all_gather, world_size))
        return EvalSets.from_named(named)

    def score(
        self, sets: EvalSets, ks: Sequence[int], device=None, rerank: bool = False
    ) -> Dict[str, float]:
        """Refine (if set), then Recall@K, MAP@R, R-Precision (and NMI), and with ``rerank``
        the same metrics after each re-ranking; keeps ``last_sets`` and the per-query
        ``last_results`` of the plain metrics."""
        if self.refine is not None:
            sets = self.refine(sets)
        self.last_sets = sets.cpu()
        q, r = sets.query, sets.reference
        results = query_results(
            q.embeddings,
            q.labels,
            ks,
            gallery_embeddings=None if sets.same else r.embeddings,
            gallery_labels=None if sets.same else r.labels,
            backend=self.backend,
            device=device,
        )
        self.last_results = results
        out = results.metrics(ks)
        if self.with_nmi:  # clustering quality of the whole split (query and gallery together)
            emb = torch.cat([s.embeddings for s in sets.sets])
            lab = torch.cat([s.labels for s in sets.sets])
            out["NMI"] = nmi(emb, lab, seed=self.nmi_seed)
        if rerank:
            out.update(self.reranked_metrics(self.last_sets, ks))
        return out

    def rerank_settings(self, name: str) -> str:
        """``k1 20, k2 6, lam 0.3``: a re-ranking's parameters as scored."""
        from dml.reranking import DEFAULTS

        params = dict(DEFAULTS[name], **self.rerank_params.get(name, {}))
        return ", ".join(f"{k} {v:g}" for k, v in params.items())

    def reranked_metrics(self, sets: EvalSets, ks: Sequence[int]) -> Dict[str, float]:
        """``<name>/<metric>`` after each re-ranking, from the same exact evaluator and tie
        rule (``results_from_distances``)."""
        from dml.reranking import rerank

        q, r = sets.query, sets.reference
        out = {}
        for name in self.rerank:
            reranked = rerank(
                name,
                q.embeddings,
                None if sets.same else r.embeddings,
                **self.rerank_params.get(name, {}),
            )
            results = results_from_distances(reranked, q.labels, None if sets.same else r.labels)
            out.update({f"{name}/{k}": v for k, v in results.metrics(ks).items()})
        return out
