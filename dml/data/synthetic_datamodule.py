"""DataModule of the embedded synthetic data set (``dml.data.synthetic``): the default of
``make train``, no download, class-disjoint train/test classes."""

from __future__ import annotations

from typing import List, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from dml.data.datamodule import DMLDataModule
from dml.data.synthetic import SyntheticShapes


class ClassSubset(Dataset):
    """The items of ``dataset`` whose class is in ``classes``, labels renumbered 0..k-1 in the
    order of ``classes``, indices the positions in this subset."""

    def __init__(self, dataset, classes):
        labels = dataset.labels.numpy() if torch.is_tensor(dataset.labels) else dataset.labels
        self.dataset = dataset
        self.rows = np.flatnonzero(np.isin(labels, classes))
        remap = {int(c): i for i, c in enumerate(classes)}
        self.labels = torch.tensor([remap[int(labels[r])] for r in self.rows])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        image = self.dataset[int(self.rows[index])][0]
        return image, int(self.labels[index]), index


class SyntheticDataModule(DMLDataModule):
    def __init__(
        self,
        train_classes: int = 48,
        test_classes: int = 48,
        images_per_class: int = 40,
        image_size: int = 32,
        data_seed: int = 0,
        classes_per_batch: int = 8,
        samples_per_class: int = 4,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        recall_ks: Optional[List[int]] = None,
        batches_per_epoch: Optional[int] = None,
        seed: int = 0,
        mlrc_fold: Optional[int] = None,
    ):
        """mlrc_fold: None, or 0..3: train on the training classes outside that fold of 4 and
        validate on the fold (the MLRC protocol, as the image data sets do)."""
        super().__init__(
            classes_per_batch,
            samples_per_class,
            eval_batch_size,
            num_workers,
            recall_ks,
            batches_per_epoch,
            seed,
        )
        if mlrc_fold is not None:
            from dml.data.image_datamodules import mlrc_fold_mask

            mlrc_fold_mask(np.arange(4), mlrc_fold)  # validates the index
        self.mlrc_fold = mlrc_fold
        self.train_classes, self.test_classes = train_classes, test_classes
        self.images_per_class, self.image_size = images_per_class, image_size
        self.data_seed = data_seed

    def check_settings(self) -> None:
        from dml.config import check_range

        super().check_settings()
        for key, low in (
            ("train_classes", 2),
            ("test_classes", 2),
            ("images_per_class", 2),
            ("image_size", 8),
        ):  # the small CNN halves the image three times
            check_range(f"data.init_args.{key}", getattr(self, key), (low, None, True))

    def _all_train(self):
        return SyntheticShapes(
            "train", self.train_classes, self.images_per_class, self.image_size, self.data_seed
        )

    def _fold_classes(self, held_out: bool) -> np.ndarray:
        from dml.data.image_datamodules import mlrc_fold_mask

        classes = np.arange(self.train_classes)
        in_fold = mlrc_fold_mask(classes, self.mlrc_fold)
        return classes[in_fold] if held_out else classes[~in_fold]

    def build_train(self):
        if self.mlrc_fold is None:
            return self._all_train()
        return ClassSubset(self._all_train(), self._fold_classes(held_out=False))

    def build_val(self):
        if self.mlrc_fold is None:
            return self.eval_datasets
        return {"test": ClassSubset(self._all_train(), self._fold_classes(held_out=True))}

    def build_eval(self):
        return {
            "test": SyntheticShapes(
                "test", self.test_classes, self.images_per_class, self.image_size, self.data_seed
            )
        }

    def train_labels(self):
        return self.train_dataset.labels.tolist()

    @property
    def num_train_classes(self) -> int:
        if self.mlrc_fold is None:
            return self.train_classes
        return len(self._fold_classes(held_out=False))
