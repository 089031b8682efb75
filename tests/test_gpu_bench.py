"""benchmarks/gpu_bench.py (`make gpu-bench`): its CPU rehearsal runs every part end to end; a
part that fails or overruns its budget fails the run without losing the other parts' rows."""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks")
sys.path.insert(0, BENCH)

import eval_speed  # noqa: E402
import gpu_bench  # noqa: E402
import offline_wheels  # noqa: E402


def test_the_cpu_rehearsal_runs_every_part_and_writes_one_table_and_json(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(BENCH, "gpu_bench.py"),
            "--accelerator",
            "cpu",
            "--small",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, WANDB_MODE="disabled"),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((out / "gpu-bench.json").read_text())
    rows = record["rows"]
    assert {r["part"] for r in rows} == set(gpu_bench.PARTS)
    assert not [r for r in rows if r["verdict"] == "FAILED"]
    assert set(record["seconds"]) == set(gpu_bench.PARTS)
    for part, seconds in record["seconds"].items():
        assert seconds <= gpu_bench.SMALL_BUDGETS[part]
    # the check part: a method trained and the evaluation matched itself
    checks = {r["measure"]: r for r in rows if r["part"] == "check"}
    assert checks["xbn"]["verdict"] == "ok" and "steps/s" in checks["xbn"]["value"]
    assert checks["evaluation"]["verdict"] == "ok"
    # numbers, not placeholders: the evaluator's metrics are the exact ones of the same data
    raw = record["raw"]["eval-hard"]
    from dml.metrics import retrieval_metrics

    x, y = eval_speed.make_data("hard", 3000, round(3000 / 5.35), 512)
    import torch

    expected = retrieval_metrics(torch.from_numpy(x), torch.from_numpy(y), [1, 10, 100, 1000])
    assert raw["metrics"] == pytest.approx(expected, abs=1e-9)
    assert all(r > 0 and math.isfinite(r) for r in raw["ours_over_floor"])
    loader = record["raw"]["loader"]["workers"]["0"]
    assert min(loader.values()) > 0
    throughput = [r for r in rows if r["part"] == "throughput"]
    assert len(throughput) == 1 and re.match(r"\d+\.\d{3} \[", throughput[0]["value"])
    assert throughput[0]["verdict"] == ""  # 3 timed steps: no verdict on the target
    # the CUDA-only parts say so rather than passing silently
    assert all("CUDA only" in r["value"] for r in rows if r["part"] in ("syncs", "compile"))
    table = (out / "gpu-bench.md").read_text()
    assert table.count("\n| ") == len(rows) + 1  # header + one line per row
    assert "gpu-bench: date" in table and "commit" in table
    assert "=====" in (out / "gpu-bench.log").read_text()  # each child's output is kept


def test_a_failing_part_and_a_part_past_its_budget_fail_the_run_and_keep_the_rest(
    tmp_path, monkeypatch, capsys
):
    def broken(ctx, budget):
        raise RuntimeError("a bug in the part")

    monkeypatch.setitem(gpu_bench.RUNNERS, "syncs", broken)
    monkeypatch.setitem(gpu_bench.SMALL_BUDGETS, "loader", 1)
    code = gpu_bench.main(
        [
            "--accelerator",
            "cpu",
            "--small",
            "--out",
            str(tmp_path),
            "--parts",
            "syncs",
            "loader",
            "compile",
        ]
    )
    assert code == 1
    rows = json.loads((tmp_path / "gpu-bench.json").read_text())["rows"]
    by_part = {r["part"]: r for r in rows}
    assert (
        by_part["syncs"]["verdict"] == "FAILED" and "a bug in the part" in by_part["syncs"]["value"]
    )
    assert (
        by_part["loader"]["verdict"] == "FAILED" and "budget of 1 s" in by_part["loader"]["value"]
    )
    assert by_part["compile"]["value"].startswith("CUDA only")  # ran after the failures
    assert "failed: loader, syncs" in capsys.readouterr().out


