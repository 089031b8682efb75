"""make table (dml.reproduce): aggregation and Markdown on fake result files, resuming, and the
grid's arguments parsing on the shipped configs."""

import json
from types import SimpleNamespace

import pytest
from test_configs import ParseOnlyCLI

from dml import reproduce
from dml.data import DMLDataModule
from dml.module import DMLModule


def write_runs(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def fake(variant, seed, r1, mapr=0.2, nmi=0.5):
    return {"variant": variant, "seed": seed, "metrics": {"R@1": r1, "MAP@R": mapr, "NMI": nmi}}


def test_aggregate_gives_mean_and_sample_std_in_percent_last_repeat_wins(tmp_path):
    path = tmp_path / "runs.jsonl"
    write_runs(
        path,
        [
            fake("B", 0, 0.5),
            fake("A", 0, 0.60),
            fake("A", 1, 0.70),
            fake("A", 2, 0.99),
            fake("A", 2, 0.80),
        ],
    )  # seed 2 redone: 0.80 counts
    table = reproduce.aggregate(reproduce.load_runs(str(path)), order=["A", "B"])
    assert list(table) == ["A", "B"]
    mean, std, n = table["A"]["R@1"]
    assert (mean, n) == (pytest.approx(70.0), 3) and std == pytest.approx(10.0)
    assert table["B"]["R@1"] == (pytest.approx(50.0), None, 1)  # one seed: no spread
    text = reproduce.markdown(table, "t", "python -m dml.reproduce --seeds 0 1 2")
    assert "| A | 70.0 +- 10.0 | 20.0 +- 0.0 | 50.0 +- 0.0 | 3 |" in text
    assert "| B | 50.0 | 20.0 | 50.0 | 1 |" in text
    assert "Made by: `python -m dml.reproduce --seeds 0 1 2`" in text


def test_a_broken_results_line_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_text(json.dumps(fake("A", 0, 0.5)) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"runs.jsonl:2"):
        reproduce.load_runs(str(path))
    path.write_text('{"variant": "A"}\n')
    with pytest.raises(ValueError, match="expected keys"):
        reproduce.load_runs(str(path))


def test_main_writes_runs_and_table_and_resumes(tmp_path, monkeypatch):
    calls = []

    def fake_run(args):
        calls.append(args)
        seed = int(args[args.index("--seed_everything") + 1])
        module = SimpleNamespace(split_name=lambda stage: {"val": "test split"}[stage])
        metrics = {"R@1": 0.5 + 0.1 * seed, "MAP@R": 0.2, "NMI": 0.6}
        return metrics, SimpleNamespace(lightning_module=module)

    monkeypatch.setattr(reproduce, "run_once", fake_run)
    argv = [
        "--dataset",
        "synthetic",
        "--seeds",
        "0",
        "1",
        "--out",
        str(tmp_path),
        "--variants",
        "GAP (contrastive)",
        "IBC",
        "C2-CCP",
    ]
    text = reproduce.main(argv)
    assert len(calls) == 6
    # every number says what it measures: the table's line, its LaTeX caption, each run
    said = "the metrics of the last epoch's validation, on the test split, in %"
    assert said in text
    assert said.replace("%", "\\%") in (tmp_path / "synthetic" / "table.tex").read_text()
    runs = reproduce.load_runs(str(tmp_path / "synthetic" / "runs.jsonl"))
    assert {r["split"] for r in runs} == {"test split"}
    assert "| GAP (contrastive) | 55.0 +- 7.1 |" in text and "| IBC | 55.0 +- 7.1 |" in text
    assert (tmp_path / "synthetic" / "table.md").read_text() == text
    assert "--variants" in text  # the command that made it
    reproduce.main(argv)  # everything done: nothing reruns
    assert len(calls) == 6
    ibc_args = [a for a in calls if "experiments/method/ibc.yaml" in a][0]
    assert "experiments/method/ibc/synthetic.yaml" in ibc_args  # the per-data-set file
    ccp_args = [a for a in calls if "experiments/method/ccp_c2.yaml" in a][0]
    assert "experiments/family/ccp/synthetic.yaml" in ccp_args  # the family's
    assert ibc_args[ibc_args.index("--trainer.max_epochs") + 1] == "3"  # the CPU budget


@pytest.mark.parametrize("dataset", ["omniglot_small", "cub"])
@pytest.mark.parametrize("variant", list(reproduce.GRID))
def test_grid_arguments_parse(variant, dataset):
    method, extra = reproduce.GRID[variant]
    args = reproduce.run_args(dataset, method, extra, seed=1, epochs=2, size=32)
    cli = ParseOnlyCLI(DMLModule, DMLDataModule, subclass_mode_data=True, run=False, args=args[1:])
    assert cli.config.trainer.max_epochs == 2 and cli.config.seed_everything == 1
    if method in ("xbm", "xbn"):  # the paper's memory term, whatever the family's defaults
        memory = cli.config.model.memory
        assert memory["loss"] is None and memory["weight"] == 1.0


def test_the_omniglot_memory_family_defaults_to_the_averaged_tuned_term():
    args = reproduce.run_args("omniglot_small", "xbn", [], seed=0, epochs=2, size=32)
    cli = ParseOnlyCLI(DMLModule, DMLDataModule, subclass_mode_data=True, run=False, args=args[1:])
    memory = cli.config.model.memory
    assert memory["loss"] == "contrastive" and memory["weight"] == 0.13
    assert memory["size"] == 1024 and memory["start_iteration"] == 50


def test_a_run_with_other_settings_is_not_reused_and_a_failed_run_is_marked(tmp_path, monkeypatch):
    calls = []

    def fake_run(args):
        calls.append(args)
        if (
            "experiments/method/ibc.yaml" in args
            and "1" == args[args.index("--seed_everything") + 1]
        ):
            raise RuntimeError("non-finite loss at step 3")
        epochs = int(args[args.index("--trainer.max_epochs") + 1])
        return {"R@1": 0.1 * epochs, "MAP@R": 0.2, "NMI": 0.6}, None

    monkeypatch.setattr(reproduce, "run_once", fake_run)
    argv = [
        "--dataset",
        "synthetic",
        "--seeds",
        "0",
        "1",
        "--out",
        str(tmp_path),
        "--variants",
        "GAP (contrastive)",
        "IBC",
    ]
    with pytest.raises(SystemExit, match="1 run\\(s\\) failed \\(IBC seed 1\\)"):
        reproduce.main(argv + ["--epochs", "2"])
    assert len(calls) == 4  # the grid went on after the failure
    text = (tmp_path / "synthetic" / "table.md").read_text()
    assert "| GAP (contrastive) | 20.0 +- 0.0 |" in text
    assert "| IBC | 20.0 | 20.0 | 60.0 | 1 (seed 1 failed) |" in text
    rows = reproduce.load_runs(str(tmp_path / "synthetic" / "runs.jsonl"))
    assert [r["failed"] for r in rows if r.get("failed")] == [
        "RuntimeError: non-finite loss at step 3"
    ]
    # 3 epochs: other settings, so every run trains again and the table holds only them
    with pytest.raises(SystemExit):
        reproduce.main(argv + ["--epochs", "3"])
    assert len(calls) == 8
    text = (tmp_path / "synthetic" / "table.md").read_text()
    assert "| GAP (contrastive) | 30.0 +- 0.0 | 20.0 +- 0.0 | 60.0 +- 0.0 | 2 |" in text
    assert "| IBC | 30.0 | 20.0 | 60.0 | 1 (seed 1 failed) |" in text
    # the same settings again: only the failed run is tried again
    with pytest.raises(SystemExit):
        reproduce.main(argv + ["--epochs", "3"])
    assert len(calls) == 9


def test_an_edited_config_file_changes_the_fingerprint(tmp_path):
    from dml import jobs

    config = tmp_path / "m.yaml"
    config.write_text("model: {embedding_dim: 16}\n")
    args = ["fit", "--config", str(config), "--trainer.default_root_dir", "a"]
    first = jobs.fingerprint(args)
    assert jobs.fingerprint(args[:-1] + ["b"]) == first  # the output folder does not count
    config.write_text("model: {embedding_dim: 32}\n")
    assert jobs.fingerprint(args) != first
    for form in (["fit", f"--config={config}"], ["fit", "--model", str(config)]):
        before = jobs.fingerprint(form)  # a file given with = or as a group counts too
        config.write_text(config.read_text() + "# edited\n")
        assert jobs.fingerprint(form) != before
    data = tmp_path / "data"
    (data / "CUB_200_2011").mkdir(parents=True)
    (data / "CUB_200_2011" / "images.txt").write_text("1 a.jpg\n")
    for with_data in (
        args + ["--data.init_args.root", str(data)],
        args + [f"--data.init_args.root={data}"],
    ):
        before = jobs.fingerprint(with_data)
        (data / "CUB_200_2011" / "images.txt").write_text(
            (data / "CUB_200_2011" / "images.txt").read_text() + "2 b.jpg\n"
        )
        assert jobs.fingerprint(with_data) != before
