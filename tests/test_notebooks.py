"""The notebooks execute top to bottom on the small data (a fresh kernel, the repo's Python)."""

import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted(glob.glob("notebooks/*.ipynb"))
# the figures each notebook draws at least
FIGURES = {
    "gsp_pooling_weights.ipynb": 4,  # heatmaps, usage histograms, neighbours, mu sweep
    "compare_checkpoints.ipynb": 3,
}  # retrievals: only A right (A's, B's), only B right
# parameters a notebook runs with here (its parameters cell's lines replaced): the checks are
# the same, on smaller data (the compare notebook trains two models)
PARAMETERS = {
    "compare_checkpoints.ipynb": {
        "EPOCHS = 2": "EPOCHS = 1",
        "TRAIN_ARGS = []": 'TRAIN_ARGS = ["--data.init_args.train_classes", "24", '
        '"--data.init_args.test_classes", "24", "--data.init_args.images_per_class", "20"]',
    }
}


def test_there_is_a_notebook():
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS)
def test_notebook_executes(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    for line, replacement in PARAMETERS.get(os.path.basename(path), {}).items():
        (cell,) = [c for c in nb.cells if c.cell_type == "code" and line in c.source]
        cell.source = cell.source.replace(line, replacement)
    env_before = os.environ.get("WANDB_MODE")
    os.environ["WANDB_MODE"] = "disabled"
    try:
        NotebookClient(
            nb,
            timeout=600,
            kernel_name="python3",
            resources={"metadata": {"path": os.path.dirname(path)}},
        ).execute()
    finally:
        if env_before is None:
            os.environ.pop("WANDB_MODE")
        else:
            os.environ["WANDB_MODE"] = env_before
    images = [
        o
        for cell in nb.cells
        if cell.cell_type == "code"
        for o in cell.get("outputs", [])
        if "image/png" in o.get("data", {})
    ]
    assert len(images) >= FIGURES[os.path.basename(path)]


@pytest.mark.parametrize("path", NOTEBOOKS)
def test_a_notebook_finds_its_repository_from_anywhere_and_never_climbs_to_the_root(
    path, tmp_path, monkeypatch
):
    """The notebook's ``repository_root()``: from its own folder, the clone it is in; from a
    copy outside any clone (a folder with no dml/ and experiments/ above it), the clone the
    installed dml comes from (this one); never ``/``, where it used to write ``/runs``."""
    nb = nbformat.read(path, as_version=4)
    (source,) = [c.source for c in nb.cells if "def repository_root" in c.source]
    definition = source[source.index("def repository_root") : source.index("\nroot = ")]
    namespace = {"os": os}
    exec(definition, namespace)
    root = os.path.abspath(".")
    monkeypatch.chdir(os.path.dirname(os.path.abspath(path)))
    assert namespace["repository_root"]() == root
    monkeypatch.chdir(tmp_path)  # a copy of the notebook folder elsewhere
    assert namespace["repository_root"]() == root
