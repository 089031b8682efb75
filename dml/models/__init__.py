"""Networks: backbones (feature maps), pooling (GAP, GMP, GeM, GSP), embedding heads, and
IBC's message passing over the batch."""
from dml.models.backbones import Backbone, PretrainedWeightsUnavailable, freeze_batchnorm
from dml.models.heads import EmbeddingHead
from dml.models.ibc import IntraBatchConnections
from dml.models.message_passing import MessagePassingNetwork, zero_logit_softmax
from dml.models.gsp import GSP, lipschitz_normalize, partial_transport
from dml.models.pooling import POOLING_NAMES, PoolingOutput, build_pooling

__all__ = ["Backbone", "PretrainedWeightsUnavailable", "freeze_batchnorm", "EmbeddingHead",
           "POOLING_NAMES", "PoolingOutput", "build_pooling", "GSP", "partial_transport",
           "lipschitz_normalize", "IntraBatchConnections", "MessagePassingNetwork",
           "zero_logit_softmax"]
