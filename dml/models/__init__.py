"""Networks: backbones (feature maps; torchvision, timm), poolings (GAP, GMP, GeM, GSP, cls),
embedding heads (or none: ``PooledFeatures``), and IBC's
message passing over the batch."""

from dml.models.backbones import Backbone, PretrainedWeightsUnavailable, freeze_batchnorm
from dml.models.gsp import GSP, partial_transport
from dml.models.heads import EmbeddingHead, PooledFeatures
from dml.models.message_passing import MessagePassingNetwork, zero_logit_softmax
from dml.models.pooling import GAP, GMP, ClassToken, GeM, Pooling, PoolingOutput, pool_images

__all__ = [
    "Backbone",
    "PretrainedWeightsUnavailable",
    "freeze_batchnorm",
    "EmbeddingHead",
    "PooledFeatures",
    "Pooling",
    "PoolingOutput",
    "pool_images",
    "GAP",
    "GMP",
    "GeM",
    "GSP",
    "ClassToken",
    "partial_transport",
    "MessagePassingNetwork",
    "zero_logit_softmax",
]
