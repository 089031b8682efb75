"""timm models as backbones (``model.backbone.name: timm:<model name>``), returning the same
(B, C, H, W) feature map as every other backbone.

Any name ``timm.create_model`` takes works, with its pretrained tag
(``timm:vit_small_patch16_224.dino``, ``timm:vit_base_patch14_dinov2.lvd142m``,
``timm:convnext_tiny.fb_in22k``, ``timm:vit_base_patch16_clip_224.openai``), built without its
classifier (``num_classes=0``); ``model.backbone.timm_args`` go to ``create_model`` as they are
(``img_size``, ``drop_path_rate``, ``dynamic_img_size``, or the architecture of a small model).

- Token models (ViT, DeiT, DINO, DINOv2, CLIP, EVA): ``forward_features`` gives the tokens after
  the last norm, (B, P + N, D) with P prefix tokens (class, registers); the N patch tokens become
  the patch grid (B, D, H / p, W / p), so that GAP is the mean patch token and GSP transports the
  n = N patch tokens as it transports the 7 x 7 locations of a ResNet. The class token (prefix
  position 0) is returned beside the map when a pooling asks for it (``cls``).
- Convolutional and hierarchical models (ConvNeXt, EfficientNet, RegNet, Swin...): the last
  stage of ``forward_features`` (NHWC outputs permuted to NCHW).

Images reach every backbone normalised with ImageNet's mean and std (``dml.data.transforms``);
a model pretrained on other statistics (CLIP: its own mean and std, many ViTs: 0.5) gets its
inputs re-normalised, x' = (x sigma_in + m_in - m) / sigma, as its first operation.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from dml.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

TIMM_PRETRAINED_HELP = (
    "Could not load the pretrained weights of timm model {name!r} ({error}). The machine may be "
    "offline: download them once with internet (timm keeps them in the Hugging Face cache, "
    "$HF_HOME, by default ~/.cache/huggingface; HF_HUB_OFFLINE=1 then uses that cache), or set "
    "`model.backbone.pretrained: false` to train from a random initialisation on purpose."
)


class Renormalize(nn.Module):
    """ImageNet-normalised images -> the normalisation a pretrained model was trained with."""

    def __init__(self, mean, std):
        super().__init__()
        scale = torch.tensor(IMAGENET_STD) / torch.tensor(std)
        shift = (torch.tensor(IMAGENET_MEAN) - torch.tensor(mean)) / torch.tensor(std)
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)


def create_timm_model(
    name: str, pretrained: bool, timm_args: Optional[Dict[str, Any]] = None
) -> nn.Module:
    """``timm.create_model(name, pretrained, num_classes=0, **timm_args)`` with one-line errors:
    an unknown name or tag is a ConfigError, unavailable weights PretrainedWeightsUnavailable."""
    import timm

    from dml.errors import PretrainedWeightsUnavailable

    architecture = name.split(".")[0]
    if not timm.is_model(architecture):
        raise ConfigError(
            f"model.backbone.name: timm has no model {architecture!r} (timm "
            f'{timm.__version__}; `python -c "import timm; '
            f"print(timm.list_models('*{architecture.split('_')[0]}*'))\"` lists "
            f"the names)"
        )
    args = dict(timm_args or {})
    args.setdefault("num_classes", 0)
    try:
        if not pretrained:
            return timm.create_model(name, pretrained=False, **args)
    except (RuntimeError, TypeError) as error:  # an unknown pretrained tag, a wrong argument
        raise ConfigError(
            f"model.backbone: timm cannot build {name!r} with timm_args {timm_args or {}}: {error}"
        ) from error
    try:
        return timm.create_model(name, pretrained=True, **args)
    except TypeError as error:
        raise ConfigError(f"model.backbone.timm_args: {error}") from error
    except RuntimeError as error:
        if "pretrained tag" in str(error) or "Unknown model" in str(error):
            raise ConfigError(f"model.backbone.name: {error}") from error
        if "size mismatch" in str(error):
            raise ConfigError(
                f"model.backbone.timm_args {timm_args}: the pretrained weights of "
                f"{name!r} do not fit the architecture they ask for ("
                f"{str(error).splitlines()[0][:300]}); keep the architecture "
                f"or set pretrained: false"
            ) from error
        raise PretrainedWeightsUnavailable(
            TIMM_PRETRAINED_HELP.format(name=name, error=error)
        ) from error
    except Exception as error:  # offline (LocalEntryNotFoundError, OSError), corrupt cache...
        raise PretrainedWeightsUnavailable(
            TIMM_PRETRAINED_HELP.format(name=name, error=error)
        ) from error


class TimmTrunk(nn.Module):
    """A timm model as a feature-map network: ``forward(x, with_class_token=False)`` ->
    (B, C, h, w), or (map, class token (B, C)) when asked."""

    def __init__(self, name: str, pretrained: bool, timm_args: Optional[Dict[str, Any]] = None):
        super().__init__()
        self.name = name
        self.model = create_timm_model(name, pretrained, timm_args)
        self.out_channels = int(self.model.num_features)
        self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0) or 0)
        self.has_class_token = bool(
            getattr(self.model, "has_class_token", self.num_prefix_tokens > 0)
        )
        self.is_token_model = hasattr(self.model, "patch_embed") and hasattr(
            self.model, "num_prefix_tokens"
        )
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
        same = all(abs(a - b) < 1e-6 for a, b in zip(mean + std, IMAGENET_MEAN + IMAGENET_STD))
        self.input_norm = nn.Identity() if same or len(mean) != 3 else Renormalize(mean, std)

    def patch_grid(self, height: int, width: int) -> Tuple[int, int]:
        patch_embed = self.model.patch_embed
        if hasattr(patch_embed, "dynamic_feat_size"):
            return tuple(patch_embed.dynamic_feat_size((height, width)))
        return tuple(patch_embed.grid_size)

    def forward(self, x: torch.Tensor, with_class_token: bool = False):
        height, width = x.shape[-2:]
        patch_embed = getattr(self.model, "patch_embed", None)
        if getattr(patch_embed, "strict_img_size", False) and (height, width) != tuple(
            patch_embed.img_size
        ):
            raise ConfigError(
                f"timm model {self.name!r} takes {tuple(patch_embed.img_size)} images, got "
                f"{height} x {width}: set the data set's image size to {patch_embed.img_size[0]} "
                f"(data.init_args.crop; image_size for the synthetic data), or "
                f"model.backbone.timm_args: {{img_size: {height}}} (or dynamic_img_size: true)"
            )
        out = self.model.forward_features(self.input_norm(x))
        token = None
        if out.dim() == 3:  # tokens (B, P + N, D)
            if with_class_token:
                token = out[:, 0]
            patches = out[:, self.num_prefix_tokens :]
            h, w = (
                self.patch_grid(height, width)
                if hasattr(self.model, "patch_embed")
                else (int(round(patches.shape[1] ** 0.5)),) * 2
            )
            if h * w != patches.shape[1]:
                raise RuntimeError(
                    f"timm model {self.name!r}: {patches.shape[1]} patch tokens do "
                    f"not form the {h} x {w} grid of a {height} x {width} image"
                )
            # (B, N, D) -> (B, D, h, w), the batch size left symbolic (exports trace it)
            feature_map = patches.transpose(1, 2).unflatten(2, (h, w))
        elif out.dim() == 4:
            if getattr(self.model, "output_fmt", "NCHW") == "NHWC":
                out = out.permute(0, 3, 1, 2)
            feature_map = out
        else:
            raise RuntimeError(
                f"timm model {self.name!r}: forward_features gave a "
                f"{tuple(out.shape)} tensor, neither tokens nor a feature map"
            )
        if with_class_token:
            if token is None:
                raise ConfigError(
                    f"model.pooling.name: cls needs a class token; {self.name!r} has none"
                )
            return feature_map, token
        return feature_map

    def layer_ids(self) -> Tuple[Dict[str, int], int]:
        """(parameter name -> layer index, number of layers) by timm's own grouping (the patch
        embedding and prefix tokens 0, block i i + 1, the final norm last), for layer-wise
        learning-rate decay."""
        from timm.models import group_parameters

        if not hasattr(self.model, "group_matcher"):
            raise ConfigError(
                f"model.optimizer.layer_decay: timm model {self.name!r} defines "
                f"no layer grouping (group_matcher)"
            )
        layers = group_parameters(self.model, self.model.group_matcher(coarse=False), reverse=True)
        count = max(layers.values()) + 1
        return {
            f"model.{name}": layers.get(name, count - 1)
            for name, _ in self.model.named_parameters()
        }, count
