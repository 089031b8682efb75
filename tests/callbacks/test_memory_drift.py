"""The memory's drift measure (``dml.callbacks.MemoryDrift``): each stored row's image index kept
through the ring buffer, the cosines against a computation written out here, nothing in
training changed by measuring (random state, batch-norm statistics, a whole run's weights), and
the quantities in a whole run's metrics.csv through the CLI."""

import csv
import glob
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dml.callbacks import MemoryDrift
from dml.losses import CrossBatchMemoryLoss
from dml.memory.cross_batch import CrossBatchMemory


def test_each_stored_row_keeps_its_image_index_through_wrap_around_and_truncation():
    memory = CrossBatchMemory(dim=2, size=5)
    memory.enqueue(torch.zeros(3, 2), torch.tensor([0, 1, 2]), 1, torch.tensor([10, 11, 12]))
    memory.enqueue(torch.ones(3, 2), torch.tensor([3, 4, 5]), 2, torch.tensor([13, 14, 15]))
    # slots 0..4 hold rows 15, 11, 12, 13, 14 (row 15 overwrote slot 0)
    assert memory.stored_sample_ids.tolist() == [15, 11, 12, 13, 14]
    assert memory.stored_labels.tolist() == [5, 1, 2, 3, 4]
    memory.enqueue(torch.ones(7, 2), torch.arange(7), 3, torch.arange(100, 107))
    assert sorted(memory.stored_sample_ids.tolist()) == [102, 103, 104, 105, 106]
    memory.enqueue(torch.ones(1, 2), torch.tensor([9]), 4)  # unknown image
    assert -1 in memory.stored_sample_ids.tolist()


