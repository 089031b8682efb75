"""GSP against independent references: GAP at mu = 1, POT's Sinkhorn, finite differences."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from dml.models import GSP, partial_transport


def random_costs(b=3, m=5, n=12, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (2 * torch.rand(b, m, n, generator=g)).to(dtype)


@pytest.mark.parametrize("mu,gamma", [(0.3, 5.0), (0.7, 0.5), (0.05, 20.0), (0.3, 50.0)])
def test_plan_marginals(mu, gamma):
    costs = random_costs()
    plan = partial_transport(costs, mu, gamma, iters=100, tol=1e-12)
    n = costs.shape[-1]
    assert (plan >= 0).all()
    assert torch.allclose(plan.sum(1), torch.full_like(plan[:, 0], 1 / n), atol=1e-12)
    assert torch.allclose(
        plan[:, 1:].sum((1, 2)), torch.full((3,), mu, dtype=plan.dtype), atol=1e-9
    )


def test_mu_one_is_gap_exactly():
    torch.manual_seed(0)
    gsp = GSP(in_channels=6, num_prototypes=4, mu=1.0, gamma=5.0, embedding_dim=8)
    proj = nn.Linear(6, 8)
    for scale in (0.1, 1.0, 30.0):  # costs of every size
        x = torch.randn(2, 6, 5, 7) * scale
        out = gsp(x, projection=proj)
        assert torch.allclose(out.pooled, x.mean(dim=(2, 3)), atol=1e-6)
        assert torch.allclose(out.weights, torch.ones(2, 35))
    costs = random_costs()
    assert torch.equal(
        partial_transport(costs, 1.0, 5.0)[:, 0], torch.zeros(3, 12, dtype=costs.dtype)
    )


@pytest.mark.parametrize("mu,gamma", [(0.3, 5.0), (0.6, 1.0), (0.2, 10.0)])
def test_plan_equals_pot_sinkhorn_on_the_balanced_problem(mu, gamma):
    ot = pytest.importorskip("ot")
    costs = random_costs(b=1, m=4, n=9, seed=3)[0].numpy()
    m, n = costs.shape
    softmin = -np.log(np.exp(-gamma * costs).sum(0)) / gamma  # (n,)
    cost_matrix = np.stack([np.zeros(n), softmin], 1)  # sources x {residual, transported}
    balanced = ot.sinkhorn(
        np.full(n, 1 / n),
        np.array([1 - mu, mu]),
        cost_matrix,
        reg=1 / gamma,
        numItermax=100000,
        stopThr=1e-14,
    )
    split = np.exp(-gamma * costs) / np.exp(-gamma * costs).sum(0, keepdims=True)
    expected_pi = balanced[:, 1][None, :] * split
    plan = partial_transport(torch.from_numpy(costs)[None], mu, gamma, iters=100, tol=1e-14)[
        0
    ].numpy()
    assert np.allclose(plan[0], balanced[:, 0], atol=1e-10)
    assert np.allclose(plan[1:], expected_pi, atol=1e-10)


@pytest.mark.parametrize("mu,gamma", [(0.3, 5.0), (0.8, 0.5), (1.0, 5.0)])
def test_gradcheck_on_costs(mu, gamma):
    costs = random_costs(b=2, m=3, n=6, seed=1).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda c: partial_transport(c, mu, gamma, iters=100, tol=1e-14), (costs,)
    )


def test_gradcheck_end_to_end_to_prototypes_and_features():
    torch.manual_seed(0)
    gsp = GSP(
        in_channels=4, num_prototypes=3, mu=0.4, gamma=3.0, iters=100, tol=1e-14, embedding_dim=5
    ).double()
    proj = nn.Linear(4, 5).double()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    protos = gsp.prototypes.detach().clone().requires_grad_()
    weight = proj.weight.detach().clone().requires_grad_()

    def f(x, protos, weight):
        out = torch.func.functional_call(
            gsp,
            {"prototypes": protos},
            (x,),
            {"projection": lambda v: nn.functional.linear(v, weight, proj.bias)},
        )
        return out.pooled, out.attributes

    assert torch.autograd.gradcheck(f, (x, protos, weight))


def saved_bytes(fn):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total[0], out


def test_backward_memory_does_not_grow_with_iterations():
    costs = random_costs(b=4, m=16, n=49, seed=2, dtype=torch.float32).requires_grad_()
    few, _ = saved_bytes(lambda: partial_transport(costs, 0.3, 5.0, iters=10, tol=0.0))
    many, out = saved_bytes(lambda: partial_transport(costs, 0.3, 5.0, iters=200, tol=0.0))
    assert few == many == 4 * 17 * 49 * 4  # the plan alone
    out.sum().backward()


def test_weights_and_attributes_are_distributions():
    torch.manual_seed(0)
    gsp = GSP(in_channels=6, num_prototypes=4, mu=0.3, embedding_dim=8)
    out = gsp(torch.randn(3, 6, 4, 4), projection=nn.Linear(6, 8))
    assert torch.allclose(out.weights.mean(1), torch.ones(3), atol=1e-5)
    assert (out.weights >= 0).all() and (out.weights <= 1 / 0.3 + 1e-5).all()
    assert torch.allclose(out.attributes.sum(1), torch.ones(3), atol=1e-5)


@pytest.mark.parametrize("reduction", ["max", "gem"])
def test_other_reductions_apply_to_the_reweighted_map(reduction):
    torch.manual_seed(0)
    gsp = GSP(in_channels=6, num_prototypes=4, mu=0.5, embedding_dim=8, reduction=reduction)
    x = torch.rand(2, 6, 3, 3) + 0.1
    out = gsp(x, projection=nn.Linear(6, 8))
    reweighted = x.flatten(2) * out.weights[:, None, :]
    expected = reweighted.amax(-1) if reduction == "max" else reweighted.pow(3).mean(-1).pow(1 / 3)
    assert torch.allclose(out.pooled, expected, atol=1e-5)


def test_stable_under_bf16_autocast():
    torch.manual_seed(0)
    gsp = GSP(in_channels=6, num_prototypes=4, mu=0.3, gamma=5.0, embedding_dim=8)
    proj = nn.Linear(6, 8)
    x = torch.randn(2, 6, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gsp(x.bfloat16(), projection=proj)
    assert torch.isfinite(out.pooled).all()
    assert out.weights.dtype == torch.float32
    assert torch.allclose(out.weights.mean(1), torch.ones(2), atol=1e-5)


def test_initialized_flag_is_read_from_the_device_until_true_and_follows_checkpoints():
    # wants_initialization() runs every training step; once True it must not read the buffer
    # (a host-device sync on a GPU), yet a loaded state dict decides again.
    torch.manual_seed(0)
    fresh_state = GSP(8, num_prototypes=4, embedding_dim=8).state_dict()
    gsp = GSP(8, num_prototypes=4, embedding_dim=8)
    assert gsp.wants_initialization()
    gsp.initialize(torch.randn(20, 8))
    assert not gsp.wants_initialization() and bool(gsp.initialized)
    reads = []
    original = torch.Tensor.__bool__
    try:
        torch.Tensor.__bool__ = lambda t: reads.append(1) or original(t)
        assert not gsp.wants_initialization()
    finally:
        torch.Tensor.__bool__ = original
    assert reads == []
    other = GSP(8, num_prototypes=4, embedding_dim=8)
    assert other.wants_initialization()
    other.load_state_dict(gsp.state_dict())
    assert not other.wants_initialization()
    gsp.load_state_dict(fresh_state)  # an uninitialised checkpoint: asks again
    assert gsp.wants_initialization()


def per_iteration_solver(log_s, mu, iters, tol):
    """The solver as it was before its host reads were batched: every iteration reads whether
    all images have converged, and every image takes every step until then."""
    target = math.log(mu) - math.log1p(-mu)
    lo, hi = target - log_s.max(1).values, target - log_s.min(1).values
    t = target - log_s.mean(1)
    for _ in range(iters):
        share = torch.sigmoid(t[:, None] + log_s)
        f = share.mean(1) - mu
        if bool((f.abs() <= tol * mu).all()):
            break
        lo, hi = torch.where(f < 0, t, lo), torch.where(f > 0, t, hi)
        step = t - f / (share * (1 - share)).mean(1).clamp_min(1e-30)
        t = torch.where((step > lo) & (step < hi), step, 0.5 * (lo + hi))
    return t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mu,gamma", [(0.3, 5.0), (0.1, 0.5), (0.8, 20.0)])
def test_the_solver_reads_the_host_every_8_iterations_with_the_same_plan_and_gradient(
    monkeypatch, dtype, mu, gamma
):
    from dml.models import gsp

    g = torch.Generator().manual_seed(3)
    costs = (torch.rand(16, 64, 49, generator=g, dtype=torch.float64) * 2).to(dtype)
    reads = []
    original = torch.Tensor.__bool__

    def counted(self):
        reads.append(1)
        return original(self)

    monkeypatch.setattr(torch.Tensor, "__bool__", counted)
    ours = costs.clone().requires_grad_(True)
    plan = partial_transport(ours, mu, gamma, iters=50, tol=1e-6)
    ours_reads, reads[:] = len(reads), []
    before = costs.clone().requires_grad_(True)
    monkeypatch.setattr(gsp, "_solve_log_nu", per_iteration_solver)
    reference = partial_transport(before, mu, gamma, iters=50, tol=1e-6)
    monkeypatch.undo()
    # one read per 8 iterations where there was one per iteration (the last iteration's count)
    assert ours_reads == -(-len(reads) // 8) and len(reads) >= 2, (ours_reads, len(reads))
    weights = torch.randn(reference.shape, generator=g, dtype=torch.float64).to(dtype)
    (plan * weights).sum().backward()
    (reference * weights).sum().backward()
    scale = plan.shape[-1]  # entries of the plan are O(1 / n)
    assert torch.allclose(plan * scale, reference * scale, atol=1e-6, rtol=0)
    assert torch.allclose(ours.grad, before.grad, atol=1e-6 * gamma, rtol=1e-5)


def cuda_syncs(fn, source: str) -> int:
    """Host-device synchronisations raised while ``fn()`` runs, counted by
    ``torch.cuda.set_sync_debug_mode`` (one warning per synchronising op), of code in files
    whose path ends with ``source``."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) and w.filename.endswith(source) for w in caught)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts CUDA synchronisations")
def test_on_cuda_a_gsp_step_synchronises_once_per_8_solver_iterations():
    """The GSP forward and backward of a training step on CUDA: every synchronisation in
    dml/models/gsp.py is one of the solver's convergence reads (one per 8 of its at most 50
    iterations: at most 7 with the final one), as many as the __bool__ reads counted in the
    same step on the same device."""
    torch.manual_seed(0)
    gsp = GSP(in_channels=256, num_prototypes=64, mu=0.3, gamma=5.0, embedding_dim=128).cuda()
    projection = nn.Linear(256, 128).cuda()
    features = torch.randn(32, 256, 7, 7, device="cuda", requires_grad=True)

    def step():
        gsp(features, projection).pooled.sum().backward()

    step()  # warm-up: kernels, the prototypes' initialisation flag

    syncs = cuda_syncs(step, "dml/models/gsp.py")
    reads = []
    original = torch.Tensor.__bool__
    torch.Tensor.__bool__ = lambda t: reads.append(1) or original(t)
    try:
        step()
    finally:
        torch.Tensor.__bool__ = original
    assert 1 <= syncs <= 7 and syncs == len(reads), (syncs, len(reads))
