"""GSP against independent references: GAP at mu = 1, POT's Sinkhorn, finite differences."""

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from dml.losses.zero_shot import ZeroShotPrototypeLoss, ridge_weights, split_by_label
from dml.models import GSP, lipschitz_normalize, partial_transport
from dml.module import BackboneConfig, DMLModule, LossConfig, OptimizerConfig, PoolingConfig
from dml.module import ZeroShotConfig
from dml.selection import greedy_k_center


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
    assert torch.allclose(plan[:, 1:].sum((1, 2)), torch.full((3,), mu, dtype=plan.dtype),
                          atol=1e-9)


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
    assert torch.equal(partial_transport(costs, 1.0, 5.0)[:, 0], torch.zeros(3, 12,
                                                                              dtype=costs.dtype))


@pytest.mark.parametrize("mu,gamma", [(0.3, 5.0), (0.6, 1.0), (0.2, 10.0)])
def test_plan_equals_pot_sinkhorn_on_the_balanced_problem(mu, gamma):
    ot = pytest.importorskip("ot")
    costs = random_costs(b=1, m=4, n=9, seed=3)[0].numpy()
    m, n = costs.shape
    softmin = -np.log(np.exp(-gamma * costs).sum(0)) / gamma  # (n,)
    cost_matrix = np.stack([np.zeros(n), softmin], 1)  # sources x {residual, transported}
    balanced = ot.sinkhorn(np.full(n, 1 / n), np.array([1 - mu, mu]), cost_matrix,
                           reg=1 / gamma, numItermax=100000, stopThr=1e-14)
    split = np.exp(-gamma * costs) / np.exp(-gamma * costs).sum(0, keepdims=True)
    expected_pi = balanced[:, 1][None, :] * split
    plan = partial_transport(torch.from_numpy(costs)[None], mu, gamma, iters=100,
                             tol=1e-14)[0].numpy()
    assert np.allclose(plan[0], balanced[:, 0], atol=1e-10)
    assert np.allclose(plan[1:], expected_pi, atol=1e-10)


@pytest.mark.parametrize("mu,gamma", [(0.3, 5.0), (0.8, 0.5), (1.0, 5.0)])
def test_gradcheck_on_costs(mu, gamma):
    costs = random_costs(b=2, m=3, n=6, seed=1).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda c: partial_transport(c, mu, gamma, iters=100, tol=1e-14), (costs,))


def test_gradcheck_end_to_end_to_prototypes_and_features():
    torch.manual_seed(0)
    gsp = GSP(in_channels=4, num_prototypes=3, mu=0.4, gamma=3.0, iters=100, tol=1e-14,
              embedding_dim=5).double()
    proj = nn.Linear(4, 5).double()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    protos = gsp.prototypes.detach().clone().requires_grad_()
    weight = proj.weight.detach().clone().requires_grad_()

    def f(x, protos, weight):
        out = torch.func.functional_call(gsp, {"prototypes": protos}, (x,),
                                         {"projection": lambda v: nn.functional.linear(
                                             v, weight, proj.bias)})
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
    expected = reweighted.amax(-1) if reduction == "max" else \
        reweighted.pow(3).mean(-1).pow(1 / 3)
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


def test_lipschitz_normalisation():
    v = torch.tensor([[0.3, 0.4], [3.0, 4.0]])
    assert torch.allclose(lipschitz_normalize(v), torch.tensor([[0.3, 0.4], [0.6, 0.8]]))


# --- greedy k-center ------------------------------------------------------------------------
def test_greedy_k_center_maximises_the_minimum_distance_at_each_pick():
    rng = np.random.default_rng(0)
    points = torch.from_numpy(rng.normal(size=(25, 3)))
    seeds = torch.from_numpy(rng.normal(size=(2, 3)))
    picks = greedy_k_center(points, 6, seeds=seeds).tolist()
    chosen = [s.numpy() for s in seeds]
    for pick in picks:  # brute force: the farthest point from everything chosen so far
        d = [min(((p - c) ** 2).sum() for c in chosen) for p in points.numpy()]
        assert pick == int(np.argmax(d))
        chosen.append(points[pick].numpy())
    assert len(set(picks)) == 6
    assert greedy_k_center(points, 6, seeds=seeds).tolist() == picks  # deterministic


def test_greedy_k_center_more_picks_than_points():
    points = torch.eye(3)
    picks = greedy_k_center(points, 7)
    assert len(picks) == 7 and set(picks.tolist()) == {0, 1, 2}


