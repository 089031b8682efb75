"""CCP: greedy k-center against brute force, the multi-proxy losses against direct formulas,
the proximal term's gradient, and the projection-rounds callback (rounds, re-picks, checkpoint)."""
import pytorch_lightning as pl
import pytest
import torch
import torch.nn.functional as F

from dml.callbacks import ChanceConstraintProjection
from dml.callbacks.ccp import network_parameters
from dml.errors import ConfigError
from dml.losses import build_loss
from dml.losses.ccp import MultiProxyLoss, greedy_k_center, greedy_k_center_batched
from dml.module import BackboneConfig, DMLModule, LossConfig, OptimizerConfig
from test_training import small_data, trainer

MARGINS = {"c1": {"margin": 0.5}, "c2": {"pos_margin": 0.1, "neg_margin": 0.6},
           "multi_similarity": {"alpha": 2.0, "beta": 40.0, "base": 0.5},
           "triplet": {"margin": 0.1}}


# --- greedy k-center -----------------------------------------------------------------------
def brute_force_min_distances(points, chosen):
    return torch.stack([min(float(((p - c) ** 2).sum()) for c in chosen) * torch.ones(())
                        for p in points])


@pytest.mark.parametrize("with_seeds", [True, False])
def test_greedy_k_center_maximises_the_min_distance_at_every_pick(with_seeds):
    g = torch.Generator().manual_seed(0)
    points, seeds = torch.randn(15, 3, generator=g), torch.randn(2, 3, generator=g)
    picks = greedy_k_center(points, 6, seeds if with_seeds else None).tolist()
    assert len(set(picks)) == 6
    chosen = list(seeds) if with_seeds else [points.mean(0)]
    for step, i in enumerate(picks):
        d = brute_force_min_distances(points, chosen)
        d[picks[:step]] = -1  # already picked
        assert float(d[i]) == pytest.approx(float(d.max()))
        chosen = ([] if step == 0 and not with_seeds else chosen) + [points[i]]
    assert greedy_k_center(points, 6, seeds).tolist() == greedy_k_center(points, 6, seeds).tolist()


def test_greedy_k_center_with_k_above_pool_size_returns_k_indices_covering_the_pool():
    points = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    picks = greedy_k_center(points, 7, torch.zeros(1, 4)).tolist()
    assert len(picks) == 7 and sorted(picks[:3]) == [0, 1, 2] and picks[3:6] == picks[:3]


def test_batched_greedy_k_center_equals_one_call_per_group():
    g = torch.Generator().manual_seed(2)
    points, seeds = torch.randn(5, 9, 4, generator=g), torch.randn(5, 3, 4, generator=g)
    batched = greedy_k_center_batched(points, 4, seeds)
    for c in range(5):
        assert batched[c].tolist() == greedy_k_center(points[c], 4, seeds[c]).tolist()
    assert greedy_k_center_batched(points[:, :2], 5, seeds).shape == (5, 5)


# --- the multi-proxy losses -----------------------------------------------------------------
def lipschitz(v):
    return v / v.norm(dim=1, keepdim=True).clamp_min(1.0)


def direct_loss(name, z, y, ref, ref_y, same=False):
    """The base losses written out over all (anchor, reference) pairs; ``same``: the
    references are the anchors themselves (self-pairs excluded)."""
    pos = (y[:, None] == ref_y[None, :])
    neg = ~pos
    if same:
        pos &= ~torch.eye(len(z), dtype=torch.bool)
    s, d = z @ ref.T, torch.cdist(z, ref)
    p = MARGINS[name]
    if name == "c1":
        return ((1 - s)[pos].sum() + F.relu(s - p["margin"])[neg].sum()) / len(z)
    if name == "c2":
        def avg_nonzero(t):
            return t[t > 0].mean() if (t > 0).any() else t.sum() * 0
        return avg_nonzero(F.relu(d - p["pos_margin"])[pos]) + \
            avg_nonzero(F.relu(p["neg_margin"] - d)[neg])
    if name == "multi_similarity":
        a, b, lam = p["alpha"], p["beta"], p["base"]
        per_anchor = [torch.log1p(torch.exp(-a * (s[i][pos[i]] - lam)).sum()) / a +
                      torch.log1p(torch.exp(b * (s[i][neg[i]] - lam)).sum()) / b
                      for i in range(len(z))]
        return torch.stack(per_anchor).mean()
    terms = [F.relu(d[i, j] - d[i, k] + p["margin"]) for i in range(len(z))
             for j in range(len(ref)) if pos[i, j] for k in range(len(ref)) if neg[i, k]]
    terms = torch.stack(terms)
    return terms[terms > 0].mean()


