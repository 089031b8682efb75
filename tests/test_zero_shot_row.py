"""The zero-shot reference row, ``python -m dml test <configs> --zero-shot``: the backbone as
configured (pretrained or not), no training, no head; its embeddings are the pooled features,
L2-normalised, and its printed metrics are ``dml.metrics.retrieval_metrics`` of them on the test
split. Offline throughout: the small CNN with random weights, and a tiny timm ViT whose
"pretrained" weights are a file this test writes (timm's ``pretrained_cfg_overlay``, the
repository's local-weights option)."""

import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml
from pytorch_lightning import seed_everything

from dml.builder import build_parts
from dml.cli import zero_shot_description
from dml.compose import config_args, merge_config_args
from dml.config import (
    BackboneConfig,
    IBCConfig,
    LossConfig,
    MemoryConfig,
    PoolingConfig,
    ZeroShotConfig,
)
from dml.data import SyntheticDataModule
from dml.errors import ConfigError
from dml.metrics import retrieval_metrics
from dml.models import Backbone, PooledFeatures
from dml.module import DMLModule

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTHETIC = config_args("synthetic", "baseline")  # what `make zero-shot` composes
DATA = {"train_classes": 12, "test_classes": 8, "images_per_class": 8, "image_size": 32}
SMALL = [a for key, value in DATA.items() for a in (f"--data.init_args.{key}", str(value))] + [
    "--model.backbone.width",
    "8",
    "--model.evaluation.nmi",
    "false",
    "--dashboard.enabled",
    "false",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.logger",
    "false",
]
VIT = "vit_small_patch16_224.dino"
TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}


