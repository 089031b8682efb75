"""CCP's losses: greedy k-center against brute force, the multi-proxy losses against direct
formulas, the proxies' re-pick, and the proximal term's gradient."""

import pytest
import torch
import torch.nn.functional as F

from dml.errors import ConfigError
from dml.losses import build_loss
from dml.losses.ccp import MultiProxyLoss, greedy_k_center, greedy_k_center_batched
from dml.module import BackboneConfig, DMLModule, LossConfig, OptimizerConfig

MARGINS = {
    "c1": {"margin": 0.5},
    "c2": {"pos_margin": 0.1, "neg_margin": 0.6},
    "multi_similarity": {"alpha": 2.0, "beta": 40.0, "base": 0.5},
    "triplet": {"margin": 0.1},
}


# --- greedy k-center -----------------------------------------------------------------------
def brute_force_min_distances(points, chosen):
    return torch.stack(
        [min(float(((p - c) ** 2).sum()) for c in chosen) * torch.ones(()) for p in points]
    )


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
    pos = y[:, None] == ref_y[None, :]
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

        return avg_nonzero(F.relu(d - p["pos_margin"])[pos]) + avg_nonzero(
            F.relu(p["neg_margin"] - d)[neg]
        )
    if name == "multi_similarity":
        a, b, lam = p["alpha"], p["beta"], p["base"]
        per_anchor = [
            torch.log1p(torch.exp(-a * (s[i][pos[i]] - lam)).sum()) / a
            + torch.log1p(torch.exp(b * (s[i][neg[i]] - lam)).sum()) / b
            for i in range(len(z))
        ]
        return torch.stack(per_anchor).mean()
    terms = [
        F.relu(d[i, j] - d[i, k] + p["margin"])
        for i in range(len(z))
        for j in range(len(ref))
        if pos[i, j]
        for k in range(len(ref))
        if neg[i, k]
    ]
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
    parts = loss.named_values(z, y)
    zn, pn = lipschitz(z), lipschitz(proxies)
    proxy_y = torch.tensor([0, 0, 1, 1, 2, 2])  # rows c*K .. c*K+K-1 belong to class c
    assert torch.equal(loss.proxy_labels, proxy_y)
    assert float(parts["proxy"]) == pytest.approx(
        float(direct_loss(name, zn, y, pn, proxy_y)), rel=1e-5
    )
    assert float(parts["pair"]) == pytest.approx(
        0.1 * float(direct_loss(name, zn, y, zn, y, same=True)), rel=1e-5
    )


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
        DMLModule(
            backbone=BackboneConfig("small_cnn", pretrained=False, width=8),
            embedding_dim=8,
            num_classes=4,
            loss=LossConfig(name="proxy_anchor", proxies_per_class=2),
        )


def test_pick_is_greedy_k_center_per_class_seeded_with_the_proxies():
    loss = MultiProxyLoss(build_loss("c2", None, 4, MARGINS["c2"]), 3, 2, 4)
    pool = torch.randn(3, 6, 4, generator=torch.Generator().manual_seed(4))
    seeds = torch.randn(6, 4, generator=torch.Generator().manual_seed(5))
    picks = greedy_k_center_batched(pool, 2, seeds.view(3, 2, 4))
    expected = torch.stack([pool[c, picks[c]] for c in range(3)]).reshape(-1, 4)
    assert torch.equal(loss.pick(pool, seeds), expected)
    from_origin = greedy_k_center_batched(pool, 2, torch.zeros(3, 1, 4))
    assert torch.equal(
        loss.pick(pool), torch.stack([pool[c, from_origin[c]] for c in range(3)]).reshape(-1, 4)
    )
    assert not bool(loss.initialized)
    loss.set_proxies(expected)
    assert torch.equal(loss.proxies.data, expected) and bool(loss.initialized)


# --- the proximal term -----------------------------------------------------------------------
def ccp_module(k=3, name="c2"):
    return DMLModule(
        backbone=BackboneConfig("small_cnn", pretrained=False, width=16),
        embedding_dim=32,
        num_classes=24,
        optimizer=OptimizerConfig(lr=3e-3),
        loss=LossConfig(name=name, params=MARGINS[name], proxies_per_class=k),
    )


def test_proximal_gradient_is_lambda_times_the_distance_to_theta_prev():
    torch.manual_seed(0)
    module = ccp_module()
    params = dict(module.network_parameters())
    assert {n.split(".")[0] for n in params} == {"backbone", "head"}  # every network part
    anchor = {n: p.detach() + 0.01 * torch.randn_like(p) for n, p in params.items()}
    assert module.objective.proximal() is None  # lambda 0: no term
    module.objective.anchor_proximal(anchor, 0.3)
    module.objective.proximal().backward()
    for name, p in params.items():
        torch.testing.assert_close(p.grad, 0.3 * (p.detach() - anchor[name]))
    assert module.objective.proxies().grad is None  # the proxies are not in the term
    value = 0.15 * sum(((p.detach() - anchor[n]) ** 2).sum() for n, p in params.items())
    assert float(module.objective.proximal()) == pytest.approx(float(value), rel=1e-6)


def test_theta_prev_of_another_network_is_a_clear_error():
    module = ccp_module()
    with pytest.raises(ConfigError, match="theta_prev has no weights"):
        module.objective.anchor_proximal({"backbone.other": torch.zeros(1)}, 1e-3)
    other = ccp_module(k=2)
    other.objective.anchor_proximal(dict(other.network_parameters()), 1e-3)
    state = {k: v for k, v in other.state_dict().items() if k.startswith("objective.proximal")}
    smaller = DMLModule(
        backbone=BackboneConfig("small_cnn", pretrained=False, width=8),
        embedding_dim=32,
        num_classes=24,
        loss=LossConfig(name="c2", params=MARGINS["c2"], proxies_per_class=3),
    )
    smaller.load_state_dict(state, strict=False)
    with pytest.raises(ConfigError, match="theta_prev holds"):
        smaller.objective.proximal()
