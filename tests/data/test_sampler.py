"""The class-balanced P x M batch sampler: composition, determinism, DDP sharding."""

import numpy as np
import pytest

from dml.data import ClassBalancedBatchSampler


def labels_with_sizes(sizes):
    return np.repeat(np.arange(len(sizes)), sizes)


def test_batches_have_p_classes_of_m_samples():
    labels = labels_with_sizes([7, 3, 12, 5, 9, 4, 6, 8])
    s = ClassBalancedBatchSampler(labels, classes_per_batch=3, samples_per_class=4, seed=1)
    for batch in s:
        classes, counts = np.unique(labels[batch], return_counts=True)
        assert len(classes) == 3 and (counts == 4).all()
    assert len(list(s)) == len(s) == len(labels) // 12


def test_small_class_is_topped_up_and_singletons_are_dropped():
    labels = labels_with_sizes([2, 1, 10, 10])
    s = ClassBalancedBatchSampler(
        labels, classes_per_batch=3, samples_per_class=4, seed=0, batches_per_epoch=20
    )
    seen = set()
    for batch in s:
        seen |= set(labels[batch].tolist())
    assert 1 not in seen  # a single image cannot make a positive pair
    assert seen == {0, 2, 3}


def test_deterministic_per_seed_and_epoch():
    labels = labels_with_sizes([5] * 20)
    a = ClassBalancedBatchSampler(labels, 4, 2, seed=3)
    b = ClassBalancedBatchSampler(labels, 4, 2, seed=3)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    c = ClassBalancedBatchSampler(labels, 4, 2, seed=4)
    assert list(c) != list(b)


def test_epoch_covers_classes_evenly():
    labels = labels_with_sizes([8] * 10)
    s = ClassBalancedBatchSampler(labels, 2, 4, seed=0, batches_per_epoch=50)
    counts = np.bincount(labels[np.concatenate(list(s))], minlength=10)
    # 50 batches x 2 classes = 100 class draws over 10 classes: 10 each, up to cycle seams.
    assert counts.min() >= 4 * 9 and counts.max() <= 4 * 11


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_get_distinct_classes_and_equal_lengths(world):
    labels = labels_with_sizes([6] * 30 + [3] * 7)
    samplers = [
        ClassBalancedBatchSampler(labels, 3, 2, seed=5, num_replicas=world, rank=r)
        for r in range(world)
    ]
    lengths = {len(list(s)) for s in samplers}
    assert len(lengths) == 1
    for step in zip(*samplers):
        class_sets = [set(labels[b].tolist()) for b in step]
        assert sum(len(c) for c in class_sets) == len(set().union(*class_sets)) == 3 * world


def test_too_few_classes_is_a_clear_error():
    with pytest.raises(ValueError, match="needs 8 classes"):
        ClassBalancedBatchSampler(labels_with_sizes([4] * 5), 4, 2, num_replicas=2)
