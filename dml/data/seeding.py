"""Per-sample augmentation seeds: the random crop and flip of a training image depend on (data
seed, epoch, step, rank, position in the batch) only.

Without this, augmentations draw from the global torch generator of whichever process loads
the sample (the main process or a loader worker, seeded when the workers start), so a resumed
run, a run with another ``num_workers``, or one whose persistent workers were restarted sees
other crops than the run it continues. ``SeededBatches`` wraps the batch sampler and hands each
sample's index with its seed; ``SeededSamples`` wraps the data set and draws that sample's
augmentation from the CPU generator seeded with it (``seeded``: its state is restored after), or
hands the seed on to a data set that draws its augmentation later (``takes_seed``:
``dml.data.device_decode`` draws it on the device, under this same seed).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def sample_seed(seed: int, epoch: int, step: int, rank: int, position: int) -> int:
    """A 63-bit seed, a hash of the five numbers (numpy's SeedSequence)."""
    state = np.random.SeedSequence([seed, epoch, step, rank, position]).generate_state(2)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


@contextmanager
def seeded(seed: int):
    """The CPU generator seeded with ``seed`` inside, restored after (what
    ``torch.random.fork_rng`` does, on the default CPU generator only: 100 times faster than
    ``torch.manual_seed``, which seeds every backend)."""
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(state)


class SeededBatches(Sampler[List[Tuple[int, int]]]):
    """A batch sampler's batches as lists of (index, augmentation seed).

    ``epoch``: where the epoch comes from. A callable (the trainer's ``current_epoch``, as the
    DataModule passes it; None while there is no trainer) is read each time an epoch's
    batches are drawn, so every epoch draws new batches and new crops without anybody calling
    ``set_epoch``: Lightning calls it on a loader's ``sampler`` and ``batch_sampler.sampler``,
    never on a batch sampler itself. Without a trainer, ``set_epoch`` sets it, as for a
    ``DistributedSampler``.
    """

    def __init__(
        self,
        batches: Sampler[List[int]],
        seed: int,
        rank: int = 0,
        epoch: Optional[Callable[[], Optional[int]]] = None,
    ):
        self.batches, self.seed, self.rank, self.epoch = batches, seed, rank, 0
        self.epoch_source = epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.batches, "set_epoch"):
            self.batches.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        epoch = self.epoch_source() if self.epoch_source is not None else None
        if epoch is not None:
            self.set_epoch(epoch)
        epoch = self.epoch
        for step, batch in enumerate(self.batches):
            yield [
                (int(i), sample_seed(self.seed, epoch, step, self.rank, p))
                for p, i in enumerate(batch)
            ]


class SeededSamples(Dataset):
    """``dataset[index]`` with the torch generator seeded by the sample's seed (a (index, seed)
    key), or as it is (an int key)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            return self.dataset[key]
        index, seed = key
        if getattr(self.dataset, "takes_seed", False):  # draws its parameters elsewhere
            return self.dataset.item(index, seed)
        with seeded(seed):
            return self.dataset[index]
