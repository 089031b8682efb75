"""Lightning callbacks that carry the methods' state across steps: the cross-batch memory (XBM /
XBN) and CCP's projection rounds."""
from dml.callbacks.ccp import ChanceConstraintProjection
from dml.callbacks.cross_batch_memory import CrossBatchMemory
from dml.callbacks.dashboard import DashboardFigures

__all__ = ["ChanceConstraintProjection", "CrossBatchMemory", "DashboardFigures"]
