"""Backbones that return the last convolutional feature map (B, C, H, W), not a pooled vector.

Pooling is a separate module (``dml.models.pooling``) so that GAP, GeM or GSP can be swapped in.

- ``resnet50`` / ``resnet18``: torchvision ResNets, ImageNet weights through the weights API.
- ``bn_inception``: torchvision's GoogLeNet with batch normalisation (1024 channels), the
  BN-Inception-sized network of the MLRC protocol. It is not the Caffe BN-Inception of the
  papers; its ImageNet weights are torchvision's ``GoogLeNet_Weights.IMAGENET1K_V1``.
- ``small_cnn``: a four-block CNN for the embedded synthetic data and Omniglot (CPU friendly).
- ``timm:<model name>``: any timm model (ViTs: the patch tokens on the patch grid, and the class
  token for the ``cls`` pooling; CNNs: the last stage), ``dml.models.timm_backbone``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from dml.errors import ConfigError, PretrainedWeightsUnavailable

PRETRAINED_HELP = (
    "Could not load the ImageNet weights of backbone {name!r} ({error}). The machine may be "
    "offline: download them once with internet (they are cached in $TORCH_HOME, by default "
    "~/.cache/torch/hub/checkpoints), or set `model.backbone.pretrained: false` to train from a "
    "random initialisation on purpose."
)


def _load_weights(name: str, weights_enum):
    try:
        return weights_enum.get_state_dict(progress=True, check_hash=True)
    except Exception as error:  # URLError, HTTPError, hash mismatch, corrupt cache file...
        raise PretrainedWeightsUnavailable(
            PRETRAINED_HELP.format(name=name, error=error)
        ) from error


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU blocks; the first three halve the resolution. 3 -> ``width`` * 4
    channels."""

    def __init__(self, width: int = 32, in_channels: int = 3):
        super().__init__()
        chans = [in_channels, width, width * 2, width * 4, width * 4]
        layers = []
        for i in range(4):
            layers += [
                nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False),
                nn.BatchNorm2d(chans[i + 1]),
                nn.ReLU(inplace=True),
            ]
            if i < 3:
                layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        self.out_channels = chans[-1]

    def forward(self, x):
        return self.body(x)


class TorchvisionTrunk(nn.Module):
    """The convolutional trunk of a torchvision classifier: every child before the pooling."""

    def __init__(self, network: nn.Module, stop_at: str, out_channels: int):
        super().__init__()
        children = []
        for child_name, child in network.named_children():
            if child_name == stop_at:
                break
            children.append((child_name, child))
        self.body = nn.Sequential(OrderedDict(children))
        self.out_channels = out_channels

    def forward(self, x):
        return self.body(x)


def _resnet(arch: str, pretrained: bool) -> nn.Module:
    import torchvision.models as tvm

    weights_enum = {
        "resnet18": tvm.ResNet18_Weights.IMAGENET1K_V1,
        "resnet50": tvm.ResNet50_Weights.IMAGENET1K_V1,
    }[arch]
    network = getattr(tvm, arch)(weights=None)
    if pretrained:
        network.load_state_dict(_load_weights(arch, weights_enum))
    return TorchvisionTrunk(network, stop_at="avgpool", out_channels=network.fc.in_features)


def _bn_inception(pretrained: bool) -> nn.Module:
    import torchvision.models as tvm

    network = tvm.googlenet(weights=None, aux_logits=False, init_weights=not pretrained)
    if pretrained:
        state = _load_weights("bn_inception", tvm.GoogLeNet_Weights.IMAGENET1K_V1)
        network.load_state_dict({k: v for k, v in state.items() if not k.startswith("aux")})
    trunk = TorchvisionTrunk(network, stop_at="avgpool", out_channels=1024)
    if pretrained:
        trunk.body = nn.Sequential(_GoogLeNetInputTransform(), *trunk.body)
    return trunk


