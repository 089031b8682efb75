"""CCP's projection rounds: rounds end on validation plateaus, proxies are re-picked, lambda
follows lambda0 * decay^r, the candidate pools draw without replacement, and the state survives
a checkpoint."""

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from helpers import small_data, trainer

from dml.callbacks import ChanceConstraintProjection
from dml.errors import ConfigError
from dml.losses.ccp import greedy_k_center_batched
from dml.module import BackboneConfig, DMLModule, LossConfig, OptimizerConfig

MARGINS = {"c2": {"pos_margin": 0.1, "neg_margin": 0.6}}


def ccp_module(k=3):
    return DMLModule(
        backbone=BackboneConfig("small_cnn", pretrained=False, width=16),
        embedding_dim=32,
        num_classes=24,
        optimizer=OptimizerConfig(lr=3e-3),
        loss=LossConfig(name="c2", params=MARGINS["c2"], proxies_per_class=k),
    )


def fit_ccp(tmp_path, epochs, lam_decay=1.0, **kw):
    pl.seed_everything(0)
    module, data = ccp_module(), small_data()
    callback = ChanceConstraintProjection(
        enabled=True, patience=1, min_delta=10.0, pool_passes=4, lam=1e-3, lam_decay=lam_decay
    )
    t = trainer(tmp_path, epochs, callbacks=[callback], **kw)
    t.fit(module, data)
    return module, data, callback, t


def test_rounds_end_on_plateau_and_replace_the_proxies(tmp_path, monkeypatch):
    module, data, callback, t = fit_ccp(tmp_path, 4, enable_checkpointing=False)
    # 4 validations, patience 1, min_delta that nothing beats: rounds end at checks 2 and 4
    assert callback.round == 2 and [h["epoch"] for h in callback.history] == [1, 3]
    assert callback.lam == pytest.approx(1e-3)
    objective = module.objective
    assert objective.proxies().shape == (24 * 3, 32) and objective.proxies_initialized()
    assert float(objective.proximal.lam) == pytest.approx(1e-3)
    # theta_prev: the round's best network weights, every one of them
    n_weights = sum(p.numel() for _, p in module.network_parameters())
    assert objective.proximal.theta_prev.numel() == n_weights
    # a round end, with a known pool: the new proxies are greedy k-center picks seeded with
    # the round's best proxies
    pool = torch.randn(24, 5, 32, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(callback, "candidate_pool", lambda trainer, module: pool)
    seeds = torch.randn(24 * 3, 32)
    callback.reinitialize(t, module, seeds)
    picks = greedy_k_center_batched(pool, 3, seeds.view(24, 3, 32))
    expected = torch.stack([pool[c, picks[c]] for c in range(24)]).reshape(-1, 32)
    assert torch.equal(objective.proxies().data, expected)


def test_lambda_after_r_rounds_is_lambda0_times_decay_to_the_r(tmp_path):
    module, data, callback, t = fit_ccp(tmp_path, 4, lam_decay=0.5, enable_checkpointing=False)
    assert callback.round == 2
    assert callback.lam == pytest.approx(1e-3 * 0.5**2)  # the released schedule
    assert float(module.objective.proximal.lam) == pytest.approx(1e-3 * 0.25)


def test_candidate_pools_draw_each_class_without_replacement(tmp_path):
    callback = ChanceConstraintProjection(enabled=True, seed=3)
    labels = np.repeat(np.arange(4), [30, 12, 5, 1])
    draws = callback.candidate_draws(labels, 4, 12)
    assert draws.shape == (12, 4) and (labels[draws] == np.arange(4)).all()
    assert len(set(draws[:, 0])) == 12 and len(set(draws[:, 1])) == 12  # 12 distinct of 30, 12
    assert sorted(set(draws[:, 2])) == list(range(42, 47))  # a class of 5: every image
    counts = np.bincount(draws[:, 2])[42:47]
    assert counts.max() - counts.min() <= 1  # cycled through: 12 draws = 2 or 3 each
    assert (draws[:, 3] == 47).all()


def test_candidate_pool_is_the_network_embedding_of_the_drawn_images(tmp_path):
    module, data, callback, t = fit_ccp(tmp_path, 1, enable_checkpointing=False)
    labels = np.asarray(data.train_labels())
    pool = callback.candidate_pool(t, module)
    assert pool.shape == (24, 4, 32)  # pool_passes 4 >= K 3
    module.eval()
    with torch.no_grad():  # synthetic images are not augmented: the pool is reproducible
        x = torch.stack(
            [data.train_dataset[int(i)][0] for i in callback.candidate_draws(labels, 24, 4)[:, 7]]
        )
        torch.testing.assert_close(module.embed(x)["raw_embeddings"], pool[7])


def test_ccp_state_survives_a_checkpoint_round_trip(tmp_path):
    module, data, callback, t = fit_ccp(tmp_path, 4, enable_checkpointing=False)
    path = tmp_path / "ccp.ckpt"
    t.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["callbacks"]["ChanceConstraintProjection"]
    assert state["round"] == 2 and state["lam"] == pytest.approx(1e-3)
    restored_cb = ChanceConstraintProjection(
        enabled=True, patience=1, min_delta=10.0, pool_passes=4, lam=1e-3
    )
    restored = DMLModule.load_from_checkpoint(path)
    t2 = trainer(tmp_path, 4, callbacks=[restored_cb], enable_checkpointing=False)
    t2.fit(restored, small_data(), ckpt_path=path)  # max_epochs reached: restores only
    assert restored_cb.round == 2 and restored_cb.lam == callback.lam
    assert restored_cb.history == callback.history
    assert restored_cb.best_score == callback.best_score
    a, b = module.objective, restored.objective
    assert torch.equal(a.proximal.theta_prev, b.proximal.theta_prev)
    assert torch.equal(a.proxies(), b.proxies()) and b.proxies_initialized()
    assert float(a.proximal()) == pytest.approx(float(b.proximal()))


def test_ccp_without_proxies_is_a_config_error(tmp_path):
    module = DMLModule(
        backbone=BackboneConfig("small_cnn", pretrained=False, width=8),
        embedding_dim=8,
        num_classes=24,
        loss=LossConfig(name="c2"),
    )
    t = trainer(tmp_path, 1, callbacks=[ChanceConstraintProjection(enabled=True)])
    with pytest.raises(ConfigError, match="proxies_per_class"):
        t.fit(module, small_data())