def tiny_example(k=2):
    g = torch.Generator().manual_seed(3)
    z = 0.8 * torch.randn(6, 5, generator=g)  # some norms below 1, some above
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    proxies = 0.8 * torch.randn(3 * k, 5, generator=g)
    return z, y, proxies


@pytest.mark.parametrize("name", sorted(MARGINS))
def test_multi_proxy_loss_matches_the_direct_formula(name):
    z, y, proxies = tiny_example(k=2)
    loss = MultiProxyLoss(build_loss(name, None, 5, MARGINS[name]), 3, 2, 5)
    loss.proxies.data.copy_(proxies)
    parts = loss.parts(z, y)
    zn, pn = lipschitz(z), lipschitz(proxies)
    proxy_y = torch.tensor([0, 0, 1, 1, 2, 2])  # rows c*K .. c*K+K-1 belong to class c
    assert torch.equal(loss.proxy_labels, proxy_y)
    assert float(parts["proxy"]) == pytest.approx(float(direct_loss(name, zn, y, pn, proxy_y)),
                                                  rel=1e-5)
    assert float(parts["pair"]) == pytest.approx(
        0.1 * float(direct_loss(name, zn, y, zn, y, same=True)), rel=1e-5)


@pytest.mark.parametrize("name", ["c2", "triplet"])
def test_one_proxy_at_the_class_mean_is_the_single_proxy_loss_and_copies_change_nothing(name):
    z, y, _ = tiny_example()
    means = torch.stack([lipschitz(z)[y == c].mean(0) for c in range(3)])
    single = MultiProxyLoss(build_loss(name, None, 5, MARGINS[name]), 3, 1, 5, pair_weight=0)
    single.proxies.data.copy_(means)
    expected = direct_loss(name, lipschitz(z), y, means, torch.arange(3))
    assert float(single(z, y)) == pytest.approx(float(expected), rel=1e-5)
    copies = MultiProxyLoss(build_loss(name, None, 5, MARGINS[name]), 3, 4, 5, pair_weight=0)
    copies.proxies.data.copy_(means.repeat_interleave(4, dim=0))
    assert float(copies(z, y)) == pytest.approx(float(expected), rel=1e-5)


def test_proxies_on_a_proxy_loss_are_a_config_error():
    with pytest.raises(ConfigError, match="proxies_per_class"):
        DMLModule(backbone=BackboneConfig("small_cnn", pretrained=False, width=8),
                  embedding_dim=8, num_classes=4,
                  loss=LossConfig(name="proxy_anchor", proxies_per_class=2))


# --- the proximal term and the rounds ---------------------------------------------------------
def ccp_module(k=3, name="c2"):
    return DMLModule(backbone=BackboneConfig("small_cnn", pretrained=False, width=16),
                     embedding_dim=32, num_classes=24, optimizer=OptimizerConfig(lr=3e-3),
                     loss=LossConfig(name=name, params=MARGINS[name], proxies_per_class=k))


def test_proximal_gradient_is_lambda_times_the_distance_to_theta_prev():
    torch.manual_seed(0)
    module = ccp_module()
    params = network_parameters(module)
    anchor = {n: p.detach() + 0.01 * torch.randn_like(p) for n, p in params.items()}
    callback = ChanceConstraintProjection(enabled=True)
    callback.theta_prev, callback.lam = anchor, 0.3
    callback.losses(module, None, None)["proximal"].backward()
    for name, p in params.items():
        torch.testing.assert_close(p.grad, 0.3 * (p.detach() - anchor[name]))
    assert module.loss_fn.proxies.grad is None  # the proxies are not in the term
    callback.lam = 0.0
    assert callback.losses(module, None, None) == {}




def fit_ccp(tmp_path, epochs, **kw):
    pl.seed_everything(0)
    module, data = ccp_module(), small_data()
    callback = ChanceConstraintProjection(enabled=True, patience=1, min_delta=10.0,
                                          pool_passes=4, lam=1e-3)
    t = trainer(tmp_path, epochs, callbacks=[callback], **kw)
    t.fit(module, data)
    return module, data, callback, t


