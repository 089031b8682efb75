"""Cross-batch memory: the ring buffer, XBN's moment matching and its Kalman filter."""
from dml.memory.moments import MomentKalmanFilter, ScalarKalman, batch_moments, moment_match
from dml.memory.ring_buffer import EmbeddingRingBuffer

__all__ = ["moment_match", "batch_moments", "MomentKalmanFilter", "ScalarKalman",
           "EmbeddingRingBuffer"]
