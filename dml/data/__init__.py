"""Data: DataModules for the benchmarks and the embedded synthetic set, and the batch sampler."""
from dml.data.datamodule import DMLDataModule
from dml.data.sampler import ClassBalancedBatchSampler
from dml.data.synthetic import SyntheticShapes
from dml.data.synthetic_datamodule import SyntheticDataModule

__all__ = ["DMLDataModule", "ClassBalancedBatchSampler", "SyntheticShapes", "SyntheticDataModule"]
