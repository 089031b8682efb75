"""Losses and miners by name: each runs, backpropagates, and bad names or parameters are errors
naming the key."""

import pytest
import torch

from dml.losses import LOSSES, build_loss, build_miner, loss_has_parameters


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_named_loss_runs_and_backpropagates(name):
    torch.manual_seed(0)
    loss = build_loss(name, num_classes=4, embedding_dim=8)
    z = torch.nn.functional.normalize(torch.randn(16, 8), dim=1).requires_grad_()
    y = torch.arange(4).repeat_interleave(4)
    value = loss(z, y)
    value.backward()
    assert torch.isfinite(value) and z.grad is not None
    assert loss_has_parameters(loss) == (
        name in ("proxy_anchor", "proxy_nca", "soft_triple", "normalized_softmax")
    )


def test_loss_errors_name_the_key():
    with pytest.raises(ValueError, match="model.loss.name"):
        build_loss("arcface2", 4, 8)
    with pytest.raises(ValueError, match=r"model.loss.params.*\['margin'\]"):
        build_loss("multi_similarity", 4, 8, {"margin": 0.1})
    with pytest.raises(ValueError, match="model.loss.params.distance"):
        build_loss("contrastive", 4, 8, {"distance": "manhattan"})
    with pytest.raises(ValueError, match="model.loss.miner"):
        build_miner("hardest")
