"""Lightning callbacks that carry the methods' state across steps: the cross-batch memory."""
from dml.callbacks.cross_batch_memory import CrossBatchMemory

__all__ = ["CrossBatchMemory"]
