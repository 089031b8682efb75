"""Embeddings from a trained checkpoint: of image files, or of a data set's split.

``Embedder.from_checkpoint(path)`` rebuilds the network (backbone -> pooling -> head; weights
from the checkpoint, never downloaded) and the evaluation preprocessing of the data it was
trained on (``eval_transform``: Resize + CenterCrop + ImageNet normalisation for the image data
sets, the synthetic data's own normalisation for it). Embeddings are L2-normalised and computed
in float32, in eval mode, on the GPU when there is one.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dml.data.image_list import open_image
from dml.errors import ConfigError
from dml.inference.embeddings import EmbeddingSet
from dml.inference.generated_images import generated_meta
from dml.safe_load import load_checkpoint

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def read_checkpoint(path: str) -> Dict[str, Any]:
    """The checkpoint's dict, loaded as data (``dml.safe_load``), or a ConfigError naming the
    file."""
    checkpoint = load_checkpoint(path)
    if "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise ConfigError(f"{path}: not a dml checkpoint (no state_dict / hyper_parameters)")
    config = checkpoint.get("dml_config")
    data = config.get("data") if isinstance(config, dict) else None
    for key, value in (
        ("state_dict", checkpoint["state_dict"]),
        ("hyper_parameters", checkpoint["hyper_parameters"]),
        ("dml_config", config),
        ("dml_config.data", data),
        ("dml_config.data.init_args", data.get("init_args") if isinstance(data, dict) else None),
    ):
        if value is not None and not isinstance(value, dict):
            raise ConfigError(
                f"{path}: not a dml checkpoint ({key} is a {type(value).__name__}, "
                f"expected a mapping)"
            )
    return checkpoint


# Modules whose classes a checkpoint may name: a class path is code to import and call, so a
# checkpoint from elsewhere names the package's own classes only, unless the user trusts more.
TRUSTED_MODULES = ("dml.",)


def named_classes(checkpoint: Dict[str, Any]) -> Dict[str, str]:
    """Every class path a checkpoint's settings name: key -> class path."""
    hparams = checkpoint.get("hyper_parameters") or {}
    found = {}
    from dml.builder import terms_by_name  # the mapping, or the list of earlier checkpoints

    for name, term in terms_by_name(hparams.get("terms")).items():
        if term is not None:
            found[f"model.terms.{name}.class_path"] = str(
                term.get("class_path") if isinstance(term, dict) else term
            )
    memory, pooling = hparams.get("memory"), hparams.get("pooling")
    memory = memory if isinstance(memory, dict) else {}
    pooling = pooling if isinstance(pooling, dict) else {}
    for key, value in (
        ("model.memory.implementation", memory.get("implementation")),
        ("model.memory.miner", memory.get("miner")),
        ("model.pooling.name", pooling.get("name")),
    ):
        if isinstance(value, str) and "." in value:
            found[key] = value
    data = (checkpoint.get("dml_config") or {}).get("data") or {}
    found["data.class_path"] = str(data.get("class_path", "dml.data.SyntheticDataModule"))
    return found


def check_named_classes(checkpoint: Dict[str, Any], path: str, trusted: Sequence[str] = ()) -> None:
    """A ConfigError for a class path outside the trusted modules (``dml.`` and ``trusted``):
    loading a checkpoint never imports or calls code it names."""
    prefixes = TRUSTED_MODULES + tuple(p if p.endswith(".") else p + "." for p in trusted)
    for key, class_path in named_classes(checkpoint).items():
        if not class_path.startswith(prefixes):
            raise ConfigError(
                f"{path}: refused, not loaded: its {key} names {class_path!r}, "
                f"code outside the dml package that loading would import and "
                f"call; if you trust it, pass --trust-module "
                f"{class_path.split('.')[0]}"
            )


