"""The training diagnostics of the objective (``Objective.diagnostics``): the memory term's
stored positives, negatives and active negatives against counts written out here, each term's
gradient norm against finite differences, nothing changed in training, and the quantities in a
whole run's metrics.csv through the CLI."""

import csv
import glob
import os

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import distances, losses

from dml.losses import CrossBatchMemoryLoss, XBMContrastiveLoss
from dml.losses.memory import active_negatives
from dml.objective import Objective


def filled_memory(loss=None, dim=6, stored=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    memory = CrossBatchMemoryLoss(dim, size=40, start_iteration=0, loss=loss)
    rows = F.normalize(torch.randn(stored, dim, generator=g), dim=1)
    memory.enqueue(rows, torch.randint(0, 5, (stored,), generator=g))
    memory.iteration.fill_(5)
    return memory, g


@pytest.mark.parametrize(
    "name", ["xbm", "pml_contrastive_lp", "pml_contrastive_cosine", "multi_similarity"]
)
def test_stored_positives_negatives_and_active_share_equal_counts_by_hand(name):
    loss, active_if = {
        "xbm": (XBMContrastiveLoss(margin=0.3), lambda s, d: s > 0.3),
        "pml_contrastive_lp": (losses.ContrastiveLoss(neg_margin=1.2), lambda s, d: d < 1.2),
        "pml_contrastive_cosine": (
            losses.ContrastiveLoss(
                pos_margin=1, neg_margin=0.2, distance=distances.CosineSimilarity()
            ),
            lambda s, d: s > 0.2,
        ),
        "multi_similarity": (losses.MultiSimilarityLoss(base=0.1), lambda s, d: s > 0.1),
    }[name]
    memory, g = filled_memory(loss)
    batch = F.normalize(torch.randn(8, 6, generator=g), dim=1)
    labels = torch.randint(0, 5, (8,), generator=g)
    out = memory.diagnostics(batch, labels)
    stored, stored_labels = memory.stored, memory.stored_labels
    positives = negatives = active = 0
    for i in range(8):
        for j in range(len(stored)):
            if labels[i] == stored_labels[j]:
                positives += 1
                continue
            negatives += 1
            s = float(batch[i] @ stored[j])
            d = float((batch[i] - stored[j]).norm())
            active += bool(active_if(s, d))
    assert float(out["memory/stored"]) == 30
    assert float(out["memory/positives_per_anchor"]) == pytest.approx(positives / 8)
    assert float(out["memory/negatives_per_anchor"]) == pytest.approx(negatives / 8)
    assert 0 < active < negatives  # the margins above make the share informative
    assert float(out["memory/active_negatives"]) == pytest.approx(active / negatives)


def test_no_margin_no_active_share_and_nothing_before_the_memory_starts():
    memory, g = filled_memory(losses.TripletMarginLoss())
    batch, labels = F.normalize(torch.randn(4, 6, generator=g), dim=1), torch.zeros(4).long()
    assert "memory/active_negatives" not in memory.diagnostics(batch, labels)
    assert active_negatives(None, batch, memory.stored) is None
    memory.start_iteration = 10  # iteration 5: still warming up
    assert memory.diagnostics(batch, labels) == {}


def objective_and_batch(weight=1.0):
    memory, g = filled_memory()
    memory.weight = weight
    objective = Objective(metric_loss=XBMContrastiveLoss(margin=0.3), memory=memory)
    h = torch.randn(8, 6, generator=g, dtype=torch.float64).float().requires_grad_(True)
    labels = torch.randint(0, 5, (8,), generator=g)
    return objective, h, labels


def embedded_of(h):
    return {"raw_embeddings": h, "embeddings": F.normalize(h, dim=1), "pooling": None}


def test_gradient_norms_equal_finite_differences_and_scale_with_the_weight():
    objective, h, labels = objective_and_batch()
    embedded = embedded_of(h)
    values = objective(embedded, labels)
    # the rows the memory term compared with: the batch is enqueued before it (XBM's order)
    memory_rows = objective.memory.stored.clone()
    diag = objective.diagnostics(embedded, labels, values)
    assert set(diag) >= {"grad_norm/metric", "grad_norm/memory"}
    for name in ("metric", "memory"):
        (grad,) = torch.autograd.grad(values[name], h, retain_graph=True)
        direction = (grad / grad.norm()).double()

        def value_at(x):  # the same term, float64, the memory rows as they were
            z = F.normalize(x, dim=1)
            ref = z if name == "metric" else memory_rows.double()
            ref_labels = labels if name == "metric" else objective.memory.stored_labels
            return XBMContrastiveLoss(margin=0.3)(z, labels, None, ref, ref_labels)

        eps, x = 1e-6, h.detach().double()
        slope = (value_at(x + eps * direction) - value_at(x - eps * direction)) / (2 * eps)
        assert float(diag[f"grad_norm/{name}"]) == pytest.approx(float(slope), rel=1e-3)
    heavy, h2, labels2 = objective_and_batch(weight=3.0)
    embedded2 = embedded_of(h2)
    diag3 = heavy.diagnostics(embedded2, labels2, heavy(embedded2, labels2))
    assert float(diag3["grad_norm/memory"]) == pytest.approx(
        3 * float(diag["grad_norm/memory"]), rel=1e-5
    )


def test_diagnostics_change_neither_the_gradient_nor_the_memory():
    grads, rows = [], []
    for with_diagnostics in (False, True):
        objective, h, labels = objective_and_batch()
        embedded = embedded_of(h)
        values = objective(embedded, labels)
        if with_diagnostics:
            objective.diagnostics(embedded, labels, values)
        sum(values.values()).backward()
        grads.append(h.grad.clone())
        rows.append(objective.memory.stored.clone())
    assert torch.equal(grads[0], grads[1]) and torch.equal(rows[0], rows[1])


def xbm_run(folder, *extra):
    """``python -m dml fit`` (in this process) of the synthetic XBM method, one epoch of 6
    steps, the memory from step 3, into ``folder``."""
    from dml.cli import main
    from dml.compose import config_args

    main(
        [
            "fit",
            *config_args("synthetic", "xbm"),
            "--trainer.max_epochs",
            "1",
            "--data.init_args.train_classes",
            "12",
            "--data.init_args.test_classes",
            "8",
            "--data.init_args.images_per_class",
            "8",
            "--data.init_args.batches_per_epoch",
            "6",
            "--model.backbone.width",
            "8",
            "--model.evaluation.nmi",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            "--model.memory.start_iteration",
            "2",
            "--model.memory.size",
            "64",
            "--trainer.default_root_dir",
            str(folder),
            *extra,
        ]
    )


def test_a_memory_run_logs_the_diagnostics_through_the_cli(tmp_path):
    xbm_run(tmp_path, "--dashboard.enabled", "false", "--trainer.log_every_n_steps", "1")
    (path,) = glob.glob(os.path.join(str(tmp_path), "**", "metrics.csv"), recursive=True)
    with open(path) as f:
        rows = list(csv.DictReader(f))
    logged = [r for r in rows if r.get("train/memory/active_negatives")]
    assert len(logged) >= 3  # steps 3..6
    for r in logged:
        share = float(r["train/memory/active_negatives"])
        assert 0 <= share <= 1
        assert float(r["train/memory/positives_per_anchor"]) > 0
        assert float(r["train/grad_norm/memory"]) > 0 and float(r["train/grad_norm/metric"]) > 0
    before = [
        r for r in rows if r.get("train/grad_norm/metric") and not r.get("train/memory/stored")
    ]
    assert before  # the warm-up steps log the metric term's norm alone


def test_the_dashboard_draws_the_diagnostics_of_a_memory_run(tmp_path):
    """Trained in this process with the dashboard on: its history holds every logged step's
    diagnostics (the same values metrics.csv got) and the training figure is written."""
    xbm_run(tmp_path, "--dashboard.every_n_epochs", "1", "--trainer.log_every_n_steps", "2")
    (figure,) = glob.glob(
        os.path.join(str(tmp_path), "**", "training_epoch000.png"), recursive=True
    )
    assert os.path.getsize(figure) > 10_000
    (path,) = glob.glob(os.path.join(str(tmp_path), "**", "metrics.csv"), recursive=True)
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/memory/active_negatives")]
    ckpt = torch.load(
        glob.glob(os.path.join(str(tmp_path), "**", "last.ckpt"), recursive=True)[0],
        weights_only=True,
    )
    (state,) = [v for k, v in ckpt["callbacks"].items() if "DashboardFigures" in k]
    history = state["history"]["memory/active_negatives"]
    assert [round(v, 5) for _, v in history] == [
        round(float(r["train/memory/active_negatives"]), 5) for r in rows
    ]
    assert len(history) >= 2  # steps 3..6, logged every 2
