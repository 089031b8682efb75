"""A loss term goes in as 3 files and no package edit (docs/extending.md):
``examples/uniformity_term/uniformity.py`` (the term), its config layer ``uniformity.yaml``, and
this test. Its value is a brute-force double loop's, its gradient finite differences', a batch
without pairs gives a finite zero, and it trains through the command line beside GSP, CCP,
XBM's memory and XBN, logged as ``train/loss_uniformity``, and resumes to the uninterrupted
run's losses."""

import csv
import math
import os
import sys

import pytest
import torch
from run_helpers import fit_recording_losses

from dml.compose import config_args

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(REPO, "examples", "uniformity_term")
sys.path.insert(0, EXAMPLE)

from uniformity import UniformityTerm, uniformity  # noqa: E402


def rows(n, d=5, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def brute_force(z, t):
    """log( 1/(n (n-1)) sum_{i != j} exp(-t ||z_i - z_j||^2) ) on the L2-normalised rows."""
    z = [[float(v) for v in row] for row in z]
    z = [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in z]
    n, total = len(z), 0.0
    for i in range(n):
        for j in range(n):
            if i != j:
                total += math.exp(-t * sum((a - b) ** 2 for a, b in zip(z[i], z[j])))
    return math.log(total / (n * (n - 1)))


@pytest.mark.parametrize("n,t", [(2, 2.0), (7, 2.0), (7, 0.5), (16, 5.0)])
def test_the_value_is_the_double_loop_s(n, t):
    z = rows(n)
    assert float(uniformity(z, t)) == pytest.approx(brute_force(z, t), rel=1e-12, abs=1e-12)


def test_the_term_weights_the_value_of_the_normalised_embeddings():
    z = rows(9)
    unit = torch.nn.functional.normalize(z, dim=1)
    embedded = {"embeddings": unit, "raw_embeddings": 3 * z, "pooling": None}
    out = UniformityTerm(t=2.0, weight=0.3)(embedded, torch.zeros(9, dtype=torch.long), None)
    assert set(out) == {"uniformity"}
    assert float(out["uniformity"]) == pytest.approx(0.3 * brute_force(z, 2.0), rel=1e-12)
    # spread rows score lower than clustered ones, and the value lies in [-4t, 0]
    clustered = unit[:1] + 0.01 * unit
    assert -8 <= float(uniformity(unit)) < float(uniformity(clustered)) <= 0


def test_far_apart_rows_do_not_underflow():
    z = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)  # ||z_1 - z_2||^2 = 4
    assert float(uniformity(z, t=300.0)) == pytest.approx(-1200.0)  # exp(-1200) is 0 in float64


def test_the_gradient_is_finite_differences():
    z = rows(6).requires_grad_()
    assert torch.autograd.gradcheck(lambda z: uniformity(z, 2.0), (z,))
    z = rows(3, seed=1).requires_grad_()
    assert torch.autograd.gradcheck(lambda z: uniformity(z, 0.7), (z,))


@pytest.mark.parametrize("n", [0, 1])
def test_a_batch_without_pairs_gives_a_finite_zero_that_keeps_the_graph(n):
    z = rows(n).requires_grad_()
    value = UniformityTerm()({"embeddings": z}, torch.zeros(n, dtype=torch.long), None)
    value = value["uniformity"]
    assert torch.isfinite(value) and float(value) == 0.0 and value.requires_grad
    value.backward()
    assert z.grad is not None and torch.equal(z.grad, torch.zeros_like(z))


