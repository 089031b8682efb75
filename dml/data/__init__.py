"""Data: DataModules for the benchmarks and the embedded synthetic set, and the batch sampler."""

from dml.data.benchmarks import DatasetNotFound, IncompleteDataset, MetadataError
from dml.data.datamodule import DMLDataModule
from dml.data.image_datamodules import (
    DATAMODULES,
    CarsDataModule,
    CUBDataModule,
    ImageDataModule,
    InShopDataModule,
    OmniglotDataModule,
    SOPDataModule,
    mlrc_fold_mask,
)
from dml.data.image_list import ImageList, ImageListDataset, UnreadableImageError
from dml.data.sampler import ClassBalancedBatchSampler
from dml.data.synthetic import SyntheticShapes
from dml.data.synthetic_datamodule import SyntheticDataModule

__all__ = [
    "DMLDataModule",
    "ImageDataModule",
    "CUBDataModule",
    "CarsDataModule",
    "SOPDataModule",
    "InShopDataModule",
    "OmniglotDataModule",
    "SyntheticDataModule",
    "DATAMODULES",
    "ClassBalancedBatchSampler",
    "SyntheticShapes",
    "ImageList",
    "ImageListDataset",
    "UnreadableImageError",
    "DatasetNotFound",
    "IncompleteDataset",
    "MetadataError",
    "mlrc_fold_mask",
]
