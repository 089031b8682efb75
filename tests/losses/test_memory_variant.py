"""A memory variant goes in as 3 files and no package edit (docs/extending.md):
``examples/memory_variant/hardest_negatives.py`` (the class), its config layer
``xbm_hardest_negatives.yaml``, and this test. It selects the pairs a brute force selects, trains
through the command line on top of XBN with GSP pooling, and its memory survives a resume."""

import os
import sys

import pytest
import torch
from run_helpers import fit_recording_losses

from dml.compose import config_args

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(REPO, "examples", "memory_variant")
sys.path.insert(0, EXAMPLE)

from hardest_negatives import HardestNegativesMemory  # noqa: E402


def test_the_pairs_are_every_positive_and_the_hardest_tenth_of_the_negatives():
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1)
    ref = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=1)
    labels, ref_labels = torch.tensor([0, 0, 1, 1, 2, 9]), torch.randint(0, 3, (50,), generator=g)
    memory = HardestNegativesMemory(8, size=64, fraction=0.1)
    a1, p, a2, n = memory.select_pairs(z, labels, ref, ref_labels, None)
    for i in range(6):  # brute force, per anchor, in plain Python
        positives = {j for j in range(50) if ref_labels[j] == labels[i]}
        negatives = [j for j in range(50) if ref_labels[j] != labels[i]]
        keep = max(1, int(0.1 * len(negatives)))
        hardest = sorted(negatives, key=lambda j: (-float(z[i] @ ref[j]), j))[:keep]
        assert {int(j) for a, j in zip(a1, p) if a == i} == positives
        assert {int(j) for a, j in zip(a2, n) if a == i} == set(hardest)
    assert len(a1) == len(p) and len(a2) == len(n)


def run(root, epochs, ckpt=None):
    return fit_recording_losses(
        [
            *config_args("synthetic", "xbn"),
            "--config",
            os.path.join(EXAMPLE, "xbm_hardest_negatives.yaml"),
            "--model.pooling.name",
            "gsp",
            "--model.pooling.params",
            '{"num_prototypes": 4}',
            "--data.init_args.batches_per_epoch",
            "4",
            "--model.memory.start_iteration",
            "2",
            "--trainer.logger",
            "false",
        ],
        root,
        epochs,
        ckpt,
    )


def test_it_trains_with_gsp_and_xbn_and_resumes_to_the_same_losses(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["python -m dml"])
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.syspath_prepend(EXAMPLE)
    straight = run(tmp_path / "a", 2)
    first = run(tmp_path / "b", 1)
    (last,) = list((tmp_path / "b" / "runs").glob("*/checkpoints/last.ckpt"))
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert int(state["state_dict"]["objective.memory.buffer.count"]) > 0  # rows are saved
    resumed = run(tmp_path / "b", 2, ckpt=str(last))
    assert len(straight) == 8 and first == straight[:4]
    assert resumed == pytest.approx(straight[4:], rel=1e-5)


def test_a_class_that_is_not_a_memory_term_is_refused():
    from dml.errors import ConfigError
    from dml.module import BackboneConfig, DMLModule, LossConfig, MemoryConfig

    for class_path, says in (
        ("torch.nn.Linear", "is not a subclass"),
        ("nope.Memory", "cannot import"),
    ):
        with pytest.raises(ConfigError, match=f"model.memory.implementation: .*{says}"):
            DMLModule(
                backbone=BackboneConfig("small_cnn", pretrained=False, width=8),
                embedding_dim=16,
                num_classes=4,
                loss=LossConfig("contrastive"),
                memory=MemoryConfig(enabled=True, implementation=class_path),
            )