def dml(*args, timeout=120):
    """``python -m dml`` in a fresh process (tests/ importable for run_helpers), offline."""
    env = dict(
        os.environ,
        WANDB_MODE="disabled",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join([os.path.join(REPO, "tests"), REPO]),
    )
    return subprocess.run(
        [sys.executable, "-m", "dml", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def zero_shot_test(tmp_path, *args):
    """``test --zero-shot`` on the small synthetic set; (stdout, the scored test embeddings)."""
    path = tmp_path / "embeddings.pt"
    out = dml(
        "test",
        *SYNTHETIC,
        *SMALL,
        *args,
        "--zero-shot",
        "--trainer.default_root_dir",
        str(tmp_path / "runs"),
        "--trainer.callbacks+=run_helpers.RecordTestEmbeddings",
        f"--trainer.callbacks.path={path}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout, torch.load(path, weights_only=True)


def synthetic_test_split():
    """The test split's images and labels, in data-set order (the synthetic data is seeded)."""
    dm = SyntheticDataModule(**DATA)
    dm.setup("test")
    test = dm.eval_datasets["test"]
    return test.images, test.labels


def printed_line(stdout):
    (line,) = [x for x in stdout.splitlines() if "| R@1" in x]
    return line


def printed_metrics(line):
    """{name: percent} of a printed metrics line."""
    return {k: float(v) for k, v in re.findall(r"(R@\d+|MAP@R|R-Precision|NMI) +([\d.]+)", line)}


def check_metrics_of(line, embeddings, labels):
    expected = retrieval_metrics(embeddings, labels, ks=(1, 2, 4, 8))
    printed = printed_metrics(line)
    assert set(printed) == set(expected)
    assert printed == pytest.approx({k: 100 * v for k, v in expected.items()}, abs=0.051)


def test_a_random_init_backbone_is_its_pooled_features_and_says_so(tmp_path):
    stdout, recorded = zero_shot_test(tmp_path)
    # an evaluation, not a training run: its folder is named and announced as one
    (folder,) = (tmp_path / "runs").iterdir()
    assert "-test-" in folder.name and not (folder / "checkpoints").exists()
    assert stdout.splitlines()[0] == (
        f"evaluation folder (test, no training): {tmp_path / 'runs' / folder.name} (seed 0)"
    )
    line = printed_line(stdout)
    assert line.startswith(
        "test: test split | zero-shot: small_cnn, pretrained=False "
        "(random init), no training, 32-d gap features | R@1 "
    ), line
    # by hand: the backbone the CLI builds (seed_everything: 0 of trainer.yaml, then the
    # backbone first), its feature map averaged, L2-normalised; no head anywhere
    seed_everything(0)
    backbone = Backbone("small_cnn", pretrained=False, width=8).eval()
    images, labels = synthetic_test_split()
    with torch.no_grad():
        features = backbone(images).mean(dim=(2, 3))
    by_hand = F.normalize(features, dim=-1)
    assert recorded["embeddings"].shape == (len(images), backbone.out_channels) == (64, 32)
    assert torch.equal(recorded["labels"], labels)
    assert torch.allclose(recorded["embeddings"], by_hand, atol=1e-5)
    check_metrics_of(line, by_hand, labels)


def test_pretrained_weights_from_a_local_file_are_what_is_measured(tmp_path):
    # the "pretrained" weights: a seeded random tiny ViT, saved where timm's
    # pretrained_cfg_overlay (model.backbone.timm_args) reads them; no download
    timm = pytest.importorskip("timm")
    torch.manual_seed(1)
    source = timm.create_model(VIT, pretrained=False, num_classes=0, **TINY_VIT).eval()
    weights = tmp_path / "vit.pth"
    torch.save(source.state_dict(), weights)
    layer = tmp_path / "backbone.yaml"
    layer.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "backbone": {
                        "name": f"timm:{VIT}",
                        "pretrained": True,
                        "timm_args": {**TINY_VIT, "pretrained_cfg_overlay": {"file": str(weights)}},
                    }
                }
            }
        )
    )
    stdout, recorded = zero_shot_test(tmp_path, "--config", str(layer))
    line = printed_line(stdout)
    assert line.startswith(
        f"test: test split | zero-shot: timm:{VIT}, pretrained=True, no "
        f"training, 48-d gap features | R@1 "
    ), line
    # by hand, from the file: timm's tokens after the last norm, the patch tokens averaged
    model = timm.create_model(VIT, pretrained=False, num_classes=0, **TINY_VIT).eval()
    model.load_state_dict(torch.load(weights, weights_only=True))
    images, labels = synthetic_test_split()
    with torch.no_grad():
        tokens = model.forward_features(images)
    by_hand = F.normalize(tokens[:, model.num_prefix_tokens :].mean(dim=1), dim=-1)
    assert recorded["embeddings"].shape == (len(images), model.num_features) == (64, 48)
    assert torch.allclose(recorded["embeddings"], by_hand, atol=1e-5)
    check_metrics_of(line, by_hand, labels)


def test_zero_shot_with_a_checkpoint_is_refused_in_one_line(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"not read")
    out = dml(
        "test",
        *SYNTHETIC,
        *SMALL,
        "--zero-shot",
        "--ckpt_path",
        str(ckpt),
        "--trainer.default_root_dir",
        str(tmp_path / "runs"),
    )
    assert out.returncode == 2
    errors = [x for x in out.stderr.splitlines() if x.startswith("error:")]
    assert errors == [
        f"error: --zero-shot evaluates the backbone with no training; it takes "
        f"no --ckpt_path ({ckpt}): drop one of the two"
    ]
    assert "Traceback" not in out.stderr and "| R@1" not in out.stdout
    assert not os.path.isdir(tmp_path / "runs") or not os.listdir(tmp_path / "runs")


def test_the_flag_stays_on_the_command_line_wherever_it_is(tmp_path):
    # before the config files it must not stop their key-by-key merge
    argv, merged = merge_config_args(["test", "--zero-shot", *SYNTHETIC], str(tmp_path))
    assert merged is not None and argv == ["test", "--zero-shot", "--config", merged]


def parts(backbone: BackboneConfig, pooling: str = "gap", params=None):
    """The model's parts with no head (embedding_dim None)."""
    return build_parts(
        backbone,
        PoolingConfig(pooling, params or {}),
        None,
        LossConfig(),
        ZeroShotConfig(),
        IBCConfig(),
        MemoryConfig(),
        10,
    )


