"""A pooling goes in as 3 files and no package edit (docs/extending.md):
``examples/attention_pooling/attention_pooling.py`` (the class), its config layer
``attention_pooling.yaml``, and this test. It computes the formula written out here, starts as
GAP, has the gradients finite differences give, and trains through the command line with CCP,
XBM's memory and XBN (GSP is itself a pooling: this one takes its place), checkpoints, and
resumes to the uninterrupted run's losses."""

import os
import sys

import pytest
import torch
from run_helpers import fit_recording_losses

from dml.compose import config_args

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(REPO, "examples", "attention_pooling")
sys.path.insert(0, EXAMPLE)

from attention_pooling import AttentionPooling  # noqa: E402


def feature_map(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("heads", [1, 2])
def test_the_output_is_the_softmax_weighted_sum_written_out(heads):
    x = feature_map(3, 4, 5, 6, dtype=torch.float64)  # B, C, H, W
    pooling = AttentionPooling(4, heads=heads).double()
    with torch.no_grad():
        pooling.scorer.copy_(feature_map(heads, 4 // heads, dtype=torch.float64, seed=1))
    out = pooling(x)
    w = pooling.scorer.detach()
    group = 4 // heads
    expected = torch.zeros(3, 4, dtype=torch.float64)
    mean_weights = torch.zeros(3, 30, dtype=torch.float64)
    for b in range(3):  # by hand, per image, head and location
        for k in range(heads):
            channels = slice(k * group, (k + 1) * group)
            locations = [x[b, channels, i, j] for i in range(5) for j in range(6)]
            scores = [float(w[k] @ v) for v in locations]
            top = max(scores)
            e = [torch.exp(torch.tensor(s - top, dtype=torch.float64)) for s in scores]
            weights = [v / sum(e) for v in e]
            expected[b, channels] = sum(p * v for p, v in zip(weights, locations))
            mean_weights[b] += torch.stack(weights) / heads
    assert torch.allclose(out.pooled, expected, rtol=1e-12, atol=1e-12)
    assert torch.allclose(out.weights, mean_weights, rtol=1e-12, atol=1e-12)
    assert torch.allclose(out.weights.sum(1), torch.ones(3, dtype=torch.float64))
    assert out.attributes is None and not AttentionPooling.produces_attributes


@pytest.mark.parametrize("heads", [1, 4])
def test_zero_initialised_it_is_global_average_pooling(heads):
    x = feature_map(4, 8, 7, 5)
    out = AttentionPooling(8, heads=heads)(x)
    assert torch.allclose(out.pooled, x.mean(dim=(2, 3)), rtol=1e-6, atol=1e-6)
    assert torch.allclose(out.weights, torch.full((4, 35), 1 / 35))


def test_gradients_match_finite_differences():
    x = feature_map(2, 4, 2, 3, dtype=torch.float64).requires_grad_()
    scorer = feature_map(2, 2, dtype=torch.float64, seed=1).requires_grad_()
    pooling = AttentionPooling(4, heads=2).double()

    def pooled(x, scorer):  # the scorer as an input: gradcheck checks both gradients
        return torch.func.functional_call(pooling, {"scorer": scorer}, (x,)).pooled

    assert torch.autograd.gradcheck(pooled, (x, scorer))
    zero = torch.zeros(2, 2, dtype=torch.float64, requires_grad=True)  # at the initialisation
    assert torch.autograd.gradcheck(pooled, (x, zero))


def test_a_head_count_that_does_not_divide_the_channels_is_refused():
    with pytest.raises(ValueError, match="model.pooling.params.heads"):
        AttentionPooling(6, heads=4)


# --- through the command line ------------------------------------------------------------------
def run(root, epochs, ckpt=None):
    """``python -m dml fit`` (in this process) of the synthetic data set's ccp_c2 method with XBM's
    memory and XBN, this pooling in GAP's place; returns the training loss of every step."""
    return fit_recording_losses(
        [
            *config_args("synthetic", "ccp_c2"),
            "--config",
            os.path.join(EXAMPLE, "attention_pooling.yaml"),
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
            "--trainer.logger",
            "false",
        ],
        root,
        epochs,
        ckpt,
        mid_checkpoint=True,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One uninterrupted 3-epoch run (3 steps an epoch), and its checkpoint after epoch 1 (CCP's
    first round has ended there: proxies re-picked, the proximal term on) resumed for the
    third epoch."""
    root = tmp_path_factory.mktemp("attention_pooling")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(sys, "argv", ["python -m dml"])
        monkeypatch.setenv("WANDB_MODE", "disabled")
        monkeypatch.syspath_prepend(EXAMPLE)
        straight = run(root, 3)
        (mid,) = list((root / "runs").glob("*/checkpoints/mid-epoch=1.ckpt"))
        state = torch.load(mid, map_location="cpu", weights_only=True)
        resumed = run(root, 3, ckpt=str(mid))
    return {"straight": straight, "resumed": resumed, "state": state}


def test_it_trains_through_the_cli_with_ccp_and_xbn(runs):
    straight, state = runs["straight"], runs["state"]
    assert len(straight) == 9 and torch.isfinite(torch.tensor(straight)).all()
    weights = state["state_dict"]
    assert torch.isfinite(weights["pooling.scorer"]).all()
    assert weights["pooling.scorer"].abs().sum() > 0  # trained away from GAP
    assert int(weights["objective.memory.buffer.count"]) > 0  # XBM's rows are saved
    config = state["dml_config"]
    assert config["model"]["pooling"]["name"] == "attention_pooling.AttentionPooling"
    assert config["xbn"]["enabled"] and config["ccp"]["enabled"]
    assert config["model"]["loss"]["proxies_per_class"] > 0  # CCP's multi-proxy loss
    ccp = state["callbacks"]["ChanceConstraintProjection"]
    assert len(ccp["history"]) == 1 and ccp["lam"] > 0  # round 0 ended, saved with its state


def test_a_resumed_run_gives_the_uninterrupted_losses(runs):
    assert len(runs["resumed"]) == 3 and torch.isfinite(torch.tensor(runs["resumed"])).all()
    assert runs["resumed"] == pytest.approx(runs["straight"][6:], rel=1e-5)
