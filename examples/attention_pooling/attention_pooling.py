"""A pooling in one file: attention-weighted pooling of the backbone's feature map.

For the feature map x of one image, x_i in R^C at the n = H * W locations i, its C channels
split into h groups of C / h (x_i = [x_i^1; ...; x_i^h]), and a learnable 1x1 scoring
w_k in R^(C/h) per head k = 1..h:

    a_ki = <w_k, x_i^k>                                 the score of location i (head k)
    p_ki = exp(a_ki) / sum_j exp(a_kj)                  softmax over the n locations
    f    = [sum_i p_1i x_i^1; ...; sum_i p_hi x_i^h]    in R^C

With one head (the default) that is f = sum_i p_i x_i. The scorers start at zero, so that at
step 0 every p_ki = 1/n and f = (1/n) sum_i x_i: exactly GAP; training moves them away from it.
(A bias would change nothing: the softmax is invariant to a shift of all scores.) The
per-location weights (B, H*W), the heads' mean (1/h) sum_k p_ki, go to ``PoolingOutput.weights``
(what the dashboard overlays on images, as it does GSP's); there are no attributes (no
distribution over parts: ``produces_attributes`` stays False, so the zero-shot loss refuses it).

It is a pooling, so it replaces GAP or GSP (``model.pooling``); it composes with every loss,
memory (XBM, XBN) and schedule (CCP). Use it with
``examples/attention_pooling/attention_pooling.yaml`` and this folder on ``PYTHONPATH``
(docs/extending.md).
"""

import torch
from torch import nn

from dml.models import Pooling, PoolingOutput


class AttentionPooling(Pooling):
    """Args: ``in_channels`` C (passed by the builder) and ``heads`` h (C divisible by h)."""

    def __init__(self, in_channels: int, heads: int = 1):
        super().__init__()
        if heads < 1 or in_channels % heads:
            raise ValueError(
                f"model.pooling.params.heads: expected a divisor of the "
                f"backbone's {in_channels} channels, got {heads}"
            )
        self.heads = heads
        # one row w_k per head, over its C / h channels; zero: GAP at step 0
        self.scorer = nn.Parameter(torch.zeros(heads, in_channels // heads))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """a: (B, h, n), the score of every location for every head."""
        b, c, height, width = x.shape
        groups = x.reshape(b, self.heads, c // self.heads, height * width)
        return torch.einsum("bkcn,kc->bkn", groups, self.scorer.to(x.dtype))

    def forward(self, x: torch.Tensor, projection=None) -> PoolingOutput:
        b, c, height, width = x.shape
        a = self.scores(x)
        if a.element_size() < 4:  # the softmax in float32 under bf16-mixed (float64 stays)
            a = a.float()
        p = a.softmax(dim=-1)  # (B, h, n), sums to 1 over n
        groups = x.reshape(b, self.heads, c // self.heads, height * width)
        pooled = torch.einsum("bkcn,bkn->bkc", groups, p.to(x.dtype)).reshape(b, c)
        return PoolingOutput(pooled, weights=p.mean(dim=1))
