"""Global pooling of a feature map (B, C, H, W) into one vector per image (B, C).

- GAP: f = (1/n) sum_i x_i, n = H * W.
- GMP: f = max_i x_i (per channel).
- GeM: f = ((1/n) sum_i x_i^p)^(1/p), learnable p (Radenovic et al., 2018).
- cls: f = x_cls, a ViT's class token (the representation DINO and CLIP pretrain); the patch
  tokens' map is not used.

Every pooling subclasses ``Pooling``: it is called as ``pooling(feature_map,
projection=head_linear)`` and returns a ``PoolingOutput``, so that learnable poolings (GSP,
``dml.models.gsp``) can compute their costs in the embedding space and hand their per-location
weights and per-image attributes to losses and dashboards without re-running. Poolings are
chosen by name in ``dml.builder.POOLINGS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn


@dataclass
class PoolingOutput:
    """pooled: (B, C). weights: (B, H*W) per-location weights or None. attributes: (B, m) or
    None."""

    pooled: torch.Tensor
    weights: Optional[torch.Tensor] = None
    attributes: Optional[torch.Tensor] = None


class Pooling(nn.Module):
    """What every pooling offers the model (``dml.builder`` and ``DMLModule`` rely on nothing
    else):

    - ``forward(feature_map, projection=head_linear) -> PoolingOutput``;
    - ``uses_projection``: whether it needs the head's linear map (``projection``; GSP's costs
      live in the embedding space); such a pooling cannot go with no head
      (``model.embedding_dim: null``, where ``projection`` is None);
    - ``produces_attributes``: whether ``PoolingOutput.attributes`` holds a per-image
      distribution over the pooling's parts (GSP's prototypes; the zero-shot loss needs it);
    - ``wants_initialization()``: true while ``initialize(candidates)`` should run before the
      next training step, on candidates from ``candidate_source(n_class_rows)``:
      "class_rows" (the objective's class representatives, e.g. proxies) or "embeddings"
      (GAP embeddings of ``init_batches`` training batches). The model calls it on the first
      training step, on rank 0, and broadcasts the pooling's state.
    """

    produces_attributes = False
    uses_projection = False  # True: forward needs projection=the head's nn.Linear (GSP)
    uses_class_token = False  # True: forward also takes class_token=(B, C) (ViT backbones)
    init_batches = 0

    def forward(self, x: torch.Tensor, projection=None) -> PoolingOutput:
        raise NotImplementedError

    def wants_initialization(self) -> bool:
        return False

    def candidate_source(self, num_class_rows: Optional[int]) -> str:
        return "embeddings"

    def initialize(self, candidates: torch.Tensor) -> None:
        pass


def pool_images(backbone: nn.Module, pooling: "Pooling", images: torch.Tensor, projection=None):
    """(feature map, PoolingOutput) of ``images``: the one path from images to the pooled vector
    (training, export, dashboards), handing the class token to a pooling that uses it."""
    if pooling.uses_class_token:
        feature_map, class_token = backbone(images, with_class_token=True)
        return feature_map, pooling(feature_map, projection=projection, class_token=class_token)
    feature_map = backbone(images)
    return feature_map, pooling(feature_map, projection=projection)


class GAP(Pooling):
    def __init__(self, in_channels: int):
        super().__init__()

    def forward(self, x: torch.Tensor, projection=None) -> PoolingOutput:
        return PoolingOutput(x.mean(dim=(2, 3)))


class GMP(Pooling):
    def __init__(self, in_channels: int):
        super().__init__()

    def forward(self, x: torch.Tensor, projection=None) -> PoolingOutput:
        return PoolingOutput(x.amax(dim=(2, 3)))


class GeM(Pooling):
    def __init__(self, in_channels: int, p: float = 3.0, learn_p: bool = True, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)), requires_grad=learn_p)
        self.eps = eps

    def forward(self, x: torch.Tensor, projection=None) -> PoolingOutput:
        pooled = x.clamp_min(self.eps).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)
        return PoolingOutput(pooled)


class ClassToken(Pooling):
    """f = x_cls: the backbone's class token (``model.pooling.name: cls``; timm ViTs)."""

    uses_class_token = True

    def __init__(self, in_channels: int):
        super().__init__()

    def forward(self, x: torch.Tensor, projection=None, class_token=None) -> PoolingOutput:
        if class_token is None:
            raise ValueError(
                "the cls pooling needs the backbone's class token "
                "(dml.models.pooling.pool_images passes it)"
            )
        return PoolingOutput(class_token)