@pytest.mark.parametrize("name,width", [("resnet50", 2048), ("timm:vit_small_patch16_224", 384)])
def test_no_head_is_the_backbones_width(name, width):
    built = parts(BackboneConfig(name, pretrained=False))
    assert isinstance(built.head, PooledFeatures) and built.head.out_features == width
    assert built.head.linear is None and not list(built.head.parameters())
    f = torch.randn(3, width)
    raw, z = built.head(f)
    assert torch.equal(raw, f) and torch.allclose(z, F.normalize(f, dim=-1))


def test_without_a_head_the_module_builds_trains_and_describes_itself():
    torch.manual_seed(0)
    module = DMLModule(
        backbone=BackboneConfig("small_cnn", pretrained=False, width=8),
        pooling=PoolingConfig("gem"),
        embedding_dim=None,
        num_classes=4,
    )
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(4).repeat_interleave(2)
    embedded = module.embed(images)
    assert embedded["embeddings"].shape == (8, 32)
    assert torch.allclose(embedded["embeddings"], F.normalize(embedded["raw_embeddings"], dim=-1))
    loss = sum(module.objective(embedded, labels).values())  # the objective runs (for fit)
    loss.backward()
    assert torch.isfinite(loss) and module.backbone.net.body[0].weight.grad is not None
    assert module.hparams["embedding_dim"] is None
    # the pooling stays as configured: GeM, p = 3
    assert zero_shot_description(module) == (
        "zero-shot: small_cnn, pretrained=False (random init), no training, 32-d gem features"
    )


def test_a_pooling_that_needs_the_head_is_refused_naming_the_key():
    with pytest.raises(
        ConfigError,
        match=r"model.pooling.name: gsp computes its costs through "
        r"the embedding head's linear map",
    ):
        parts(
            BackboneConfig("small_cnn", pretrained=False, width=8),
            "gsp",
            params={"num_prototypes": 4},
        )


def test_the_test_line_is_followed_by_reranked_lines_and_a_per_class_file(tmp_path):
    """``model.evaluation.rerank``: each re-ranking's metrics on their own line, beside the
    plain ones (which do not change), equal to dml.reranking + results_from_distances of the
    scored embeddings; per_class_test.csv in the run folder holds each class's mean of the
    per-query values, written out here."""
    import csv

    import numpy as np

    from dml.metrics.retrieval import results_from_distances
    from dml.reranking import rerank

    stdout, recorded = zero_shot_test(
        tmp_path,
        "--model.evaluation.rerank",
        "[k_reciprocal, alpha_qe]",
        "--model.evaluation.rerank_params",
        "{k_reciprocal: {k1: 6, k2: 3}}",
    )
    emb, labels = recorded["embeddings"], recorded["labels"]
    lines = [x for x in stdout.splitlines() if "| R@1" in x]
    assert len(lines) == 3 and "re-ranked" not in lines[0]
    check_metrics_of(lines[0], emb, labels)
    for line, name, params in (
        (lines[1], "k_reciprocal", {"k1": 6, "k2": 3}),
        (lines[2], "alpha_qe", {}),
    ):
        assert f"| re-ranked: {name} (" in line
        expected = results_from_distances(rerank(name, emb, **params), labels)
        assert printed_metrics(line) == pytest.approx(
            {k: 100 * v for k, v in expected.metrics([1, 2, 4, 8]).items()}, abs=0.051
        )
    assert "k1 6, k2 3, lam 0.3" in lines[1]
    (path,) = [x.split("per class: ")[1] for x in stdout.splitlines() if "per class: " in x]
    with open(path) as f:
        rows = list(csv.DictReader(f))
    x = emb.numpy().astype(np.float64)
    y = labels.numpy()
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    first_hit = y[np.argsort(d, 1, kind="stable")[:, 0]] == y
    assert [int(r["class"]) for r in rows] == sorted(set(y.tolist()))
    for r in rows:
        assert int(r["queries"]) == int((y == int(r["class"])).sum())
        assert float(r["R@1"]) == pytest.approx(first_hit[y == int(r["class"])].mean(), abs=1e-6)
