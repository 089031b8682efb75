"""Lightning callbacks. Method schedules: CCP's projection rounds and XBN's moment matching of the
cross-batch memory (both act on the objective through its public methods); observers: the
memory's drift and the dashboard figures; run keeping: checkpoints that hold the last state,
early stopping, the learning-rate log."""

from dml.callbacks.ccp import ChanceConstraintProjection
from dml.callbacks.checkpoint import AtomicCheckpointIO, RunCheckpoint
from dml.callbacks.dashboard import DashboardFigures
from dml.callbacks.early_stopping import EarlyStopping
from dml.callbacks.learning_rates import LearningRateMonitor
from dml.callbacks.memory_drift import MemoryDrift
from dml.callbacks.progress import ProgressBar
from dml.callbacks.xbn import CrossBatchNormalization

__all__ = [
    "AtomicCheckpointIO",
    "ChanceConstraintProjection",
    "CrossBatchNormalization",
    "DashboardFigures",
    "EarlyStopping",
    "LearningRateMonitor",
    "MemoryDrift",
    "ProgressBar",
    "RunCheckpoint",
]
