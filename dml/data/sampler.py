"""Class-balanced batches of P classes x M samples, deterministic under (seed, epoch), DDP-aware.

Every rank builds the same global schedule from the seed and takes its own slice: at each step
P * world_size distinct classes are drawn and rank r gets classes [r*P, (r+1)*P). Ranks thus see
different classes at every step and the same number of batches. Classes are visited in
shuffled cycles (each class once before any class twice) and each class's images in shuffled
cycles too, so an epoch covers the data evenly. A class with fewer than M images is topped up
from a fresh shuffle of itself (repeats within the batch).
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Sequence

import numpy as np
from torch.utils.data import Sampler

from dml.errors import ConfigError


class ClassBalancedBatchSampler(Sampler[List[int]]):
    def __init__(
        self,
        labels: Sequence[int],
        classes_per_batch: int,
        samples_per_class: int,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        batches_per_epoch: Optional[int] = None,
    ):
        labels = np.asarray(labels).reshape(-1)
        if classes_per_batch < 1 or samples_per_class < 1:
            raise ConfigError("data.init_args.classes_per_batch and samples_per_class must be >= 1")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"sampler rank {rank} is outside [0, {num_replicas})")
        classes, inverse = np.unique(labels, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.cumsum(np.bincount(inverse))[:-1]
        pools = np.split(order, bounds)
        min_size = 2 if samples_per_class >= 2 else 1
        self.pools = [p for p in pools if len(p) >= min_size]
        needed = classes_per_batch * num_replicas
        if len(self.pools) < needed:
            raise ConfigError(
                f"class-balanced sampler: {classes_per_batch} classes per batch x {num_replicas} "
                f"process(es) needs {needed} classes with >= {min_size} images; the data set has "
                f"{len(self.pools)}"
            )
        self.P, self.M = classes_per_batch, samples_per_class
        self.seed, self.rank, self.num_replicas = seed, rank, num_replicas
        self.epoch = 0
        global_batch = self.P * self.M * num_replicas
        self.num_batches = batches_per_epoch or max(1, len(labels) // global_batch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[List[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        n_classes = len(self.pools)
        per_step = self.P * self.num_replicas
        class_queue: List[int] = []
        positions = np.zeros(n_classes, dtype=np.int64)
        shuffled = [rng.permutation(p) for p in self.pools]
        for _ in range(self.num_batches):
            step_classes: List[int] = []
            deferred: List[int] = []
            while len(step_classes) < per_step:
                if not class_queue:
                    class_queue = list(rng.permutation(n_classes))
                c = int(class_queue.pop())
                if c in step_classes:  # a new cycle began inside this step: keep c for later
                    deferred.append(c)
                else:
                    step_classes.append(c)
            class_queue.extend(deferred)  # popped first at the next step
            mine = step_classes[self.rank * self.P : (self.rank + 1) * self.P]
            batch: List[int] = []
            # Advance every drawn class (not only this rank's) so all ranks stay in lock-step.
            for c in step_classes:
                take = []
                while len(take) < self.M:
                    if positions[c] >= len(shuffled[c]):
                        shuffled[c] = rng.permutation(self.pools[c])
                        positions[c] = 0
                    n = min(self.M - len(take), len(shuffled[c]) - positions[c])
                    take.extend(shuffled[c][positions[c] : positions[c] + n].tolist())
                    positions[c] += n
                if c in mine:
                    batch.extend(take)
            yield batch
