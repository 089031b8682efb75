"""IBC: the extra-zero-logit attention, permutation equivariance, the residual path, the
backbone-only evaluation, k-reciprocal neighbours against brute force, and training."""

import torch
import torch.nn.functional as F

from dml.models import MessagePassingNetwork, zero_logit_softmax
from dml.models.message_passing import MessagePassingLayer


def test_zero_logit_softmax_matches_the_direct_formula_and_rows_sum_below_one():
    s = torch.randn(3, 5, generator=torch.Generator().manual_seed(0)) * 3
    a = zero_logit_softmax(s)
    direct = torch.exp(s) / (1 + torch.exp(s).sum(-1, keepdim=True))
    torch.testing.assert_close(a, direct)
    assert (a.sum(-1) < 1).all() and (a > 0).all()
    # large logits: stable, and the sum approaches (but stays below) one
    big = zero_logit_softmax(torch.tensor([[200.0, 199.0]]))
    assert torch.isfinite(big).all() and float(big.sum()) <= 1.0
    mask = torch.tensor([[True, False, True, True, False]] * 3)
    masked = zero_logit_softmax(s, mask)
    assert (masked[:, [1, 4]] == 0).all()
    keep = s[:, [0, 2, 3]]
    torch.testing.assert_close(
        masked[:, [0, 2, 3]], torch.exp(keep) / (1 + torch.exp(keep).sum(-1, keepdim=True))
    )


def test_attention_weights_of_a_layer_follow_the_formula():
    torch.manual_seed(0)
    layer = MessagePassingLayer(8, heads=2, dropout=0.0, ff_hidden=16)
    h = torch.randn(1, 5, 8)
    a = layer.attention(h)
    q = layer.q(h).view(1, 5, 2, 4).transpose(1, 2)
    k = layer.k(h).view(1, 5, 2, 4).transpose(1, 2)
    s = q @ k.transpose(-1, -2) / 2.0
    torch.testing.assert_close(a, torch.exp(s) / (1 + torch.exp(s).sum(-1, keepdim=True)))


def test_mpn_is_permutation_equivariant():
    torch.manual_seed(0)
    mpn = MessagePassingNetwork(16, layers=2, heads=4, ff_hidden=32, concat=True).eval()
    f = F.normalize(torch.randn(9, 16), dim=1)
    perm = torch.randperm(9)
    with torch.no_grad():
        torch.testing.assert_close(mpn(f[perm]), mpn(f)[perm])
    assert mpn(f).shape == (9, 32)


def test_zero_value_projection_leaves_the_residual_and_norm_path():
    torch.manual_seed(0)
    layer = MessagePassingLayer(8, heads=2, dropout=0.0, ff_hidden=16).eval()
    with torch.no_grad():
        layer.v.weight.zero_(), layer.v.bias.zero_()
        h = torch.randn(1, 6, 8)
        expected = layer.norm1(h + layer.out.bias)  # W_o applied to zero messages
        expected = layer.norm2(expected + layer.ff(expected))
        torch.testing.assert_close(layer(h), expected)
        # no message: a sample's output no longer depends on the others
        torch.testing.assert_close(layer(h[:, :1]), expected[:, :1])


def test_padded_groups_ignore_masked_members():
    torch.manual_seed(0)
    mpn = MessagePassingNetwork(8, layers=1, heads=2, ff_hidden=16).eval()
    group = torch.randn(1, 4, 8)
    mask = torch.tensor([[True, True, False, False]])
    with torch.no_grad():
        padded = mpn(torch.cat([group[:, :2], torch.randn(1, 2, 8)], 1), mask)[:, :2]
        torch.testing.assert_close(padded, mpn(group[:, :2]))
