"""Lightning callbacks that carry the methods' state across steps: the cross-batch memory (XBM /
XBN) and CCP's projection rounds."""
from dml.callbacks.ccp import ChanceConstraintProjection
from dml.callbacks.cross_batch_memory import CrossBatchMemory

__all__ = ["ChanceConstraintProjection", "CrossBatchMemory"]