# --- through the command line ------------------------------------------------------------------
def run(root, epochs, ckpt=None):
    """``python -m dml fit`` (in this process) of the synthetic data set's ccp_c2 method with GSP
    pooling and its zero-shot term, XBM's memory and XBN, and this term; returns the training
    loss of every step."""
    return fit_recording_losses(
        [
            *config_args("synthetic", "ccp_c2"),
            "--config",
            os.path.join(EXAMPLE, "uniformity.yaml"),
            "--model.pooling.name",
            "gsp",
            "--model.pooling.params",
            '{"num_prototypes": 4}',
            "--model.zero_shot.weight",
            "0.1",
            "--model.zero_shot.metric_weight",
            "0.9",
            "--model.memory.enabled",
            "true",
            "--model.memory.size",
            "64",
            "--model.memory.start_iteration",
            "2",
            "--xbn.enabled",
            "true",
            "--ccp.patience",
            "1",
            "--ccp.min_delta",
            "1.0",  # CCP's rounds end from epoch 1 on
            "--data.init_args.batches_per_epoch",
            "3",
            "--trainer.log_every_n_steps",
            "1",
        ],
        root,
        epochs,
        ckpt,
        mid_checkpoint=True,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One uninterrupted 3-epoch run (3 steps an epoch) with what its CSV logger wrote, and its
    checkpoint after epoch 1 (CCP's first round has ended there) resumed for the third epoch."""
    root = tmp_path_factory.mktemp("uniformity_term")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(sys, "argv", ["python -m dml"])
        monkeypatch.setenv("WANDB_MODE", "disabled")
        monkeypatch.syspath_prepend(EXAMPLE)
        straight = run(root, 3)
        (folder,) = list((root / "runs").glob("*/checkpoints"))
        with open(folder.parent / "metrics.csv") as f:
            logged = list(csv.DictReader(f))
        mid = folder / "mid-epoch=1.ckpt"
        state = torch.load(mid, map_location="cpu", weights_only=True)
        resumed = run(root, 3, ckpt=str(mid))
    return {
        "straight": straight,
        "logged": logged,
        "resumed": resumed,
        "state": state,
        "checkpoint": str(mid),
    }


def test_it_trains_through_the_cli_with_gsp_ccp_and_xbn_and_logs_its_value(runs):
    straight, state = runs["straight"], runs["state"]
    assert len(straight) == 9 and torch.isfinite(torch.tensor(straight)).all()
    steps = {int(r["step"]): r for r in runs["logged"] if r.get("train/loss")}
    assert sorted(steps) == list(range(9))
    for row in steps.values():  # logged at every step, 0.1 * a value in [-4t, 0]
        assert -0.8 <= float(row["train/loss_uniformity"]) < 0
        for part in ("proxy", "pair", "zero_shot"):
            assert math.isfinite(float(row[f"train/loss_{part}"]))
    assert all(math.isfinite(float(steps[s]["train/loss_memory"])) for s in range(2, 9))
    assert all(math.isfinite(float(steps[s]["train/loss_proximal"])) for s in range(6, 9))
    config = state["dml_config"]
    assert config["model"]["terms"]["uniformity"]["class_path"] == "uniformity.UniformityTerm"
    assert config["model"]["pooling"]["name"] == "gsp"
    assert config["xbn"]["enabled"] and config["ccp"]["enabled"]
    assert int(state["state_dict"]["objective.memory.buffer.count"]) > 0  # XBM's rows are saved
    ccp = state["callbacks"]["ChanceConstraintProjection"]
    assert len(ccp["history"]) == 1 and ccp["lam"] > 0  # round 0 ended, saved with its state


def test_a_resumed_run_gives_the_uninterrupted_losses(runs):
    assert len(runs["resumed"]) == 3 and torch.isfinite(torch.tensor(runs["resumed"])).all()
    assert runs["resumed"] == pytest.approx(runs["straight"][6:], rel=1e-5)


def test_its_checkpoint_embeds_when_its_module_is_trusted(runs, tmp_path, capsys, monkeypatch):
    """``python -m dml embed`` of a checkpoint with a term: refused in one line naming the term
    until its module is trusted, then the embeddings of the test split."""
    import numpy as np

    from dml.inference.cli import main as use_checkpoint

    monkeypatch.syspath_prepend(EXAMPLE)
    out = tmp_path / "e.npz"
    args = ["embed", runs["checkpoint"], "--split", "test", "--out", str(out)]
    assert use_checkpoint(args) == 2 and not out.exists()
    assert (
        "its model.terms.uniformity.class_path names 'uniformity.UniformityTerm'"
        in capsys.readouterr().err
    )
    assert use_checkpoint(args + ["--trust-module", "uniformity"]) == 0
    with np.load(out, allow_pickle=False) as rows:
        assert rows["embeddings"].shape == (64, 64) and np.isfinite(rows["embeddings"]).all()


def test_collapsed_rows_give_zero_and_nan_is_not_hidden():
    """All rows equal (a collapsed embedding): every pair's potential is 1, L = 0 exactly; a
    NaN row makes the value NaN (the run's non-finite guard then stops it), never a number."""
    z = rows(1).repeat(6, 1)
    assert float(uniformity(z)) == pytest.approx(0.0, abs=1e-12)
    z = rows(6)
    z[2, 0] = float("nan")
    assert math.isnan(float(uniformity(z)))
