"""The embedding network as a file an application can run without this package:
image (B, 3, H, W), preprocessed as ``preprocessing`` says -> L2-normalised embedding (B, D).

- ``torchscript``: ``torch.jit.trace`` (load with ``torch.jit.load``);
- ``onnx``: ``torch.onnx.export`` with a dynamic batch axis (run with onnxruntime; the optional
  extra ``.[onnx]``).

The export is checked when it is written: it is run on a batch other than the one it was traced
with and compared with the PyTorch model; the largest absolute difference is printed and stored,
and an export that differs by more than ``tolerance`` is not written. ``OUT.json`` beside it
gives the preprocessing (resize, crop, mean, std), the embedding size and that difference.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict

import numpy as np
import torch
from torch import nn

from dml.errors import ConfigError
from dml.models.pooling import pool_images

FORMATS = ("torchscript", "onnx")


class EmbeddingNetwork(nn.Module):
    """backbone -> pooling -> head -> L2 normalisation, the part of ``DMLModule`` that embeds."""

    def __init__(self, module):
        super().__init__()
        self.backbone, self.pooling, self.head = module.backbone, module.pooling, module.head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _, pooled = pool_images(self.backbone, self.pooling, images, projection=self.head.linear)
        return self.head(pooled.pooled)[1]


def preprocessing(embedder) -> Dict[str, Any]:
    args = embedder.data_args
    if "crop" in args:
        return {
            "image": "RGB, float32 in [0, 1], then normalised",
            "resize_shorter_side": int(args["resize"]),
            "center_crop": int(args["crop"]),
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
        }
    size = int(args["image_size"])
    return {
        "image": "RGB, float32 in [0, 1], then normalised",
        "resize_shorter_side": size,
        "center_crop": size,
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
    }


def export(
    embedder, fmt: str, out: str, batch: int = 4, tolerance: float = 1e-4, seed: int = 0
) -> Dict[str, Any]:
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt}: expected one of {list(FORMATS)}")
    net = EmbeddingNetwork(embedder.module).cpu().eval()
    prep = preprocessing(embedder)
    size = prep["center_crop"]
    g = torch.Generator().manual_seed(seed)
    example, check = (torch.randn(batch, 3, size, size, generator=g) for _ in range(2))
    with torch.no_grad():
        expected = net(check).numpy()
    os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
    tmp = f"{out}.{os.getpid()}.partial"
    try:
        if fmt == "torchscript":
            with torch.no_grad():
                traced = torch.jit.trace(net, example, check_trace=False)
            traced.save(tmp)
            with torch.no_grad():
                got = torch.jit.load(tmp)(check).numpy()
        else:
            got = export_onnx(net, example, check, tmp)
        diff = float(np.abs(got - expected).max())
        if not diff <= tolerance:
            raise ConfigError(
                f"--format {fmt}: the export differs from the PyTorch model by "
                f"{diff:.2e} (> {tolerance:g}) on a check batch; nothing written"
            )
        info = {
            "format": fmt,
            "checkpoint": os.path.abspath(embedder.checkpoint_path),
            "input": "images (B, 3, H, W) float32",
            "output": "embeddings (B, D), L2 normalised",
            "dim": embedder.dim,
            "preprocessing": prep,
            "max_abs_diff_vs_pytorch": diff,
        }
        with open(tmp + ".json", "w") as f:
            json.dump(info, f, indent=1)
        os.replace(tmp + ".json", out + ".json")
        os.replace(tmp, out)
        return info
    finally:
        for path in (tmp, tmp + ".json"):
            if os.path.exists(path):
                os.remove(path)


def export_onnx(net: nn.Module, example: torch.Tensor, check: torch.Tensor, path: str):
    try:
        import onnxruntime
    except ImportError as error:
        raise ConfigError(
            "--format onnx needs onnx and onnxruntime: pip install -e .[onnx]"
        ) from error
    with torch.no_grad():
        torch.onnx.export(
            net,
            (example,),
            path,
            input_names=["images"],
            output_names=["embeddings"],
            dynamo=False,
            dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}},
        )
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(["embeddings"], {"images": check.numpy()})[0]
