"""timm backbones under the feature-map contract, with small random-init models (no download):
a tiny ViT at 32 px (patch 8: a 4 x 4 grid) and ConvNeXt-atto."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from dml.errors import ConfigError
from dml.models import GSP, Backbone, PretrainedWeightsUnavailable

timm = pytest.importorskip("timm")

VIT = "timm:vit_small_patch16_224.dino"
TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_vit(**extra) -> Backbone:
    torch.manual_seed(0)
    return Backbone(VIT, pretrained=False, timm_args={**TINY_VIT, **extra}).eval()


def test_vit_patch_tokens_become_the_patch_grid_and_the_class_token_is_kept():
    backbone = tiny_vit()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = backbone.net.model.forward_features(backbone.net.input_norm(x))  # (B, 1 + 16, D)
        feature_map, class_token = backbone(x, with_class_token=True)
        plain = backbone(x)
    assert tokens.shape == (3, 17, 48) and feature_map.shape == (3, 48, 4, 4)
    assert backbone.out_channels == 48 and backbone.has_class_token
    for i in range(4):  # row-major: location (i, j) is patch token i * w + j
        for j in range(4):
            assert torch.equal(feature_map[:, :, i, j], tokens[:, 1 + 4 * i + j])
    assert torch.equal(class_token, tokens[:, 0])
    assert torch.equal(plain, feature_map)


def test_register_tokens_are_prefix_tokens_not_locations():
    backbone = tiny_vit(reg_tokens=4)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = backbone.net.model.forward_features(backbone.net.input_norm(x))
        feature_map = backbone(x)
    assert backbone.net.num_prefix_tokens == 5 and tokens.shape[1] == 21
    assert torch.equal(feature_map.flatten(2).transpose(1, 2), tokens[:, 5:])


def test_the_grid_follows_the_input_size_with_dynamic_img_size():
    backbone = tiny_vit(dynamic_img_size=True)
    with torch.no_grad():
        assert backbone(torch.randn(2, 3, 32, 48)).shape == (2, 48, 4, 6)


def test_a_convnet_gives_its_last_stage():
    torch.manual_seed(0)
    backbone = Backbone("timm:convnext_atto", pretrained=False).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feature_map = backbone(x)
        reference = backbone.net.model.forward_features(x)
    assert feature_map.shape == (2, 320, 2, 2) and backbone.out_channels == 320
    assert torch.equal(feature_map, reference)
    assert backbone.convolutional and not tiny_vit().convolutional  # channels-last for CNNs
    assert not backbone.has_class_token
    with pytest.raises(ConfigError, match="class token"):
        backbone(x, with_class_token=True)


def test_inputs_are_renormalised_to_the_statistics_the_model_was_trained_with():
    backbone = Backbone(
        "timm:vit_base_patch16_clip_224.openai",
        pretrained=False,
        timm_args={"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 1, "num_heads": 3},
    )
    mean = torch.tensor(backbone.net.model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(backbone.net.model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    pixels = torch.rand(2, 3, 8, 8)
    imagenet = (pixels - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]
    ).view(1, 3, 1, 1)
    assert torch.allclose(backbone.net.input_norm(imagenet), (pixels - mean) / std, atol=1e-6)
    assert isinstance(
        Backbone("timm:convnext_atto", pretrained=False).net.input_norm, nn.Identity
    )  # trained on ImageNet's statistics: nothing to do


def test_gsp_over_patch_tokens_at_full_mass_is_the_mean_patch_token():
    backbone = tiny_vit()
    torch.manual_seed(1)
    gsp = GSP(in_channels=48, num_prototypes=8, mu=1.0, gamma=5.0, embedding_dim=16)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        tokens = backbone.net.model.forward_features(backbone.net.input_norm(x))[:, 1:]
        out = gsp(backbone(x), projection=nn.Linear(48, 16))
    assert torch.allclose(out.pooled, tokens.mean(1), atol=1e-6)
    assert out.weights.shape == (4, 16) and torch.allclose(out.weights, torch.ones(4, 16))
    with torch.no_grad():  # a partial mass keeps a different share of the 16 tokens
        partial = GSP(in_channels=48, num_prototypes=8, mu=0.3, embedding_dim=16)(
            backbone(x), projection=nn.Linear(48, 16)
        )
    assert torch.allclose(partial.weights.mean(1), torch.ones(4), atol=1e-5)
    assert not torch.allclose(partial.pooled, tokens.mean(1), atol=1e-3)


def test_cls_pooling_embeds_the_class_token():
    from dml.config import BackboneConfig, PoolingConfig
    from dml.module import DMLModule

    module = DMLModule(
        backbone=BackboneConfig(VIT, pretrained=False, timm_args=TINY_VIT),
        pooling=PoolingConfig("cls"),
        embedding_dim=16,
        num_classes=10,
    ).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        _, class_token = module.backbone(x, with_class_token=True)
        raw, embeddings = module.head(class_token)
        assert torch.allclose(module(x), embeddings, atol=1e-6)
    with pytest.raises(ConfigError, match="cls pools the class token; backbone 'small_cnn'"):
        DMLModule(
            backbone=BackboneConfig("small_cnn", pretrained=False),
            pooling=PoolingConfig("cls"),
            embedding_dim=16,
            num_classes=10,
        )


def test_layer_decay_gives_each_block_its_rate_and_every_parameter_one_group():
    from dml.config import BackboneConfig, OptimizerConfig
    from dml.module import DMLModule

    module = DMLModule(
        backbone=BackboneConfig(VIT, pretrained=False, timm_args=TINY_VIT),
        embedding_dim=16,
        num_classes=10,
        optimizer=OptimizerConfig(lr=1e-3, backbone_lr_mult=0.1, layer_decay=0.5),
    )
    groups = module.parameter_groups()
    rates = module.configured_learning_rates()
    # timm's grouping of a depth-2 ViT: embeddings 0, block 0 -> 1, block 1 and the norm -> 2
    assert sorted(g for g in groups if g.startswith("backbone")) == [
        "backbone.0",
        "backbone.1",
        "backbone.2",
    ]
    assert [rates[f"backbone.{i}"] for i in range(3)] == pytest.approx([2.5e-5, 5e-5, 1e-4])
    names = {id(p): n for n, p in module.named_parameters()}
    in_block0 = {names[id(p)] for p in groups["backbone.1"]}
    assert in_block0 and all(".blocks.0." in n for n in in_block0)
    assert {names[id(p)] for p in groups["backbone.0"]} >= {
        "backbone.net.model.cls_token",
        "backbone.net.model.pos_embed",
    }
    optimizer = module.configure_optimizers()
    assert sum(len(g["params"]) for g in optimizer.param_groups) == sum(
        p.requires_grad for p in module.parameters()
    )
    with pytest.raises(ConfigError, match="layer_decay: applies to timm backbones"):
        DMLModule(
            backbone=BackboneConfig("small_cnn", pretrained=False),
            embedding_dim=16,
            num_classes=10,
            optimizer=OptimizerConfig(layer_decay=0.5),
        ).parameter_groups()


def test_unknown_names_and_unavailable_weights_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="timm has no model 'vit_nonexistent_s16'"):
        Backbone("timm:vit_nonexistent_s16", pretrained=False)
    with pytest.raises(ConfigError, match="pretrained tag"):
        Backbone("timm:vit_small_patch16_224.nosuchtag", pretrained=False)
    with pytest.raises(ConfigError, match="timm_args: only for timm"):
        Backbone("small_cnn", pretrained=False, timm_args={"img_size": 32})
    # no network and an empty cache: the weights cannot be had; never a silent random init
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf"),
        TORCH_HOME=str(tmp_path / "torch"),
    )
    code = (
        "from dml.models import Backbone, PretrainedWeightsUnavailable\n"
        "try:\n    Backbone('timm:vit_small_patch16_224.dino', pretrained=True)\n"
        "except PretrainedWeightsUnavailable as e:\n    print('UNAVAILABLE', e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(
        "UNAVAILABLE Could not load the pretrained weights of timm "
        "model 'vit_small_patch16_224.dino'"
    )
    assert "pretrained: false" in out.stdout and len(out.stdout.strip().splitlines()) == 1
    assert issubclass(PretrainedWeightsUnavailable, RuntimeError)


def test_an_image_size_the_vit_does_not_take_names_the_settings():
    with pytest.raises(
        ConfigError,
        match=r"takes \(32, 32\) images, got 48 x 48: set the "
        r"data set's image size to 32 \(data.init_args.crop",
    ):
        tiny_vit()(torch.randn(1, 3, 48, 48))


def test_an_nhwc_model_is_permuted_to_the_map_contract():
    torch.manual_seed(0)
    swin = Backbone(
        "timm:swin_tiny_patch4_window7_224",
        pretrained=False,
        timm_args={
            "img_size": 56,
            "embed_dim": 24,
            "depths": (1, 1, 1, 1),
            "num_heads": (1, 1, 1, 1),
        },
    ).eval()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        nhwc = swin.net.model.forward_features(x)
        feature_map = swin(x)
    assert nhwc.shape == (2, 2, 2, 192) and feature_map.shape == (2, 192, 2, 2)
    assert torch.equal(feature_map, nhwc.permute(0, 3, 1, 2))


def test_pretrained_weights_from_a_local_file_load_and_a_misfit_is_named(tmp_path):
    # timm's pretrained_cfg_overlay={"file": ...} loads weights from disk (no network): the
    # loaded backbone holds exactly those weights; an architecture they do not fit is an error
    # naming timm_args, not "offline"
    source = tiny_vit()
    path = tmp_path / "weights.pth"
    torch.save(source.net.model.state_dict(), path)
    args = {**TINY_VIT, "pretrained_cfg_overlay": {"file": str(path)}}
    loaded = Backbone(VIT, pretrained=True, timm_args=args)
    for name, tensor in source.net.model.state_dict().items():
        assert torch.equal(loaded.net.model.state_dict()[name], tensor), name
    with pytest.raises(ConfigError, match="do not fit the architecture"):
        Backbone(VIT, pretrained=True, timm_args={**args, "embed_dim": 96})


def test_every_tensor_follows_the_inputs_device():
    # torch.device("meta") as the default device: a tensor made without device= lands on meta
    # and the first op mixing it with the (CPU) inputs fails; re-normalisation, a dynamic grid
    # and the class token included
    backbone = Backbone(
        "timm:vit_base_patch16_clip_224.openai",
        pretrained=False,
        timm_args={
            "img_size": 32,
            "patch_size": 8,
            "embed_dim": 48,
            "depth": 1,
            "num_heads": 3,
            "dynamic_img_size": True,
        },
    )
    x = torch.randn(2, 3, 32, 48)
    with torch.device("meta"):
        feature_map, class_token = backbone(x, with_class_token=True)
    assert feature_map.device.type == class_token.device.type == "cpu"
    assert feature_map.shape == (2, 48, 4, 6) and torch.isfinite(feature_map).all()