def test_a_stale_figure_file_is_never_reported_and_a_file_as_out_is_one_error(tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "loader.json").write_text(
        '{"device": "cpu", "workers": {"0": {"ours": 1, "imagefolder": 1, "decode_on_device": 9}}}'
    )
    gpu_bench.SMALL_BUDGETS["loader"], saved = 1, gpu_bench.SMALL_BUDGETS["loader"]
    try:
        gpu_bench.main(
            [
                "--accelerator",
                "cpu",
                "--small",
                "--out",
                str(tmp_path / "o"),
                "--work",
                str(work),
                "--parts",
                "loader",
            ]
        )
    finally:
        gpu_bench.SMALL_BUDGETS["loader"] = saved
    rows = json.loads((tmp_path / "o" / "gpu-bench.json").read_text())["rows"]
    assert [r["verdict"] for r in rows] == ["FAILED"]  # killed, and the old 9 / 1 not shown
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit):
        gpu_bench.main(["--accelerator", "cpu", "--out", str(tmp_path / "file")])
    assert "a file; expected a folder" in capsys.readouterr().err


def test_without_cuda_it_says_so_and_exits_0(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert gpu_bench.main(["--out", str(tmp_path / "x")]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "values,verdict",
    [
        ([0.91, 0.95, 0.97], "met"),
        ([0.85, 0.92, 0.95], "not settled"),
        ([0.80, 0.85, 0.95], "not settled"),
        ([0.80, 0.85, 0.89], "not met"),
    ],
)
def test_a_target_is_met_only_when_every_round_meets_it(values, verdict):
    assert gpu_bench.at_least(values, 0.90) == verdict


def test_real_embeddings_are_stacked_only_when_their_classes_are_disjoint(tmp_path):
    rng = np.random.default_rng(0)
    for name, labels in (("a", [0, 0, 1, 1]), ("b", [2, 2, 3]), ("c", [3, 4, 4])):
        np.savez(
            tmp_path / f"{name}.npz",
            embeddings=rng.normal(size=(len(labels), 8)),
            labels=np.array(labels),
        )
    x, y = eval_speed.load_embeddings([str(tmp_path / "a.npz"), str(tmp_path / "b.npz")])
    assert x.shape == (7, 8) and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-6)
    assert y.tolist() == [0, 0, 1, 1, 2, 2, 3]
    with pytest.raises(SystemExit, match="share labels"):
        eval_speed.load_embeddings([str(tmp_path / "b.npz"), str(tmp_path / "c.npz")])
    x, y = eval_speed.load_embeddings(
        [str(tmp_path / "b.npz"), str(tmp_path / "c.npz")], relabel=True
    )
    assert y.tolist() == [0, 0, 1, 2, 3, 3]  # b's 2, 3 then c's 3, 4 as new classes
    np.savez(tmp_path / "d.npz", vectors=np.zeros((2, 8)))
    with pytest.raises(SystemExit, match="expected the arrays 'embeddings' and 'labels'"):
        eval_speed.load_embeddings([str(tmp_path / "d.npz")])
    np.savez(tmp_path / "e.npz", embeddings=np.zeros((3, 8)), labels=np.array([0, -1, 1]))
    with pytest.raises(SystemExit, match="1 rows without a label"):
        eval_speed.load_embeddings([str(tmp_path / "e.npz")], relabel=True)
    np.savez(tmp_path / "f.npz", embeddings=np.zeros((2, 8)), labels=np.array([object(), object()]))
    for bad in ("f.npz", "missing.npz"):
        with pytest.raises(SystemExit, match="not readable as an embeddings file"):
            eval_speed.load_embeddings([str(tmp_path / bad)])


def test_the_offline_wheels_are_the_run_time_requirements_only():
    dist = offline_wheels.DISTRIBUTION
    need = offline_wheels.closure(dist, ["cpu"])
    for package in (
        "torch",
        "pytorch-lightning",
        "pytorch-metric-learning",
        "faiss-cpu",
        "jsonargparse",
        "optuna",
        "numpy",
        "numba",
    ):
        assert package in need, package
    assert "pytest" not in need and "mkdocs" not in need  # the dev extra is not shipped
    # a node with torch: its requirements (CUDA libraries, triton) are not walked into
    on_node = offline_wheels.closure(dist, ["cpu"], have=["torch", "pytorch-lightning"])
    assert "torch" in on_node and not any(
        offline_wheels.torch_bound(k) and k != "torch" and k not in ("torchvision",)
        for k in on_node
    )
    assert offline_wheels.torch_bound("nvidia-cublas") and offline_wheels.torch_bound("triton")


def test_eval_speed_refuses_class_counts_its_generator_cannot_make(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["eval_speed.py", "--n", "5924", "--classes", "100"])
    with pytest.raises(SystemExit) as stop:
        eval_speed.main()
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--classes must be between 494 and 2962" in err and "Traceback" not in err
