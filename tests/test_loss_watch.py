"""The stop-mode non-finite-loss guard keeps its record on the device and reads it on demand."""

import math

import pytest
import torch

from dml.loss_watch import LossWatch


def test_recording_reads_nothing_on_the_host(monkeypatch):
    reads = []
    for name in ("__bool__", "__int__", "__float__", "item", "tolist", "numpy"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor,
            name,
            lambda self, *a, _o=original, _n=name, **k: reads.append(_n) or _o(self, *a, **k),
        )
    watch = LossWatch(every=50)
    for step in range(5):
        metric = torch.tensor(float("nan") if step == 3 else 1.0)
        watch.record(
            metric + 0.5, {"metric": metric, "zero_shot": torch.tensor(0.5)}, step, 0, step
        )
    assert reads == []
    monkeypatch.undo()
    assert watch.read() == (
        3,
        0,
        3,
        {"metric": pytest.approx(float("nan"), nan_ok=True), "zero_shot": 0.5},
    )


def test_the_first_bad_step_is_kept_with_its_own_terms_and_the_record_clears():
    watch = LossWatch(every=4)
    losses = [1.0, 2.0, float("inf"), float("nan"), 3.0]
    for step, value in enumerate(losses):
        terms = {"metric": torch.tensor(value)}
        if step >= 3:  # a term that appears later (the memory's) is not the first bad step's
            terms["memory"] = torch.tensor(7.0)
        watch.record(sum(terms.values()), terms, step, 1, step + 10)
        assert watch.due() == (step + 1 >= 4)
    step, epoch, batch, terms = watch.read()
    assert (step, epoch, batch) == (2, 1, 12)
    assert set(terms) == {"metric"} and math.isinf(terms["metric"])
    assert LossWatch.bad_terms(terms) == ["metric"]
    assert watch.read() is None and not watch.due()  # cleared
    watch.record(torch.tensor(1.0), {"metric": torch.tensor(1.0)}, 5, 1, 0)
    assert watch.read() is None


def test_its_record_lives_on_the_losses_device():
    watch = LossWatch()
    loss, metric = torch.tensor(float("nan")), torch.tensor(float("nan"))  # on the CPU
    with torch.device("meta"):  # a tensor made without device= would land here and fail
        watch.record(loss, {"metric": metric}, 3, 0, 3)
    assert watch.first_step.device.type == "cpu"
    step, epoch, batch, terms = watch.read()
    assert (step, epoch, batch) == (3, 0, 3) and math.isnan(terms["metric"])
