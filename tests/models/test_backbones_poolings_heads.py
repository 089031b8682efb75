"""Backbones, poolings (and the pooling contract), the embedding head."""

import pytest
import torch
from torch import nn

from dml.builder import POOLINGS, build_pooling
from dml.models import Backbone, EmbeddingHead, Pooling, PretrainedWeightsUnavailable


def test_pooling_definitions():
    torch.manual_seed(0)
    x = torch.rand(2, 5, 3, 4) + 0.1
    assert torch.allclose(build_pooling("gap", 5)(x).pooled, x.flatten(2).mean(-1))
    assert torch.allclose(build_pooling("gmp", 5)(x).pooled, x.flatten(2).max(-1).values)
    gem1 = build_pooling("gem", 5, {"p": 1.0})
    assert torch.allclose(gem1(x).pooled, x.flatten(2).mean(-1), atol=1e-6)  # p = 1 is GAP
    gem3 = build_pooling("gem", 5, {"p": 3.0})
    assert torch.allclose(gem3(x).pooled, x.pow(3).flatten(2).mean(-1).pow(1 / 3), atol=1e-6)
    gem_big = build_pooling("gem", 5, {"p": 60.0})  # p -> inf tends to max pooling
    assert torch.allclose(gem_big(x).pooled, x.flatten(2).max(-1).values, rtol=0.05)


def test_unknown_pooling_and_params_name_the_key():
    with pytest.raises(ValueError, match="model.pooling.name"):
        build_pooling("avg", 4)
    with pytest.raises(ValueError, match=r"model.pooling.params.*\['q'\]"):
        build_pooling("gem", 4, {"q": 2})


def test_head_is_l2_normalised():
    head = EmbeddingHead(16, 8)
    x = torch.randn(5, 16)
    raw, z = head(x)
    assert torch.allclose(raw, head.linear(x))
    assert torch.allclose(z.norm(dim=1), torch.ones(5), atol=1e-6)
    assert torch.allclose(z * raw.norm(dim=1, keepdim=True), raw, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet18", "bn_inception", "small_cnn"])
def test_backbones_return_feature_maps(name):
    net = Backbone(name, pretrained=False).eval()
    size = 64 if name != "small_cnn" else 32
    with torch.no_grad():
        fmap = net(torch.randn(2, 3, size, size))
    assert fmap.ndim == 4 and fmap.shape[1] == net.out_channels
    assert fmap.shape[2] >= 1 and fmap.shape[3] >= 1


def test_resnet50_feature_map_shape():
    net = Backbone("resnet50", pretrained=False).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 224, 224)).shape == (1, 2048, 7, 7)


def test_frozen_bn_stays_frozen_in_train_mode():
    net = Backbone("small_cnn", pretrained=False, frozen_bn=True)
    net.train()
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    assert all(not p.requires_grad for m in bns for p in m.parameters())
    before = bns[0].running_mean.clone()
    net(torch.randn(4, 3, 32, 32) * 5 + 3)
    assert torch.equal(before, bns[0].running_mean)  # statistics not updated


def test_pretrained_weights_offline_is_a_clear_error(monkeypatch):
    import torchvision.models as tvm

    def offline(*args, **kwargs):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(
        tvm.ResNet18_Weights.IMAGENET1K_V1.__class__,
        "get_state_dict",
        lambda self, *a, **k: offline(),
    )
    with pytest.raises(PretrainedWeightsUnavailable, match="pretrained: false"):
        Backbone("resnet18", pretrained=True)


def test_small_cnn_refuses_pretrained():
    with pytest.raises(ValueError, match="pretrained: false"):
        Backbone("small_cnn", pretrained=True)


def test_every_pooling_follows_the_contract():
    x = torch.rand(2, 5, 4, 4)
    head = nn.Linear(5, 6)
    for name in POOLINGS:
        pooling = build_pooling(name, 5, {"num_prototypes": 3} if name == "gsp" else {}, 6)
        assert isinstance(pooling, Pooling), name
        token = torch.rand(2, 5)  # a ViT's class token, for poolings that use it
        out = (
            pooling(x, projection=head, class_token=token)
            if pooling.uses_class_token
            else pooling(x, projection=head)
        )
        assert out.pooled.shape == (2, 5)
        if name == "cls":
            assert torch.equal(out.pooled, token)
        assert (out.attributes is not None) == pooling.produces_attributes, name
    gsp = build_pooling("gsp", 5, {"num_prototypes": 3}, 6)
    assert gsp.wants_initialization() and gsp.candidate_source(None) == "embeddings"
    assert gsp.candidate_source(10) == "class_rows" and gsp.candidate_source(2) == "embeddings"
    gsp.initialize(torch.randn(10, 6))
    assert not gsp.wants_initialization()
    assert not build_pooling("gap", 5).wants_initialization()
