"""Two CPU processes (gloo) against one: distributed evaluation, gradients of losses over the
gathered global batch, the cross-batch memory, CCP's proxies, and a checkpoint written by 2
processes resumed by 1. The two processes run every scenario once (tests/ddp_worker.py)."""

import os
import socket
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch
from ddp_scenarios import SCENARIOS, ddp_trainer, make_data, make_module

from dml.callbacks import ChanceConstraintProjection
from dml.module import DMLModule

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    port = free_port()
    worker = os.path.join(os.path.dirname(__file__), "ddp_worker.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):
        env.pop(key, None)
    procs = [
        subprocess.Popen(
            [sys.executable, worker, str(r), str(WORLD), str(port), str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(WORLD)
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def single(name, tmp_path):
    pl.seed_everything(0)
    return SCENARIOS[name](lambda **kw: ddp_trainer(str(tmp_path), 1, **kw), 0, 1, str(tmp_path))


def test_distributed_evaluation_equals_one_process_exactly(ddp, tmp_path):
    _, ranks = ddp
    assert len(make_data().eval_datasets["test"]) % WORLD == 1  # the sampler pads one
    expected = single("eval", tmp_path)
    assert ranks[0]["eval"] == expected and ranks[1]["eval"] == expected


def test_skipped_images_leave_the_processes_unequal_and_evaluation_exact(ddp, tmp_path):
    """skip_unreadable under DDP, decoding in the workers and on the device: the processes
    hold different numbers of rows, the gather pads and drops, and the metrics equal one
    process's on the same 14 readable images."""
    _, ranks = ddp
    expected = single("skipped", tmp_path)
    for decode in ("cpu", "device"):
        assert expected[decode]["rows"] == 14
        assert expected[decode]["skipped"] == ["Bird_102_0001.jpg"]
        assert ranks[0]["skipped"][decode]["rows"] == 14  # rank 0 scores the gathered set
        assert ranks[0]["skipped"][decode]["metrics"] == expected[decode]["metrics"]
        assert ranks[1]["skipped"][decode]["metrics"] == expected[decode]["metrics"]
        # the file is on one process's shard: that one names it
        assert sorted(
            ranks[0]["skipped"][decode]["skipped"] + ranks[1]["skipped"][decode]["skipped"]
        ) == ["Bird_102_0001.jpg"]


@pytest.mark.parametrize("name", ["grad", "ibc_grad"])
def test_gathered_batch_gives_the_one_process_gradient(ddp, tmp_path, name):
    _, ranks = ddp
    expected = single(name, tmp_path)
    assert set(ranks[0][name]) == set(expected) and len(expected) > 5
    for param, grad in expected.items():
        for r in range(WORLD):
            torch.testing.assert_close(
                ranks[r][name][param], grad, atol=1e-5, rtol=1e-4, msg=f"{name}: rank {r}, {param}"
            )


def test_local_batch_gradient_differs_from_the_gathered_one(tmp_path):
    """Control: without gathering, a split batch is a different loss (so the check above is
    not vacuous): compare one process on half the batch with the whole batch."""
    from ddp_scenarios import FixedBatch

    pl.seed_everything(0)
    module = make_module(
        loss={"name": "contrastive", "params": {"pos_margin": 0.0, "neg_margin": 1.0}}
    )
    whole, half = FixedBatch(0, 1), FixedBatch(0, 2)
    g = []
    for batch in (whole, half):
        module.zero_grad()
        out = module.embed(batch.images)
        module.objective(out, batch.labels)["metric"].backward()
        g.append(module.head.linear.weight.grad.clone())
    assert not torch.allclose(g[0], g[1], atol=1e-5)


def test_cross_batch_memory_is_identical_on_every_rank(ddp):
    _, ranks = ddp
    a, b = ranks[0]["xbn"], ranks[1]["xbn"]
    assert a["iteration"] == 6 and int((a["labels"] >= 0).sum()) == 40  # full, wrapped around
    for key in ("embeddings", "labels", "sum", "kalman"):
        assert torch.equal(a[key], b[key]), key


def test_ccp_proxies_identical_after_a_round_and_resume_on_one_process(ddp, tmp_path):
    out, ranks = ddp
    a, b = ranks[0]["ccp"], ranks[1]["ccp"]
    assert a["round"] == b["round"] == 1
    assert torch.equal(a["proxies"], b["proxies"])
    assert a["theta_prev"].numel() > 0 and torch.equal(a["theta_prev"], b["theta_prev"])
    # the checkpoint the 2 processes wrote resumes on one
    path = out / f"ccp_world{WORLD}.ckpt"
    callback = ChanceConstraintProjection(
        enabled=True, patience=1, min_delta=10.0, pool_passes=3, lam=1e-3
    )
    module = DMLModule.load_from_checkpoint(path)
    assert torch.equal(module.objective.proxies(), a["proxies"])
    ddp_trainer(
        str(tmp_path),
        1,
        callbacks=[callback],
        max_epochs=3,
        limit_train_batches=2,
        limit_val_batches=0,
    ).fit(module, make_data(), ckpt_path=path)
    assert callback.round == 1 and callback.lam == pytest.approx(1e-3)
    assert not torch.equal(module.objective.proxies(), a["proxies"])  # and it trained on