# --- zero-shot loss ------------------------------------------------------------------------
def test_ridge_solution_equals_least_squares():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(10, 6, generator=g, dtype=torch.float64)
    y = torch.randn(10, 4, generator=g, dtype=torch.float64)
    lam = 0.05
    # ridge as an augmented least-squares problem: [A; sqrt(lam) I] w = [Y; 0]
    a_aug = torch.cat([a, lam ** 0.5 * torch.eye(6, dtype=a.dtype)])
    y_aug = torch.cat([y, torch.zeros(6, 4, dtype=y.dtype)])
    expected = torch.linalg.lstsq(a_aug, y_aug).solution
    assert torch.allclose(ridge_weights(a, y, lam), expected, atol=1e-10)


def test_split_by_label_gives_disjoint_classes():
    labels = torch.tensor([5, 5, 2, 2, 9, 9, 7, 7])
    first, second = split_by_label(labels)
    assert set(labels[first].tolist()).isdisjoint(labels[second].tolist())
    assert (first | second).all() and first.any() and second.any()


def test_zero_shot_loss_decreases_on_separable_attributes():
    torch.manual_seed(0)
    classes, m = 8, 16
    prototypes = torch.softmax(3 * torch.randn(classes, m), 1)  # one attribute profile a class
    labels = torch.arange(classes).repeat_interleave(4)
    attributes = prototypes[labels] + 0.01 * torch.rand(len(labels), m)
    loss = ZeroShotPrototypeLoss(classes, 12)
    opt = torch.optim.Adam(loss.parameters(), lr=0.05)
    first = loss(attributes, labels).item()
    for _ in range(100):
        opt.zero_grad()
        value = loss(attributes, labels)
        value.backward()
        opt.step()
    assert value.item() < 0.5 * first


# --- in the model ---------------------------------------------------------------------------
def gsp_module(**kw):
    kw.setdefault("loss", LossConfig(name="proxy_anchor"))
    return DMLModule(backbone=BackboneConfig("small_cnn", pretrained=False, width=16),
                     pooling=PoolingConfig("gsp", {"num_prototypes": 8, "mu": 0.3}),
                     embedding_dim=32, optimizer=OptimizerConfig(lr=3e-3), num_classes=24,
                     **kw)


def fit(module, tmp_path, epochs=1, callbacks=()):
    from dml.data import SyntheticDataModule
    data = SyntheticDataModule(train_classes=24, test_classes=24, images_per_class=10)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                         callbacks=list(callbacks),
                         default_root_dir=tmp_path, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False,
                         limit_val_batches=0, use_distributed_sampler=False)
    trainer.fit(module, data)
    return trainer


def test_prototypes_start_as_k_center_picks_of_the_proxies(tmp_path):
    pl.seed_everything(0)
    module = gsp_module()  # proxy_anchor: 24 proxies >= 8 prototypes, so init "auto" = proxies
    proxies = lipschitz_normalize(module.loss_fn.proxies.detach().clone())
    seen = {}

    class BeforeFirstStep(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.setdefault("prototypes", pl_module.pooling.prototypes.detach().clone())
            seen.setdefault("flag", bool(pl_module.pooling.initialized))

    fit(module, tmp_path, callbacks=[BeforeFirstStep()])
    picks = greedy_k_center(proxies, 8)
    assert torch.allclose(seen["prototypes"], proxies[picks])
    assert seen["flag"]


def test_training_with_gsp_and_zero_shot_and_checkpoint_round_trip(tmp_path):
    pl.seed_everything(0)
    module = gsp_module(loss=LossConfig(name="multi_similarity"),
                        zero_shot=ZeroShotConfig(weight=0.1, metric_weight=0.9))
    assert not bool(module.pooling.initialized)
    trainer = fit(module, tmp_path)
    assert bool(module.pooling.initialized)  # picked from GAP embeddings (no proxies)
    assert module.zero_shot_loss.class_embeddings.grad is not None
    path = tmp_path / "gsp.ckpt"
    trainer.save_checkpoint(path)
    restored = DMLModule.load_from_checkpoint(path)
    assert bool(restored.pooling.initialized)
    assert torch.equal(restored.pooling.prototypes, module.pooling.prototypes)
    assert torch.equal(restored.zero_shot_loss.class_embeddings,
                       module.zero_shot_loss.class_embeddings)
    # Resuming must not re-pick: with the flag restored, on_train_start leaves the prototypes
    # alone (without it, it would need a trainer to draw candidates and fail here).
    before = restored.pooling.prototypes.detach().clone()
    restored.on_train_start()
    assert torch.equal(before, restored.pooling.prototypes)


def test_zero_shot_needs_gsp():
    from dml.errors import ConfigError
    with pytest.raises(ConfigError, match="model.pooling.name: gsp"):
        DMLModule(backbone=BackboneConfig("small_cnn", pretrained=False), num_classes=4,
                  zero_shot=ZeroShotConfig(weight=0.1))
