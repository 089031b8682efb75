"""Networks: backbones (feature maps), pooling, embedding heads; later GSP and message passing."""
from dml.models.backbones import Backbone, PretrainedWeightsUnavailable, freeze_batchnorm
from dml.models.heads import EmbeddingHead
from dml.models.pooling import POOLINGS, PoolingOutput, build_pooling

__all__ = ["Backbone", "PretrainedWeightsUnavailable", "freeze_batchnorm", "EmbeddingHead",
           "POOLINGS", "PoolingOutput", "build_pooling"]