class _GoogLeNetInputTransform(nn.Module):
    """torchvision's GoogLeNet weights expect inputs renormalised to the (x - 0.5) / 0.5 range."""

    def forward(self, x):
        x0 = x[:, 0:1] * (0.229 / 0.5) + (0.485 - 0.5) / 0.5
        x1 = x[:, 1:2] * (0.224 / 0.5) + (0.456 - 0.5) / 0.5
        x2 = x[:, 2:3] * (0.225 / 0.5) + (0.406 - 0.5) / 0.5
        return torch.cat([x0, x1, x2], 1)


BACKBONES: Dict[str, Callable[..., nn.Module]] = {
    "resnet50": lambda pretrained, **kw: _resnet("resnet50", pretrained),
    "resnet18": lambda pretrained, **kw: _resnet("resnet18", pretrained),
    "bn_inception": lambda pretrained, **kw: _bn_inception(pretrained),
    "small_cnn": lambda pretrained, **kw: SmallCNN(**kw),
}


def freeze_batchnorm(module: nn.Module) -> None:
    """Put every BatchNorm layer in eval mode with frozen affine parameters."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)


class Backbone(nn.Module):
    """A feature-map network with an optional frozen-BatchNorm mode that survives ``.train()``.

    ``forward(images)`` -> (B, C, H, W); ``forward(images, with_class_token=True)`` -> (map,
    class token (B, C)) for backbones that have one (timm ViTs)."""

    def __init__(
        self,
        name: str = "resnet50",
        pretrained: bool = True,
        frozen_bn: bool = False,
        width: int = 32,
        timm_args: Optional[Dict[str, Any]] = None,
    ):
        super().__init__()
        self.name = name
        if name.startswith("timm:"):
            from dml.models.timm_backbone import TimmTrunk

            self.net = TimmTrunk(name[len("timm:") :], pretrained, timm_args)
        else:
            if name not in BACKBONES:
                raise ConfigError(
                    f"model.backbone.name: unknown backbone {name!r}; expected one "
                    f"of {sorted(BACKBONES)} or timm:<timm model name>"
                )
            if timm_args:
                raise ConfigError(
                    f"model.backbone.timm_args: only for timm:<name> backbones, not {name!r}"
                )
            if name == "small_cnn" and pretrained:
                raise ConfigError(
                    "model.backbone.pretrained: small_cnn has no pretrained "
                    "weights; set pretrained: false"
                )
            kwargs = {"width": width} if name == "small_cnn" else {}
            self.net = BACKBONES[name](pretrained=pretrained, **kwargs)
        self.out_channels = self.net.out_channels
        self.frozen_bn = frozen_bn
        if frozen_bn:
            freeze_batchnorm(self.net)

    @property
    def has_class_token(self) -> bool:
        return bool(getattr(self.net, "has_class_token", False))

    @property
    def convolutional(self) -> bool:
        """Whether the network is convolutional end to end (channels-last helps it); a ViT's
        one patch convolution does not make it so."""
        if getattr(self.net, "is_token_model", False):
            return False
        return any(isinstance(m, nn.Conv2d) for m in self.net.modules())

    def layer_ids(self) -> Tuple[Dict[str, int], int]:
        """(parameter name within this module -> layer index, number of layers)."""
        if not hasattr(self.net, "layer_ids"):
            raise ConfigError(
                f"model.optimizer.layer_decay: applies to timm backbones, not {self.name!r}"
            )
        ids, count = self.net.layer_ids()
        return {f"net.{name}": layer for name, layer in ids.items()}, count

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen_bn:
            freeze_batchnorm(self.net)
        return self

    def forward(self, images: torch.Tensor, with_class_token: bool = False):
        if with_class_token:
            if not self.has_class_token:
                raise ConfigError(
                    f"model.pooling.name: cls needs a backbone with a class token "
                    f"(a timm ViT); {self.name!r} has none"
                )
            return self.net(images, with_class_token=True)
        return self.net(images)
