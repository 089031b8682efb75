"""IBC's message-passing network (MPN) over the samples of a mini-batch (Seidenschwarz, Elezi,
Leal-Taixe, ICML 2021; docs/methods/ibc.md).

The graph is fully connected with self-loops: every sample attends to every sample of its
group, itself included. One layer is a post-LayerNorm Transformer encoder block with H heads
(d_h = d / H):

    q, k, v = W_q h, W_k h, W_v h;   s_ij = q_i . k_j / sqrt(d_h)
    a_ij = exp(s_ij) / (1 + sum_j' exp(s_ij'))          (softmax with an extra zero logit)
    m_i = sum_j Dropout(a)_ij v_j;   h' = LN(h + Dropout(W_o [m^1 .. m^H]))
    h'' = LN(h' + Dropout(W_2 Dropout(ReLU(W_1 h'))))

The extra zero logit lets a node take in less than a full unit of messages (sum_j a_ij < 1).
Inputs are (n, d) for one group (a training batch) or (G, n, d) with a key mask (G, n) for
padded groups (the pseudo-test mode's k-reciprocal neighbourhoods).
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import nn


def zero_logit_softmax(scores: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a_ij = exp(s_ij) / (1 + sum_j exp(s_ij)) along the last dimension; masked-out entries
    (``mask`` False) get weight 0. Computed as a log-sum-exp over the logits and a zero."""
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    zero = torch.zeros_like(scores[..., :1])
    log_norm = torch.logsumexp(torch.cat([scores, zero], dim=-1), dim=-1, keepdim=True)
    return torch.exp(scores - log_norm)


class MessagePassingLayer(nn.Module):
    """One attention block over a group of samples (see the module docstring)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.1, ff_hidden: int = 2048):
        super().__init__()
        if dim % heads:
            raise ValueError(f"message passing: dim {dim} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ff = nn.Sequential(
            nn.Linear(dim, ff_hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ff_hidden, dim)
        )
        self.dropout = nn.Dropout(dropout)
        self.attention_dropout = nn.Dropout(dropout)
        self.last_attention: Optional[torch.Tensor] = None  # (G, H, n, n), for inspection

    def attention(self, h: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The attention weights a (G, H, n, n) of a (G, n, d) input; mask (G, n) of keys."""
        g, n, _ = h.shape
        q = self.q(h).view(g, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(h).view(g, n, self.heads, self.head_dim).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        key_mask = None if mask is None else mask[:, None, None, :]
        return zero_logit_softmax(scores, key_mask)

    def forward(self, h: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        g, n, d = h.shape
        a = self.attention(h, mask)
        self.last_attention = a.detach()
        v = self.v(h).view(g, n, self.heads, self.head_dim).transpose(1, 2)
        messages = (self.attention_dropout(a) @ v).transpose(1, 2).reshape(g, n, d)
        h = self.norm1(h + self.dropout(self.out(messages)))
        return self.norm2(h + self.dropout(self.ff(h)))


class MessagePassingNetwork(nn.Module):
    """h0 = W0 f + b0, then L message-passing layers. Returns the last layer's output, or with
    ``concat`` all layer outputs side by side (dim * L)."""

    def __init__(
        self,
        dim: int,
        layers: int = 1,
        heads: int = 2,
        dropout: float = 0.1,
        ff_hidden: int = 2048,
        concat: bool = False,
    ):
        super().__init__()
        if layers < 1 or heads < 1:
            raise ValueError("message passing: layers and heads must be >= 1")
        self.input = nn.Linear(dim, dim)
        self.layers = nn.ModuleList(
            MessagePassingLayer(dim, heads, dropout, ff_hidden) for _ in range(layers)
        )
        self.concat = concat
        self.out_dim = dim * layers if concat else dim

    def forward(self, f: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """f (n, d) -> (n, out_dim), or (G, n, d) with mask (G, n) -> (G, n, out_dim)."""
        single = f.ndim == 2
        h = self.input(f[None] if single else f)
        outputs: List[torch.Tensor] = []
        for layer in self.layers:
            h = layer(h, mask)
            outputs.append(h)
        out = torch.cat(outputs, dim=-1) if self.concat else h
        return out[0] if single else out
