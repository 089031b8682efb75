"""Images of generated data sets (the synthetic default) for the pages that show search
results. Their items have no file: an embedding set names them ``<split>/<index>``.
``Embedder.embed_split`` records how to make them again (``meta["generated"]``: the
``SyntheticShapes`` arguments) beside the sha1 of their pixels (``meta["content"]``);
``resolver(meta)`` makes them again and answers only when the sha1 matches, so a page never
shows other images under these names. The arguments come from a file: each must be an int in
its range and the pixels to make are capped, or nothing is made (the page shows names).
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Dict, Optional

# SyntheticShapes' arguments and their allowed ranges (inclusive)
RANGES = {
    "num_classes": (1, 100_000),
    "images_per_class": (1, 100_000),
    "image_size": (8, 512),
    "seed": (0, 2**31 - 1),
}
# pixel values made at most: the renderer's peak memory is about 27 bytes per value (5e7 values,
# e.g. 65 images of 512 px or 40,000 of 20 px: 1.4 GB and 3 s on 2 CPU cores; the default
# synthetic split is 5.9e6); beyond it the page shows names
MAX_VALUES = 5 * 10**7

Resolver = Callable[[str], Optional[Any]]


def generated_meta(dataset) -> Optional[Dict[str, Any]]:
    """What ``resolver`` needs to make ``dataset``'s images again: a ``SyntheticShapes``'
    split and arguments; None for any other data set."""
    from dml.data.synthetic import SyntheticShapes

    if not isinstance(dataset, SyntheticShapes) or not hasattr(dataset, "arguments"):
        return None
    return {"dataset": "SyntheticShapes", **dataset.arguments}


def resolver(meta: Dict[str, Any]) -> Optional[Resolver]:
    """A function from an item's path (``<split>/<index>``) to its image (PIL, RGB), or None
    when ``meta`` does not describe generated images that match its ``content`` sha1."""
    spec, digest = meta.get("generated"), meta.get("content")
    if not isinstance(spec, dict) or spec.get("dataset") != "SyntheticShapes" or not digest:
        return None
    split = spec.get("split")
    if split not in ("train", "test"):
        return None
    args: Dict[str, int] = {}
    for key, (low, high) in RANGES.items():
        value = spec.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            return None
        args[key] = value
    n = args["num_classes"] * args["images_per_class"]
    if n * 3 * args["image_size"] ** 2 > MAX_VALUES:
        return None
    from dml.data.synthetic import SyntheticShapes

    data = SyntheticShapes(split, **args)
    pixels = data.images.detach().cpu().contiguous().numpy().tobytes()
    if hashlib.sha1(pixels).hexdigest() != digest:
        return None

    def image(path: str):
        head, _, tail = str(path).partition("/")
        if head != split or not (tail.isascii() and tail.isdigit()) or int(tail) >= len(data):
            return None
        return to_pil(data.images[int(tail)])

    return image


def to_pil(image):
    """A (3, H, W) image normalised as SyntheticShapes stores it ((x - 0.5) / 0.25) as PIL."""
    from PIL import Image

    pixels = (image * 0.25 + 0.5).clamp(0, 1).mul(255).round().byte()
    return Image.fromarray(pixels.permute(1, 2, 0).numpy(), "RGB")
