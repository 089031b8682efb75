"""Shared helpers."""

import torch

from dml.functional import lipschitz_normalize


def test_lipschitz_normalisation():
    v = torch.tensor([[0.3, 0.4], [3.0, 4.0]])
    assert torch.allclose(lipschitz_normalize(v), torch.tensor([[0.3, 0.4], [0.6, 0.8]]))
