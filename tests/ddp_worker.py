"""One process of the 2-process DDP checks (gloo, CPU), run by tests/test_ddp.py as
``python tests/ddp_worker.py RANK WORLD PORT OUT_DIR``. Lightning sees LOCAL_RANK etc. in the
environment and joins the process group instead of launching processes itself.

Scenarios, each with fixed seeds so that the test process can redo them on one process:
- eval: validation metrics on a data set of odd size (the distributed sampler pads);
- grad: one training step's gradients with the pair loss over the gathered global batch;
- ibc_grad: the same with IBC's MPN over the gathered batch;
- xbn: the cross-batch memory after some steps;
- ccp: the proxies after a projection round, and a checkpoint written for a 1-process resume.
"""

import os
import sys

import pytorch_lightning as pl
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ddp_scenarios import SCENARIOS, ddp_trainer  # noqa: E402


def main(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
        WANDB_MODE="disabled",
    )
    torch.set_num_threads(1)
    results = {}
    for name, scenario in SCENARIOS.items():
        pl.seed_everything(0)
        results[name] = scenario(
            lambda **kw: ddp_trainer(out_dir, world, **kw), rank, world, out_dir
        )
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
