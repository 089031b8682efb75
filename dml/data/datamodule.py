"""The DataModule contract every data set follows.

Subclasses implement ``build_train()`` and ``build_eval()`` (the test split), and may override
``build_val()`` (default: the test split, the usual DML practice; the MLRC protocol validates on
a held-out fold of the training classes instead). The base class supplies the class-balanced
training loader and fixed-order evaluation loaders.

Data set items are ``(image, label, index)``: the index lets distributed evaluation gather
embeddings with their data-set positions and drop the padding duplicates.

``build_eval()`` and ``build_val()`` return either ``{"test": ds}`` (query set = reference set,
each query excluded from its own search) or ``{"query": q, "gallery": g}`` (In-Shop: queries
search the gallery only).
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from dml.data.sampler import ClassBalancedBatchSampler
from dml.data.seeding import SeededBatches, SeededSamples


class DMLDataModule(pl.LightningDataModule):
    """Base class. Args:
    classes_per_batch, samples_per_class: the P x M batch composition.
    eval_batch_size: batch size of the evaluation loaders.
    num_workers: DataLoader worker processes (persistent when > 0); None: from the machine
        (``default_num_workers``). Memory is pinned when CUDA is present.
    recall_ks: the Ks reported as R@K; None takes the data set's standard ones.
    batches_per_epoch: fixed number of training batches per epoch (default: data / batch).
    seed: seed of the sampler's schedule.
    """

    standard_recall_ks: Sequence[int] = (1, 2, 4, 8)
    collate_fn = None  # DataLoader's default
    mlrc_fold: Optional[int] = None  # the validation fold of the MLRC protocol, if any

    def __init__(
        self,
        classes_per_batch: int = 8,
        samples_per_class: int = 4,
        eval_batch_size: int = 256,
        num_workers: Optional[int] = 0,
        recall_ks: Optional[List[int]] = None,
        batches_per_epoch: Optional[int] = None,
        seed: int = 0,
    ):
        super().__init__()
        self.classes_per_batch = classes_per_batch
        self.samples_per_class = samples_per_class
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.recall_ks = list(recall_ks or self.standard_recall_ks)
        self.batches_per_epoch = batches_per_epoch
        self.seed = seed
        self._train: Optional[Dataset] = None
        self._eval: Optional[Dict[str, Dataset]] = None
        self._val: Optional[Dict[str, Dataset]] = None

    # --- to implement -------------------------------------------------------------------
    def build_train(self) -> Dataset:
        raise NotImplementedError

    def build_eval(self) -> Dict[str, Dataset]:
        raise NotImplementedError

    def build_val(self) -> Dict[str, Dataset]:
        return self.eval_datasets

    def train_labels(self) -> Sequence[int]:
        """Labels of the training set in item order (the sampler needs them without images)."""
        return self.train_dataset.labels

    @property
    def num_train_classes(self) -> int:
        return len(set(int(y) for y in self.train_labels()))

    # --- provided -----------------------------------------------------------------------
    @property
    def train_dataset(self) -> Dataset:
        if self._train is None:
            self._train = self.build_train()
        return self._train

    @staticmethod
    def _checked(sets: Dict[str, Dataset], where: str) -> Dict[str, Dataset]:
        if set(sets) not in ({"test"}, {"query", "gallery"}):
            raise ValueError(
                f"{where} must return keys {{'test'}} or {{'query', 'gallery'}}, got {sorted(sets)}"
            )
        return sets

    @property
    def eval_datasets(self) -> Dict[str, Dataset]:
        """The test split."""
        if self._eval is None:
            self._eval = self._checked(self.build_eval(), f"{type(self).__name__}.build_eval")
        return self._eval

    @property
    def val_datasets(self) -> Dict[str, Dataset]:
        """The split validated on during training (the test split unless a protocol says)."""
        if self._val is None:
            self._val = self._checked(self.build_val(), f"{type(self).__name__}.build_val")
        return self._val

    def split_name(self, stage: str) -> str:
        """What a stage measures, for every printed number: "test split", or "MLRC fold k"
        (validation on held-out training classes)."""
        if stage == "val" and self.mlrc_fold is not None:
            return f"MLRC fold {self.mlrc_fold}"
        return "test split"

    @property
    def validates_on_test_split(self) -> bool:
        return self.split_name("val") == "test split"

    def eval_sets(self, stage: str) -> Dict[str, Dataset]:
        """'val' or 'test' -> its data sets."""
        return self.val_datasets if stage == "val" else self.eval_datasets

    @staticmethod
    def loader_names(sets: Dict[str, Dataset]) -> List[str]:
        """Data sets in DataLoader order: ['test'] or ['query', 'gallery']."""
        return ["test"] if "test" in sets else ["query", "gallery"]

    @staticmethod
    def protocol(sets: Dict[str, Dataset]) -> str:
        """'test' (query = reference) or 'query_gallery'."""
        return "test" if "test" in sets else "query_gallery"

    def check_settings(self) -> None:
        """A ConfigError naming the first setting out of its range (checked at setup: the
        config parser would fold an error raised while building the class into its own)."""
        from dml.config import AT_LEAST_ONE, NON_NEGATIVE, check_range

        for key, bounds in (
            ("classes_per_batch", AT_LEAST_ONE),
            ("samples_per_class", AT_LEAST_ONE),
            ("eval_batch_size", AT_LEAST_ONE),
            ("batches_per_epoch", AT_LEAST_ONE),
            ("num_workers", NON_NEGATIVE),
        ):
            check_range(f"data.init_args.{key}", getattr(self, key), bounds)
        for k in self.recall_ks:
            check_range("data.init_args.recall_ks", k, AT_LEAST_ONE)

    def setup(self, stage: Optional[str] = None) -> None:
        self.check_settings()
        if stage in (None, "fit"):
            _ = self.train_dataset
            _ = self.val_datasets
        if stage in (None, "test", "validate"):
            _ = self.eval_datasets if stage != "validate" else self.val_datasets

    def current_epoch(self) -> Optional[int]:
        """The epoch whose training batches and augmentations are drawn now; None without a
        trainer (then ``set_epoch`` on the batch sampler).

        It is the count of epochs the fit loop has processed, the number Lightning hands to
        ``set_epoch``, not ``trainer.current_epoch``: a loader with workers draws its first
        batches when Lightning sets the loader up, and in a run resumed from an epoch-end
        checkpoint that happens while ``current_epoch`` still names the finished epoch."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return None
        return int(trainer.fit_loop.epoch_progress.current.processed)

    def _world(self):
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def workers(self) -> int:
        """``num_workers``, or where it is None the machine's share for one process."""
        if self.num_workers is not None:
            return self.num_workers
        trainer = getattr(self, "trainer", None)
        return default_num_workers(getattr(trainer, "num_devices", 1) if trainer else 1)

    def _loader_kwargs(self):
        workers = self.workers()
        return dict(
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
        )

    def device_batch(self, batch, device):
        """A loader's batch as (images, labels, indices) on ``device``; what Lightning's
        transfer to the device does, and what code iterating a loader itself calls."""
        return tuple(t.to(device, non_blocking=True) for t in batch)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return self.device_batch(batch, device)

    def train_dataloader(self) -> DataLoader:
        world, rank = self._world()
        sampler = ClassBalancedBatchSampler(
            self.train_labels(),
            self.classes_per_batch,
            self.samples_per_class,
            seed=self.seed,
            num_replicas=world,
            rank=rank,
            batches_per_epoch=self.batches_per_epoch,
        )
        # each sample's augmentation seeded by (seed, epoch, step, rank, position): a resume,
        # another num_workers or restarted workers see the same crops (dml.data.seeding); the
        # epoch is the trainer's, read when each epoch's batches are drawn
        return DataLoader(
            SeededSamples(self.train_dataset),
            batch_sampler=SeededBatches(sampler, self.seed, rank, epoch=self.current_epoch),
            collate_fn=self.collate_fn,
            **self._loader_kwargs(),
        )

    def candidate_loader(self, indices: Sequence[int], batch_size: int) -> DataLoader:
        """The training images at ``indices``, in that order, with the training augmentation
        (e.g. CCP's per-class candidates for its proxies); batches as the training loader's."""
        from torch.utils.data import Subset

        return DataLoader(
            Subset(self.train_dataset, list(indices)),
            batch_size=batch_size,
            shuffle=False,
            collate_fn=self.collate_fn,
            num_workers=self.workers(),
        )

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        world, rank = self._world()
        sampler = None
        if world > 1:  # pads to equal shards; evaluation drops the duplicates by index
            sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            shuffle=False,
            sampler=sampler,
            collate_fn=self.collate_fn,
            **self._loader_kwargs(),
        )

    def val_dataloader(self) -> List[DataLoader]:
        sets = self.val_datasets
        return [self._eval_loader(sets[name]) for name in self.loader_names(sets)]

    def test_dataloader(self) -> List[DataLoader]:
        sets = self.eval_datasets
        return [self._eval_loader(sets[name]) for name in self.loader_names(sets)]


def default_num_workers(processes_per_machine: int = 1, cap: int = 8) -> int:
    """Loader workers per training process: the cores this process may use, shared by the
    processes on the machine, one left to each process itself; at most ``cap`` (decoding and
    augmenting 224 px JPEGs for one GPU rarely needs more)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(0, min(cap, cores // max(1, processes_per_machine) - 1))
