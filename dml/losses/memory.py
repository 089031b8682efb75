"""XBM's memory term (Wang et al., CVPR 2020): weight * L(batch, memory).

``CrossBatchMemoryLoss`` is a ``dml.memory.CrossBatchMemory`` (the stored rows, their sums and
transforms, one writer) that is also an objective term, called like every term as
``term(embedded, labels, objective)``. From ``start_iteration`` on, each step:

1. the global batch (the embeddings of every process, in rank order, with their labels and, where
   the module passes them as ``embedded["indices"]``, their training-set indices) is gathered;
2. the memory's transforms run (XBN's moment matching registers one), their updates written by
   the memory;
3. with ``enqueue: before`` (the released XBM trainer) the batch is enqueued, then the term
   weight * L(batch, memory) is computed; with ``after`` the term sees the earlier batches
   only and the batch is enqueued after it.

The pairs (batch row, stored row) the term sums over come from ``select_pairs``: the term's own
miner when it has one, else the objective's miner, else every pair; the loss is the term's own
when it has one, else the objective's metric loss. A variant (hard negatives only, say) is a
subclass that overrides ``select_pairs`` or ``loss_value``, named by class path in
``model.memory.implementation``.

Every process holds the same memory; the term covers the process's local batch. A batch with
NaN or inf is neither matched to nor stored (the non-finite loss guard stops or skips that step).

``diagnostics`` says what the memory does to a batch, for the training log (the module logs it
on the logger's steps; it changes nothing): the stored rows, the stored positives and negatives
per anchor, and the share of stored negatives that are active, i.e. inside the loss's negative
margin (``active_negatives``), which is what makes a summed memory term grow with the memory.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dml.distributed import gather_rows
from dml.errors import ConfigError
from dml.memory.cross_batch import CrossBatchMemory


class CrossBatchMemoryLoss(CrossBatchMemory):
    """Args:
    dim: embedding dimension.
    size: rows kept (55,000 in the XBM sample config).
    start_iteration: warm-up steps without the memory (1,000).
    weight: w of the memory term.
    enqueue: before | after the memory term.
    store: normalized (the L2-normalised embeddings, what the losses compare) or raw (the
        head's output, normalised after any transform).
    loss: the term's own pair loss (default: the objective's metric loss).
    miner: the term's own pair selection (default: the objective's miner, else all pairs).
    """

    def __init__(
        self,
        dim: int,
        size: int = 55000,
        start_iteration: int = 1000,
        weight: float = 1.0,
        enqueue: str = "before",
        store: str = "normalized",
        loss: Optional[nn.Module] = None,
        miner: Optional[nn.Module] = None,
    ):
        if size < 1 or start_iteration < 0:
            raise ConfigError("model.memory.size must be >= 1 and start_iteration >= 0")
        if enqueue not in ("before", "after"):
            raise ConfigError(f"model.memory.enqueue: expected before or after, got {enqueue!r}")
        if store not in ("normalized", "raw"):
            raise ConfigError(f"model.memory.store: expected normalized or raw, got {store!r}")
        super().__init__(dim, size)
        self.start_iteration, self.weight = start_iteration, weight
        self.enqueue_first, self.store = enqueue == "before", store
        self.loss, self.miner = loss, miner
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))

    # --- what a variant overrides ----------------------------------------------------------
    def select_pairs(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        reference: torch.Tensor,
        reference_labels: torch.Tensor,
        objective: Any,
    ):
        """The (batch, stored) pairs the loss sums over, in pytorch-metric-learning's
        indices-tuple form; None: every pair."""
        miner = self.miner if self.miner is not None else getattr(objective, "miner", None)
        return None if miner is None else miner(embeddings, labels, reference, reference_labels)

    def loss_value(
        self, embeddings, labels, pairs, reference, reference_labels, objective: Any
    ) -> torch.Tensor:
        """L(batch, memory) over ``pairs``."""
        loss = self.term_loss(objective)
        if loss is None:
            raise ConfigError(
                "model.memory: no pair loss to compare the batch with the memory "
                "(set model.memory.loss or model.loss.name)"
            )
        return loss(embeddings, labels, pairs, reference, reference_labels)

    def term_loss(self, objective: Any) -> Optional[nn.Module]:
        """The pair loss the term uses: its own, else the objective's metric loss."""
        return self.loss if self.loss is not None else getattr(objective, "metric_loss", None)

    @torch.no_grad()
    def diagnostics(
        self, embeddings: torch.Tensor, labels: torch.Tensor, objective: Any = None
    ) -> Dict[str, torch.Tensor]:
        """For the batch rows against the stored rows (empty before the memory starts):
        memory/stored, memory/positives_per_anchor, memory/negatives_per_anchor and, for a
        loss with a negative margin (``active_negatives``), memory/active_negatives: the
        share of (batch row, stored row of another class) pairs inside it."""
        if int(self.iteration) <= self.start_iteration or len(self) == 0:
            return {}
        reference = self.stored
        if self.store == "raw":
            reference = F.normalize(reference, dim=1)
        same = labels[:, None] == self.stored_labels[None, :]
        negatives = ~same
        out = {
            "memory/stored": torch.tensor(float(len(self)), device=reference.device),
            "memory/positives_per_anchor": same.sum(1).float().mean(),
            "memory/negatives_per_anchor": negatives.sum(1).float().mean(),
        }
        active = active_negatives(self.term_loss(objective), embeddings.float(), reference.float())
        if active is not None:
            out["memory/active_negatives"] = (
                active & negatives
            ).sum().float() / negatives.sum().clamp_min(1)
        return out

    # --- the term --------------------------------------------------------------------------
    def forward(
        self, embedded: Dict[str, Any], labels: torch.Tensor, objective: Any = None
    ) -> Dict[str, torch.Tensor]:
        """{"memory": weight * L(batch, memory)} after the warm-up, {} before."""
        self.iteration.add_(1)
        if int(self.iteration) <= self.start_iteration:
            return {}
        embeddings = embedded["embeddings"]
        space = embedded["raw_embeddings"] if self.store == "raw" else embeddings
        batch = gather_rows(space.detach().float())
        batch_labels = gather_rows(labels)
        ids = embedded.get("indices")
        batch_ids = None if ids is None else gather_rows(torch.as_tensor(ids, device=labels.device))
        if not bool(torch.isfinite(batch).all()):
            return {}
        self.transform(batch)
        step = int(self.iteration)
        if self.enqueue_first:
            self.enqueue(batch, batch_labels, step, batch_ids)
        parts = {}
        if len(self) > 0:
            reference = self.stored
            if self.store == "raw":
                reference = F.normalize(reference, dim=1)
            ref_labels = self.stored_labels
            pairs = self.select_pairs(embeddings, labels, reference, ref_labels, objective)
            parts["memory"] = self.weight * self.loss_value(
                embeddings, labels, pairs, reference, ref_labels, objective
            )
        if not self.enqueue_first:
            self.enqueue(batch, batch_labels, step, batch_ids)
        return parts


def active_negatives(
    loss: Optional[nn.Module], embeddings: torch.Tensor, reference: torch.Tensor
) -> Optional[torch.Tensor]:
    """(batch, reference) flags of the pairs that a negative pair of ``loss`` would penalise:
    XBM's contrastive loss: cosine similarity > margin; pytorch-metric-learning's contrastive
    loss: inside ``neg_margin`` in its distance (a similarity above it, a distance below it);
    multi-similarity: similarity above ``base`` (lambda). None for any other loss."""
    from dml.losses.xbm import XBMContrastiveLoss

    if isinstance(loss, XBMContrastiveLoss):
        z = F.normalize(embeddings, dim=1) if loss.normalize else embeddings
        ref = F.normalize(reference, dim=1) if loss.normalize else reference
        return z @ ref.T > loss.margin
    margin = getattr(loss, "neg_margin", getattr(loss, "base", None))
    distance = getattr(loss, "distance", None)
    if margin is None or distance is None:
        return None
    matrix = distance(embeddings, reference)
    return matrix > margin if distance.is_inverted else matrix < margin
