"""Dashboard figures and W&B offline logging from a tiny CLI run; the figure builders."""

import glob
import os

import numpy as np
import pytest
import torch
import wandb
from PIL import Image

from dml.cli import git_state
from dml.cli import main as cli_main
from dml.compose import config_args
from dml.visualization import embedding_projection, retrieval_grid, save_png


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    old = os.environ.get("WANDB_MODE")
    os.environ["WANDB_MODE"] = "offline"
    # W&B keeps the settings of its first run in a process (the suite's: disabled) until torn
    # down; a run of another mode in the same process needs a fresh W&B
    wandb.teardown()
    try:
        cli_main(
            [
                "fit",
                *config_args("synthetic", "gsp_contrastive"),
                "--data.init_args.train_classes",
                "12",
                "--data.init_args.test_classes",
                "8",
                "--data.init_args.images_per_class",
                "10",
                "--model.backbone.width",
                "8",
                "--trainer.max_epochs",
                "1",
                "--trainer.default_root_dir",
                str(root),
                "--trainer.enable_progress_bar",
                "false",
                "--trainer.log_every_n_steps",
                "1",
                "--dashboard.every_n_epochs",
                "1",
                "--dashboard.num_queries",
                "4",
                "--dashboard.top_k",
                "3",
            ]
        )
    finally:
        wandb.teardown()
        if old is None:
            os.environ.pop("WANDB_MODE")
        else:
            os.environ["WANDB_MODE"] = old
    (run,) = [p.parent for p in root.glob("*/run.json")]  # the run's own folder
    return run


def png_size(path):
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.format, image.size


def test_figures_are_saved_as_pngs_of_the_expected_size(tiny_run):
    figures = sorted(glob.glob(str(tiny_run / "figures" / "*.png")))
    names = {os.path.basename(p) for p in figures}
    assert names == {
        "retrieval_epoch000.png",
        "pooling_epoch000.png",
        "projection_epoch000.png",
        "worst_epoch000.png",
        "training_epoch000.png",
    }
    by_name = {os.path.basename(p).split("_")[0]: p for p in figures}
    assert png_size(by_name["retrieval"]) == ("PNG", (160 * 4, 160 * 4))  # 4 queries, top-3
    assert png_size(by_name["projection"]) == ("PNG", (700, 550))
    assert png_size(by_name["worst"]) == ("PNG", (160 * 4, 160 * 4))  # 4 worst queries, top-3
    assert png_size(by_name["training"]) == ("PNG", (500, 360))  # gradient norms (no memory)
    fmt, (w, h) = png_size(by_name["pooling"])
    assert fmt == "PNG" and (w, h) == (180 * 4 + 80, 380)  # 4 images x 2 rows, colour bar


def test_wandb_offline_run_holds_config_git_metrics_and_figures(tiny_run):
    runs = glob.glob(str(tiny_run / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    media = glob.glob(os.path.join(runs[0], "files", "media", "images", "figures", "*.png"))
    assert {os.path.basename(m).split("_")[0] for m in media} == {
        "retrieval",
        "pooling",
        "projection",
        "worst",
        "training",
    }
    # The offline run's log (what `wandb sync` uploads) holds the records as JSON values.
    log = open(glob.glob(os.path.join(runs[0], "*.wandb"))[0], "rb").read()
    commit = git_state()["commit"].encode()
    assert b'"commit":"' + commit in log
    assert b'"pooling":{"name":"gsp"' in log  # the whole CLI config
    for key in (
        b"val/MAP@R",
        b"val/R@1",
        b"val/NMI",
        b"train/loss_metric",
        b"train/loss_zero_shot",
        b"lr-AdamW",
        b"figures/retrieval",
        b"figures/pooling",
        b"figures/projection",
        b"figures/worst",
        b"tables/worst_classes",
    ):
        assert key in log, key


def test_the_worst_classes_file_holds_the_lowest_map_at_r_of_the_last_validation(tiny_run):
    import csv

    with open(tiny_run / "figures" / "worst_classes_epoch000.csv") as f:
        rows = list(csv.DictReader(f))
    values = [float(r["MAP@R"]) for r in rows]
    assert 1 <= len(rows) <= 8 and values == sorted(values)  # 8 test classes, lowest first
    assert {"class", "queries", "R@1", "MAP@R", "R-Precision"} <= set(rows[0])


def test_retrieval_grid_frames_right_and_wrong_neighbours(tmp_path):
    q = [torch.zeros(3, 8, 8)]
    fig = retrieval_grid(q, [[torch.ones(3, 8, 8), torch.ones(3, 8, 8)]], [[True, False]])
    colours = [ax.spines["top"].get_edgecolor() for ax in fig.axes[1:]]
    assert colours[0][:3] == pytest.approx((0x1A / 255, 0x96 / 255, 0x41 / 255))
    assert colours[1][:3] == pytest.approx((0xD7 / 255, 0x19 / 255, 0x1C / 255))
    save_png(fig, str(tmp_path / "g.png"))
    assert png_size(tmp_path / "g.png")[0] == "PNG"


def test_projection_subsamples_and_is_seeded(tmp_path):
    x, y = torch.randn(300, 8, generator=torch.Generator().manual_seed(0)), torch.arange(300) % 5
    a = embedding_projection(x, y, max_points=100, seed=1)
    b = embedding_projection(x, y, max_points=100, seed=1)
    pa = np.concatenate([c.get_offsets() for c in a.axes[0].collections])
    pb = np.concatenate([c.get_offsets() for c in b.axes[0].collections])
    assert len(pa) == 100 and (pa == pb).all()


def test_projection_colours_the_most_frequent_classes_with_a_legend_and_the_rest_grey():
    g = torch.Generator().manual_seed(0)
    y = torch.cat([torch.arange(30).repeat_interleave(3), torch.full((40,), 7)])  # 7 most often
    fig = embedding_projection(torch.randn(len(y), 8, generator=g), y, colored=10)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels[0] == "20 other classes" and len(labels) == 11 and labels[1] == "class 7"
    sizes = [len(c.get_offsets()) for c in fig.axes[0].collections]
    assert sizes[0] == 20 * 3 and sizes[1] == 43 and sum(sizes) == len(y)


def test_pooling_heatmap_has_a_colour_bar_in_units_of_the_mean_weight():
    from dml.visualization import pooling_heatmaps

    weights = torch.tensor([[1.0, 1.0, 1.0, 5.0], [2.0, 2.0, 2.0, 2.0]])
    fig = pooling_heatmaps(torch.rand(2, 3, 8, 8), weights, (2, 2))
    assert len(fig.axes) == 5  # 2 x 2 panels and the colour bar
    overlay = fig.axes[2].images[1].get_array()
    assert float(overlay.max()) == pytest.approx(2.5, rel=0.05)  # 5 / mean 2
    assert np.allclose(fig.axes[3].images[1].get_array(), 1.0)  # uniform weights: GAP
