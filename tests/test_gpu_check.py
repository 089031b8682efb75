"""``make gpu-check`` (dml.gpu_check): its checks run on the CPU here, small; on a machine
without CUDA the GPU command says so and exits 0."""

import subprocess
import sys

import pytest
import torch

from dml import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: make gpu-check")
def test_without_cuda_the_gpu_check_says_so_and_exits_0(capsys):
    assert gpu_check.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_every_check_passes_on_the_cpu(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dml.gpu_check",
            "--accelerator",
            "cpu",
            "--small",
            "--size",
            "32",
            "--steps",
            "4",
            "--methods",
            "gsp_contrastive",
            "--eval-rows",
            "3000",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    table = (tmp_path / "gpu-check.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "check" not in line]
    assert [row.split(" | ")[0][2:] for row in rows] == [
        "gsp_contrastive",
        "resume",
        "evaluation",
        "ddp (2 processes, gloo)",
    ]
    assert all("| ok" in row for row in rows), table
    assert "max relative loss difference over steps 6-17: 0.00e+00" in table  # exact on a CPU


def test_a_failing_run_is_reported_and_fails_the_check(tmp_path, monkeypatch):
    class Opts:
        accelerator, small, size, steps, timeout = "cpu", True, 32, 4, 300

    monkeypatch.setattr(gpu_check, "fit_args", lambda *a, **k: ["fit", "--no_such_key", "1"])
    row = gpu_check.check_method("baseline", str(tmp_path), str(tmp_path), Opts)
    assert not row["ok"] and "no_such_key" in row["error"]
    assert "FAILED" in gpu_check.table([row])