class Network(nn.Module):
    """A linear embedding with a batch-norm layer (running statistics to restore)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.linear, self.norm = nn.Linear(4, 3), nn.BatchNorm1d(4)

    @property
    def device(self):
        return torch.device("cpu")

    def embed(self, images):
        raw = self.linear(self.norm(images))
        return {"raw_embeddings": raw, "embeddings": F.normalize(raw, dim=1)}


class Images:
    """The data module's side: training images by index; ``noise`` draws from the global
    random state as an augmentation does."""

    def __init__(self, n=30, noise=False):
        g = torch.Generator().manual_seed(1)
        self.images, self.labels = torch.randn(n, 4, generator=g), torch.arange(n) % 5
        self.noise = noise

    def train_labels(self):
        return self.labels.tolist()

    def candidate_loader(self, indices, batch_size):
        for start in range(0, len(indices), batch_size):
            rows = torch.as_tensor(indices[start : start + batch_size])
            x = self.images[rows]
            if self.noise:
                x = x + 0.1 * torch.randn_like(x) + 0.01 * (np.random.rand() + random.random())
            yield x, self.labels[rows], rows

    def device_batch(self, batch, device):
        return batch


def memory_filled_by(network, data, batches=4, per_batch=6, store="normalized"):
    memory = CrossBatchMemoryLoss(3, size=64, start_iteration=0, store=store)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for step in range(1, batches + 1):
            ids = torch.randperm(len(data.labels), generator=g)[:per_batch]
            embedded = network.embed(data.images[ids])
            key = "raw_embeddings" if store == "raw" else "embeddings"
            memory.enqueue(embedded[key], data.labels[ids], step, ids)
    return memory


def test_no_drift_gives_cosine_one_and_a_changed_network_the_cosines_written_out():
    data, network = Images(), Network()
    network.eval()  # batch-norm on running statistics: the same rows whatever the batch
    memory = memory_filled_by(network, data)
    drift = MemoryDrift(rows=100)
    out = drift.measure(memory, data, network, step=5)
    assert abs(float(out["memory/drift_cosine"]) - 1) < 1e-6
    assert abs(float(out["memory/drift_cosine_newest"]) - 1) < 1e-6
    assert float(out["memory/drift_age"]) == 5 - (1 * 6 + 2 * 6 + 3 * 6) / 18  # steps 1..3
    with torch.no_grad():
        network.linear.weight.add_(
            0.5 * torch.randn(3, 4, generator=torch.Generator().manual_seed(3))
        )
    out = drift.measure(memory, data, network, step=5)
    ids, batch_ids, stored = memory.stored_sample_ids, memory.stored_batch_ids, memory.stored
    expected = {}
    for name, rows in (
        ("memory/drift_cosine", batch_ids < 4),
        ("memory/drift_cosine_newest", batch_ids == 4),
    ):
        cosines = []
        for i in torch.nonzero(rows).flatten().tolist():
            now = network.embed(data.images[ids[i]][None])["embeddings"][0].detach()
            cosines.append(float(stored[i] @ now / (stored[i].norm() * now.norm())))
        expected[name] = sum(cosines) / len(cosines)
    for name, value in expected.items():
        assert abs(float(out[name]) - value) < 1e-5
    assert expected["memory/drift_cosine"] < 0.999  # the change moved the rows


def test_raw_store_is_compared_in_the_raw_space_and_a_mismatched_data_set_is_skipped():
    data, network = Images(), Network()
    network.eval()
    memory = memory_filled_by(network, data, store="raw")
    out = MemoryDrift().measure(memory, data, network, step=5)
    assert abs(float(out["memory/drift_cosine"]) - 1) < 1e-6
    other = Images()
    other.labels = (other.labels + 1) % 5  # other labels, or fewer images: not measured
    smaller = Images(n=10)
    for data_now in (other, smaller):
        drift = MemoryDrift()
        with pytest.warns(UserWarning, match="do not fit the training set"):
            assert drift.measure(memory, data_now, network, step=5) is None


def test_measuring_restores_the_random_state_and_the_batch_norm_statistics():
    data, network = Images(noise=True), Network()
    memory = memory_filled_by(network, data)
    network.train()
    before = {k: v.clone() for k, v in network.state_dict().items()}
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    out = MemoryDrift(rows=8, batch_size=4).measure(memory, data, network, step=5)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2] == expected[2]
    for key, value in network.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert torch.isfinite(out["memory/drift_cosine"])


def test_nothing_is_measured_before_the_memory_holds_rows_of_known_images():
    data, network = Images(), Network()
    memory = CrossBatchMemoryLoss(3, size=8, start_iteration=0)
    assert MemoryDrift().measure(memory, data, network, step=3) is None
    memory.enqueue(torch.ones(2, 3), torch.tensor([0, 1]), 1)  # images unknown
    memory.enqueue(torch.ones(2, 3), torch.tensor([0, 1]), 2)
    assert MemoryDrift().measure(memory, data, network, step=3) is None


def run_metrics(folder, *extra):
    from tests.losses.test_memory_diagnostics import xbm_run

    xbm_run(folder, "--dashboard.enabled", "false", "--trainer.log_every_n_steps", "1", *extra)
    (path,) = glob.glob(os.path.join(str(folder), "**", "metrics.csv"), recursive=True)
    with open(path) as f:
        rows = list(csv.DictReader(f))
    (ckpt,) = glob.glob(os.path.join(str(folder), "**", "last.ckpt"), recursive=True)
    return rows, torch.load(ckpt, weights_only=True)["state_dict"]


def test_a_memory_run_logs_the_drift_and_trains_the_same_weights_as_without(tmp_path):
    rows, measured = run_metrics(tmp_path / "drift", "--memory_drift.every", "2")
    logged = [r for r in rows if r.get("train/memory/drift_cosine")]
    # the memory starts after step 2 (rows of steps 3..6); measured at steps 4 and 6, logged
    # at Lightning's step of those batches (3 and 5), which a resume keeps
    assert [int(r["step"]) for r in logged] == [3, 5]
    for r in logged:
        assert -1 <= float(r["train/memory/drift_cosine"]) <= 1
        assert -1 <= float(r["train/memory/drift_cosine_newest"]) <= 1
        assert float(r["train/memory/drift_age"]) >= 1
    assert (measured["objective.memory.sample_ids"][:24] >= 0).all()
    _, plain = run_metrics(tmp_path / "plain", "--memory_drift.enabled", "false")
    assert measured.keys() == plain.keys()
    for key in plain:
        assert torch.equal(measured[key], plain[key]), key


def test_the_dashboard_keeps_the_drift_the_run_logged(tmp_path):
    """The drift is recorded after the step's other diagnostics: the dashboard's history (and
    so its training figure) holds the same values as metrics.csv."""
    from tests.losses.test_memory_diagnostics import xbm_run

    xbm_run(
        tmp_path,
        "--dashboard.every_n_epochs",
        "1",
        "--trainer.log_every_n_steps",
        "1",
        "--memory_drift.every",
        "2",
    )
    (path,) = glob.glob(os.path.join(str(tmp_path), "**", "metrics.csv"), recursive=True)
    with open(path) as f:
        logged = [r for r in csv.DictReader(f) if r.get("train/memory/drift_cosine")]
    (ckpt,) = glob.glob(os.path.join(str(tmp_path), "**", "last.ckpt"), recursive=True)
    callbacks = torch.load(ckpt, weights_only=True)["callbacks"]
    (state,) = [v for k, v in callbacks.items() if "DashboardFigures" in k]
    history = state["history"]["memory/drift_cosine"]
    assert [s for s, _ in history] == [int(r["step"]) for r in logged] == [3, 5]
    assert [round(v, 5) for _, v in history] == [
        round(float(r["train/memory/drift_cosine"]), 5) for r in logged
    ]
    assert glob.glob(os.path.join(str(tmp_path), "**", "training_epoch000.png"), recursive=True)


def test_with_gradient_accumulation_each_memory_step_is_measured_once_at_its_own_age(tmp_path):
    rows, _ = run_metrics(
        tmp_path, "--memory_drift.every", "2", "--trainer.accumulate_grad_batches", "2"
    )
    logged = [r for r in rows if r.get("train/memory/drift_cosine")]
    steps = [int(r["step"]) for r in logged]
    assert len(steps) == 2 and len(set(steps)) == 2  # memory steps 4 and 6, once each
    assert all(float(r["train/memory/drift_age"]) >= 1 for r in logged)
