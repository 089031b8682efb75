"""IBC's training objective around the message-passing network (docs/methods/ibc.md).

    L = CE_ls(W_b x / tau, y) + CE_ls(W_m BN(MPN(n(x))) / tau, y)

x is the head's unnormalised embedding, n(x) its L2 normalisation (what retrieval uses),
CE_ls the label-smoothed cross-entropy (0.1), W_b a linear classifier on x, and the MPN
branch's neck a BatchNorm1d with its bias frozen at 0 followed by a bias-free classifier
initialised N(0, 0.001^2). The MPN is a training device: evaluation embeds with the backbone
only, unless the pseudo-test mode refines each sample over its k-reciprocal neighbours.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn


class IntraBatchConnections(nn.Module):
    """IBC's objective term. ``mpn``: the message-passing network
    (``dml.models.MessagePassingNetwork``, built by ``dml.builder``), with an ``out_dim``.
    Its parameters train at the network's learning rate (optimizer group "head")."""

    param_group = "head"

    def __init__(
        self,
        mpn: nn.Module,
        embedding_dim: int,
        num_classes: int,
        tau: float = 0.2,
        label_smoothing: float = 0.1,
        mpn_weight: float = 1.0,
    ):
        super().__init__()
        self.mpn = mpn
        self.backbone_classifier = nn.Linear(embedding_dim, num_classes)
        self.neck = nn.BatchNorm1d(self.mpn.out_dim)
        self.neck.bias.requires_grad_(False)  # frozen at 0
        self.classifier = nn.Linear(self.mpn.out_dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)
        self.tau, self.label_smoothing, self.mpn_weight = tau, label_smoothing, mpn_weight

    def ce(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits / self.tau, labels, label_smoothing=self.label_smoothing)

    def forward(
        self,
        raw: torch.Tensor,
        normalized: torch.Tensor,
        labels: torch.Tensor,
        raw_labels: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """{"ibc_backbone": CE on W_b x, "ibc_mpn": mpn_weight * CE on the MPN branch}.

        Under DDP with a gathered batch, ``normalized`` and ``labels`` are the global batch
        (the MPN passes messages over all of it) and ``raw`` with ``raw_labels`` this
        process's rows."""
        raw_labels = labels if raw_labels is None else raw_labels
        parts = {"ibc_backbone": self.ce(self.backbone_classifier(raw), raw_labels)}
        if self.mpn_weight:
            logits = self.classifier(self.neck(self.mpn(normalized)))
            parts["ibc_mpn"] = self.mpn_weight * self.ce(logits, labels)
        return parts

    @torch.no_grad()
    def refine(
        self,
        embeddings: torch.Tensor,
        neighbours: torch.Tensor,
        mask: torch.Tensor,
        reference: Optional[torch.Tensor] = None,
        chunk: int = 4096,
    ) -> torch.Tensor:
        """Pseudo-test: each row i of ``embeddings`` passed through the MPN together with its
        neighbours ``reference[neighbours[i]]`` where ``mask[i]`` (k-reciprocal ones); returns
        row i's MPN output, L2-normalised (n, out_dim)."""
        reference = embeddings if reference is None else reference
        out = []
        for start in range(0, len(embeddings), chunk):
            rows = slice(start, start + chunk)
            group = torch.cat([embeddings[rows, None], reference[neighbours[rows]]], dim=1)
            keys = torch.cat([torch.ones_like(mask[rows, :1]), mask[rows]], dim=1)
            out.append(self.mpn(group, keys)[:, 0])
        return F.normalize(torch.cat(out), dim=-1)


def pseudo_test_refiner(ibc: IntraBatchConnections, k: int):
    """IBC's pseudo-test as an evaluation refinement (``dml.evaluation.Evaluator(refine=...)``):
    every embedding replaced by its MPN output over itself and its k-reciprocal neighbours
    (the queries' neighbours taken from the reference set)."""
    from dataclasses import replace

    from dml.metrics import k_reciprocal_neighbors

    def refine(sets):
        device = next(ibc.parameters()).device
        backend = "torch" if device.type != "cpu" else "auto"
        reference = sets.reference.embeddings.to(device)
        was_training = ibc.training
        ibc.eval()

        def one(s):
            emb = s.embeddings.to(device)
            if s is sets.reference:
                idx, mask = k_reciprocal_neighbors(emb, k, backend=backend)
                new = ibc.refine(emb, idx.to(device), mask.to(device))
            else:
                idx, mask = k_reciprocal_neighbors(emb, k, reference, backend=backend)
                new = ibc.refine(emb, idx.to(device), mask.to(device), reference)
            return replace(s, embeddings=new)

        try:
            return sets.map(one)
        finally:
            ibc.train(was_training)

    return refine
