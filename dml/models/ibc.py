"""IBC's training objective around the message-passing network (METHODS.md, "IBC").

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

from dml.models.message_passing import MessagePassingNetwork


class IntraBatchConnections(nn.Module):
    def __init__(self, embedding_dim: int, num_classes: int, layers: int = 1, heads: int = 2,
                 dropout: float = 0.1, ff_hidden: int = 2048, concat: bool = False,
                 tau: float = 0.2, label_smoothing: float = 0.1, mpn_weight: float = 1.0):
        super().__init__()
        self.mpn = MessagePassingNetwork(embedding_dim, layers, heads, dropout, ff_hidden, concat)
        self.backbone_classifier = nn.Linear(embedding_dim, num_classes)
        self.neck = nn.BatchNorm1d(self.mpn.out_dim)
        self.neck.bias.requires_grad_(False)  # frozen at 0
        self.classifier = nn.Linear(self.mpn.out_dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)
        self.tau, self.label_smoothing, self.mpn_weight = tau, label_smoothing, mpn_weight

    def ce(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits / self.tau, labels, label_smoothing=self.label_smoothing)

    def forward(self, raw: torch.Tensor, normalized: torch.Tensor, labels: torch.Tensor,
                raw_labels: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
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
    def refine(self, embeddings: torch.Tensor, neighbours: torch.Tensor, mask: torch.Tensor,
               reference: Optional[torch.Tensor] = None, chunk: int = 4096) -> torch.Tensor:
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
