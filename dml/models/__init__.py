"""Networks: backbones (feature maps), poolings (GAP, GMP, GeM, GSP), embedding heads, and IBC's
message passing over the batch."""
from dml.models.backbones import Backbone, PretrainedWeightsUnavailable, freeze_batchnorm
from dml.models.gsp import GSP, partial_transport
from dml.models.heads import EmbeddingHead
from dml.models.message_passing import MessagePassingNetwork, zero_logit_softmax
from dml.models.pooling import GAP, GMP, GeM, Pooling, PoolingOutput

__all__ = ["Backbone", "PretrainedWeightsUnavailable", "freeze_batchnorm", "EmbeddingHead",
           "Pooling", "PoolingOutput", "GAP", "GMP", "GeM", "GSP", "partial_transport",
           "MessagePassingNetwork", "zero_logit_softmax"]
