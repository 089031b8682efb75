"""Cross-batch memory: the stored rows and their one writer, the ring buffer, XBN's moment
matching and its Kalman filter."""

from dml.memory.cross_batch import Affine, CrossBatchMemory, NewRows
from dml.memory.moments import MomentKalmanFilter, ScalarKalman, batch_moments, moment_match
from dml.memory.ring_buffer import EmbeddingRingBuffer

__all__ = [
    "CrossBatchMemory",
    "Affine",
    "NewRows",
    "moment_match",
    "batch_moments",
    "MomentKalmanFilter",
    "ScalarKalman",
    "EmbeddingRingBuffer",
]