def data_class_and_args(checkpoint: Dict[str, Any]) -> Tuple[type, Dict[str, Any]]:
    """The data module class the checkpoint was trained with and its arguments (defaults
    filled in)."""
    from dml.data import DMLDataModule

    data = (checkpoint.get("dml_config") or {}).get("data") or {}
    class_path = str(data.get("class_path", "dml.data.SyntheticDataModule"))
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError(f"data.class_path: cannot import {class_path!r} ({error})") from None
    if not (isinstance(cls, type) and issubclass(cls, DMLDataModule)):
        raise ConfigError(f"data.class_path: {class_path!r} is not a DMLDataModule")
    args = {
        k: p.default
        for k, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    args.update({k: v for k, v in (data.get("init_args") or {}).items() if v is not None})
    return cls, args


def build_data(cls: type, args: Dict[str, Any]):
    """``cls(**args)`` with settings read from a file: an unknown setting, or generated data
    past the ranges or the rendering cap, is a ConfigError before anything is made (only the
    splits need this; embedding image files uses the settings' transform alone)."""
    unknown = sorted(set(args) - init_parameters(cls))
    if unknown:
        raise ConfigError(f"data.init_args: {cls.__name__} takes no {', '.join(unknown)}")
    check_generated_size(cls, args)
    return cls(**args)


def init_parameters(cls: type) -> set:
    """The keyword arguments ``cls(...)`` takes: its ``__init__``'s, and those of the classes
    above it while each passes ``**kwargs`` on."""
    names: set = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(vars(klass)["__init__"]).parameters.values()
        names |= {p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            break
    return names - {"self"}


def check_generated_size(cls: type, args: Dict[str, Any]) -> None:
    """Generated data (the synthetic default) is rendered in memory: arguments from a file get
    the ranges and the cap of ``dml.inference.generated_images`` before anything is made."""
    from dml.data import SyntheticDataModule
    from dml.inference.generated_images import MAX_VALUES, RANGES

    if not issubclass(cls, SyntheticDataModule):
        return
    sizes = {
        "train_classes": RANGES["num_classes"],
        "test_classes": RANGES["num_classes"],
        "images_per_class": RANGES["images_per_class"],
        "image_size": RANGES["image_size"],
    }
    for key, (low, high) in sizes.items():
        value = args.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ConfigError(
                f"data.init_args.{key}: {value!r}, expected a whole number in [{low}, {high}]"
            )
    classes = max(args["train_classes"], args["test_classes"])
    if classes * args["images_per_class"] * 3 * args["image_size"] ** 2 > MAX_VALUES:
        raise ConfigError(
            f"data.init_args: {classes} classes x {args['images_per_class']} images of "
            f"{args['image_size']} px are more than {MAX_VALUES:.0e} pixel values to render"
        )


def eval_transform_for(cls: type, args: Dict[str, Any]) -> Callable:
    """The evaluation preprocessing of images for a model trained on ``cls(**args)``."""
    from torchvision import transforms as T

    from dml.data import SyntheticDataModule
    from dml.data.image_datamodules import ImageDataModule
    from dml.data.transforms import eval_transform, to_rgb

    if issubclass(cls, ImageDataModule):
        return eval_transform(int(args["crop"]), int(args["resize"]))
    if issubclass(cls, SyntheticDataModule):  # rendered at image_size, (x - 0.5) / 0.25
        size = int(args["image_size"])
        return T.Compose(
            [
                T.Lambda(to_rgb),
                T.Resize(size),
                T.CenterCrop(size),
                T.ToTensor(),
                T.Normalize((0.5,) * 3, (0.25,) * 3),
            ]
        )
    raise ConfigError(f"no evaluation transform known for images of {cls.__name__}")


def image_files(folder: str) -> List[str]:
    """Every image file under ``folder`` (by extension), sorted."""
    if not os.path.isdir(folder):
        raise ConfigError(f"--images {folder}: no such folder")
    found = sorted(
        os.path.join(d, f)
        for d, _, files in os.walk(folder)
        for f in files
        if f.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not found:
        raise ConfigError(f"--images {folder}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return found


class ImageFiles(Dataset):
    """(image, index) of each file; an unreadable file gives None (and is listed by the
    embedder)."""

    def __init__(self, paths: Sequence[str], transform: Callable):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return self.transform(open_image(self.paths[index])), index
        except Exception:  # noqa: BLE001 - unreadable: reported by name, skipped
            return None, index


def collate_readable(batch):
    good = [(x, i) for x, i in batch if x is not None]
    bad = [i for x, i in batch if x is None]
    images = torch.stack([x for x, _ in good]) if good else None
    return images, torch.tensor([i for _, i in good], dtype=torch.long), bad


class Embedder:
    """A trained network and its evaluation preprocessing."""

    def __init__(
        self,
        module,
        transform: Callable,
        data_class: type,
        data_args: Dict[str, Any],
        checkpoint_path: str,
        device: Optional[torch.device] = None,
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.module = module.to(self.device).eval()
        self.transform = transform
        self.data_class, self.data_args = data_class, data_args
        self.checkpoint_path = checkpoint_path

    @classmethod
    def from_checkpoint(
        cls, path: str, device=None, trust_modules: Sequence[str] = ()
    ) -> "Embedder":
        """The checkpoint's network, read as data; a class path it names outside ``dml`` (a
        term, a memory, a pooling, a data module) is refused unless its module is in
        ``trust_modules``."""
        from dml.checkpoint_migration import (
            fill_added_buffers,
            fill_fresh_state,
            migrate_checkpoint,
        )
        from dml.module import DMLModule

        checkpoint = read_checkpoint(path)
        check_named_classes(checkpoint, path, trust_modules)
        hparams = dict(checkpoint["hyper_parameters"])
        backbone = dict(hparams.get("backbone") or {}, pretrained=False)  # weights: the ckpt's
        try:
            module = DMLModule(**{**hparams, "backbone": backbone})
            if migrate_checkpoint(checkpoint):  # weights of earlier layouts: today's names
                fill_fresh_state(checkpoint, module.state_dict())  # no memory then: none used
            fill_added_buffers(checkpoint, module.state_dict())
            module.load_state_dict(checkpoint["state_dict"])
        except (RuntimeError, TypeError, ValueError, KeyError, AttributeError) as error:
            raise ConfigError(
                f"{path}: its weights do not fit the model its hyper-parameters describe ({error})"
            ) from error
        data_class, data_args = data_class_and_args(checkpoint)
        return cls(
            module, eval_transform_for(data_class, data_args), data_class, data_args, path, device
        )

    @property
    def dim(self) -> int:
        return int(self.module.head.out_features)

    def meta(self, **extra) -> Dict[str, Any]:
        return {"checkpoint": os.path.abspath(self.checkpoint_path), "dim": self.dim, **extra}

    @torch.no_grad()
    def embed_tensors(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) L2-normalised float32 embeddings of preprocessed images (B, 3, H, W)."""
        with torch.autocast(self.device.type, enabled=False):
            return self.module(images.to(self.device).float()).float()

    def embed_files(
        self,
        paths: Sequence[str],
        batch_size: int = 128,
        num_workers: Optional[int] = None,
        progress: bool = True,
    ) -> EmbeddingSet:
        """Embeddings of image files; unreadable files are skipped and listed in
        ``meta["unreadable"]``."""
        from dml.data.datamodule import default_num_workers

        workers = default_num_workers() if num_workers is None else num_workers
        loader = DataLoader(
            ImageFiles(paths, self.transform),
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=collate_readable,
            pin_memory=self.device.type == "cuda",
        )
        rows: List[torch.Tensor] = []
        kept: List[int] = []
        unreadable: List[str] = []
        for images, indices, bad in progress_bar(loader, "embed", progress):
            unreadable.extend(paths[i] for i in bad)
            if images is not None:
                rows.append(self.embed_tensors(images).cpu())
                kept.extend(indices.tolist())
        if not rows:
            raise ConfigError(
                f"none of the {len(paths)} image files could be read "
                f"(first: {paths[0] if len(paths) else None})"
            )
        embeddings = torch.cat(rows).numpy()
        return EmbeddingSet(
            embeddings,
            [paths[i] for i in kept],
            np.full(len(kept), -1),
            self.meta(unreadable=unreadable),
        )

    def embed_split(
        self,
        split: str,
        root: Optional[str] = None,
        batch_size: int = 128,
        progress: bool = True,
        dataset: Optional[str] = None,
    ) -> EmbeddingSet:
        """Embeddings of a split (train, test, query or gallery) of the data set the model was
        trained on, or of ``dataset`` (a name of ``experiments/data``), read with the
        evaluation transform; labels are the data set's."""
        data_class, args = self.data_class, dict(self.data_args)
        if dataset is not None:
            named_class, named_args = named_data_set(dataset)
            if named_class is not data_class:  # another data set: its own settings
                data_class, args = named_class, named_args
        if root:
            if "root" not in inspect.signature(data_class).parameters:
                raise ConfigError(
                    f"--root {root}: {data_class.__name__} takes no data folder "
                    f"(its images are generated)"
                )
            args["root"] = root
        if "decode" in args:  # embedding reads with PIL, whatever the training decoded with
            args["decode"] = "cpu"
        data = build_data(data_class, args)
        datasets = eval_datasets_of(data)
        if split not in datasets:
            raise ConfigError(
                f"--split {split}: {data_class.__name__} has the splits {sorted(datasets)}"
            )
        split_set = datasets[split]
        loader: DataLoader = DataLoader(
            split_set,
            batch_size=batch_size,
            num_workers=data.workers(),
            collate_fn=getattr(data, "collate_fn", None),
        )
        rows, label_batches, index_batches = [], [], []
        for batch in progress_bar(loader, f"embed {split}", progress):
            images, y, idx = batch[:3]
            rows.append(self.embed_tensors(images).cpu())
            label_batches.append(y)
            index_batches.append(idx)
        order = torch.cat(index_batches).numpy()
        paths = [item_path(split_set, int(i), split) for i in order]
        labels = torch.cat(label_batches).numpy()
        original = getattr(split_set, "original_classes", None)
        if original is not None:  # the data set's own class ids
            labels = np.asarray(original)[labels]
        meta = self.meta(dataset=data_class.__name__, split=split)
        digest = content_digest(split_set)
        if digest:  # images held in memory: their names say nothing of their content
            meta["content"] = digest
            generated = generated_meta(split_set)
            if generated:  # how to make them again, for the pages that show them
                meta["generated"] = generated
        archive = getattr(getattr(split_set, "images", None), "archive", None)
        if archive:  # the paths are members of this zip file (Omniglot)
            meta["archive"] = os.path.abspath(archive)
        return EmbeddingSet(torch.cat(rows).numpy(), paths, labels, meta)

    def embed_evaluation_sets(
        self, root: Optional[str] = None, progress: bool = False
    ) -> Dict[str, EmbeddingSet]:
        """The test split as the evaluation searches it: {"test": set}, or {"query": set,
        "gallery": set} for a data set with a gallery (In-Shop)."""
        if root and "root" not in inspect.signature(self.data_class).parameters:
            raise ConfigError(
                f"--root {root}: {self.data_class.__name__} takes no data folder "
                f"(its images are generated)"
            )
        args = dict(self.data_args, **({"root": root} if root else {}))
        names = (
            ["query", "gallery"]
            if "query" in eval_datasets_of(build_data(self.data_class, args))
            else ["test"]
        )
        return {name: self.embed_split(name, root, progress=progress) for name in names}

    @property
    def recall_ks(self) -> List[int]:
        """The Ks of the data set's Recall@K (its config's, else its standard ones)."""
        ks = self.data_args.get("recall_ks")
        return list(ks or getattr(self.data_class, "standard_recall_ks", None) or (1, 2, 4, 8))


def named_data_set(name: str) -> Tuple[type, Dict[str, Any]]:
    """The data module class and arguments of ``experiments/data/<name>.yaml``."""
    import yaml

    path = os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        "experiments",
        "data",
        f"{name}.yaml",
    )
    if not os.path.isfile(path):
        raise ConfigError(f"--dataset {name}: no config {path}")
    with open(path) as f:
        data = (yaml.safe_load(f) or {}).get("data") or {}
    return data_class_and_args({"dml_config": {"data": data}})


def eval_datasets_of(data) -> Dict[str, Dataset]:
    """train (with the evaluation transform), and the evaluation splits."""
    from dml.data.image_datamodules import ImageDataModule

    sets = dict(data.eval_datasets)
    if isinstance(data, ImageDataModule):
        sets["train"] = data._dataset(data._train_list(), train=False)
    else:
        sets["train"] = data.train_dataset
    return sets


def content_digest(dataset: Dataset) -> Optional[str]:
    """sha1 of a data set's in-memory images (generated data, whose items have no file), or
    None where the items are files (their paths identify them)."""
    images = getattr(dataset, "images", None)
    if getattr(dataset, "paths", None) is not None or not isinstance(images, torch.Tensor):
        return None
    return hashlib.sha1(images.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def item_path(dataset: Dataset, index: int, split: str) -> str:
    paths = getattr(dataset, "paths", None)
    return str(paths[index]) if paths is not None else f"{split}/{index}"


def progress_bar(iterable, what: str, enabled: bool = True):
    if not enabled or not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=what, unit="batch")
