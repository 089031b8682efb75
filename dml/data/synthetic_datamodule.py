"""DataModule of the embedded synthetic data set (``dml.data.synthetic``): the default of
``make train``, no download, class-disjoint train/test classes."""
from __future__ import annotations

from typing import List, Optional

from dml.data.datamodule import DMLDataModule
from dml.data.synthetic import SyntheticShapes


class SyntheticDataModule(DMLDataModule):
    def __init__(self, train_classes: int = 48, test_classes: int = 48,
                 images_per_class: int = 40, image_size: int = 32, data_seed: int = 0,
                 classes_per_batch: int = 8, samples_per_class: int = 4,
                 eval_batch_size: int = 512, num_workers: int = 0,
                 recall_ks: Optional[List[int]] = None, batches_per_epoch: Optional[int] = None,
                 seed: int = 0):
        super().__init__(classes_per_batch, samples_per_class, eval_batch_size, num_workers,
                         recall_ks, batches_per_epoch, seed)
        self.train_classes, self.test_classes = train_classes, test_classes
        self.images_per_class, self.image_size = images_per_class, image_size
        self.data_seed = data_seed

    def build_train(self):
        return SyntheticShapes("train", self.train_classes, self.images_per_class,
                               self.image_size, self.data_seed)

    def build_eval(self):
        return {"test": SyntheticShapes("test", self.test_classes, self.images_per_class,
                                        self.image_size, self.data_seed)}

    def train_labels(self):
        return self.train_dataset.labels.tolist()

    @property
    def num_train_classes(self) -> int:
        return self.train_classes