def test_rounds_end_on_plateau_and_replace_the_proxies(tmp_path, monkeypatch):
    module, data, callback, t = fit_ccp(tmp_path, 4, enable_checkpointing=False)
    # 4 validations, patience 1, min_delta that nothing beats: rounds end at checks 2 and 4
    assert callback.round == 2 and [h["epoch"] for h in callback.history] == [1, 3]
    assert callback.lam == pytest.approx(1e-3)
    assert module.loss_fn.proxies.shape == (24 * 3, 32) and bool(module.loss_fn.initialized)
    assert set(callback.theta_prev) == set(network_parameters(module))
    # a round end, with a known pool: the new proxies are greedy k-center picks seeded with
    # the round's best proxies
    pool = torch.randn(24, 5, 32, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(callback, "candidate_pool", lambda trainer, module: pool)
    seeds = torch.randn(24 * 3, 32)
    callback.reinitialize(t, module, seeds)
    picks = greedy_k_center_batched(pool, 3, seeds.view(24, 3, 32))
    expected = torch.stack([pool[c, picks[c]] for c in range(24)]).reshape(-1, 32)
    assert torch.equal(module.loss_fn.proxies.data, expected)


def test_candidate_pool_draws_one_image_per_class_per_pass(tmp_path):
    module, data, callback, t = fit_ccp(tmp_path, 1, enable_checkpointing=False)
    import numpy as np
    labels = np.asarray(data.train_labels())
    draws = callback.candidate_draws(labels, 24, 5)
    assert draws.shape == (5, 24) and (labels[draws] == np.arange(24)).all()
    pool = callback.candidate_pool(t, module)
    assert pool.shape == (24, 4, 32)  # pool_passes 4 >= K 3
    module.eval()
    with torch.no_grad():  # synthetic images are not augmented: the pool is reproducible
        x = torch.stack([data.train_dataset[int(i)][0] for i in
                         callback.candidate_draws(labels, 24, 4)[:, 7]])
        torch.testing.assert_close(module.embed(x)["raw_embeddings"], pool[7])


def test_ccp_state_survives_a_checkpoint_round_trip(tmp_path):
    module, data, callback, t = fit_ccp(tmp_path, 4, enable_checkpointing=False)
    path = tmp_path / "ccp.ckpt"
    t.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["callbacks"]["ChanceConstraintProjection"]
    assert state["round"] == 2 and state["lam"] == pytest.approx(1e-3)
    restored_cb = ChanceConstraintProjection(enabled=True, patience=1, min_delta=10.0,
                                             pool_passes=4, lam=1e-3)
    restored = DMLModule.load_from_checkpoint(path)
    t2 = trainer(tmp_path, 4, callbacks=[restored_cb], enable_checkpointing=False)
    t2.fit(restored, small_data(), ckpt_path=path)  # max_epochs reached: restores only
    assert restored_cb.round == 2 and restored_cb.lam == callback.lam
    assert restored_cb.history == callback.history
    assert restored_cb.best_score == callback.best_score
    for name, value in callback.theta_prev.items():
        assert torch.equal(restored_cb.theta_prev[name].cpu(), value.cpu())
    assert torch.equal(restored.loss_fn.proxies, module.loss_fn.proxies)
    assert bool(restored.loss_fn.initialized)
    a = callback.losses(module, None, None)["proximal"]
    b = restored_cb.losses(restored, None, None)["proximal"]
    assert float(a) == pytest.approx(float(b))


def test_ccp_without_proxies_is_a_config_error(tmp_path):
    module = DMLModule(backbone=BackboneConfig("small_cnn", pretrained=False, width=8),
                       embedding_dim=8, num_classes=24, loss=LossConfig(name="c2"))
    t = trainer(tmp_path, 1, callbacks=[ChanceConstraintProjection(enabled=True)])
    with pytest.raises(ConfigError, match="proxies_per_class"):
        t.fit(module, small_data())


def test_theta_prev_of_another_network_is_a_clear_error():
    module = ccp_module()
    callback = ChanceConstraintProjection(enabled=True)
    callback.lam, callback.theta_prev = 1e-3, {"backbone.other": torch.zeros(1)}
    with pytest.raises(ConfigError, match="theta_prev has no weights"):
        callback.losses(module, None, None)
