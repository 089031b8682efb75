"""Lightning callbacks: the methods' state across steps (the cross-batch memory of XBM / XBN,
CCP's projection rounds), the dashboard figures, and checkpoints that hold the last state."""
from dml.callbacks.ccp import ChanceConstraintProjection
from dml.callbacks.checkpoint import AtomicCheckpointIO, RunCheckpoint
from dml.callbacks.cross_batch_memory import CrossBatchMemory
from dml.callbacks.dashboard import DashboardFigures
from dml.callbacks.learning_rates import LearningRateMonitor

__all__ = ["AtomicCheckpointIO", "ChanceConstraintProjection", "CrossBatchMemory",
           "DashboardFigures", "LearningRateMonitor", "RunCheckpoint"]
