"""Step overhead of the cross-batch memory, in one process: no memory vs XBM vs XBN vs adaptive
XBN, with a full memory of 55,000 x 512 embeddings and batches of 64 (16 classes x 4).

The step is what the memory adds to: a linear embedding layer on precomputed 2048-d features
(so a backbone's cost does not hide the overhead), XBM's contrastive loss (margin 0.5) on the
batch, plus, with a memory (``dml.losses.CrossBatchMemoryLoss``, the batch enqueued before its
term), the same loss against the memory, backward and an optimizer step. XBN
(``dml.callbacks.CrossBatchNormalization``, through the memory's hook) also moment-matches the
memory in place at every step.

    python benchmarks/xbn_speed.py [--memory 55000] [--dim 512] [--batch 64] [--steps 20]
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from timing import compare, format_ratio, ratio


def make_step(mode, args, device):
    from dml.callbacks import CrossBatchNormalization
    from dml.losses import CrossBatchMemoryLoss, XBMContrastiveLoss

    torch.manual_seed(0)
    head = torch.nn.Linear(2048, args.dim).to(device)
    opt = torch.optim.Adam(head.parameters(), lr=1e-4)
    loss_fn = XBMContrastiveLoss()
    objective = SimpleNamespace(metric=loss_fn, miner=None)  # what the memory term reads
    memory = None
    if mode != "none":
        memory = CrossBatchMemoryLoss(args.dim, size=args.memory, start_iteration=0).to(device)
        # a full memory of normalised embeddings from SOP-like labels
        fill = F.normalize(torch.randn(args.memory, args.dim, device=device), dim=1)
        memory.enqueue(fill, torch.randint(0, 11318, (args.memory,), device=device))
        if mode != "xbm":
            xbn = CrossBatchNormalization(enabled=True, adaptive=mode == "adaptive_xbn")
            xbn.attach(memory)
    feats = torch.randn(args.batch, 2048, device=device)
    labels = torch.arange(args.batch // 4, device=device).repeat_interleave(4)

    def step():
        opt.zero_grad(set_to_none=True)
        raw = head(feats)
        z = F.normalize(raw, dim=1)
        loss = loss_fn(z, labels)
        if memory is not None:
            embedded = {"embeddings": z, "raw_embeddings": raw}
            loss = loss + sum(memory(embedded, labels, objective).values())
        loss.backward()
        opt.step()

    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--memory", type=int, default=55000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(
        f"device {device}, torch threads {torch.get_num_threads()}, memory {args.memory} x "
        f"{args.dim}, batch {args.batch}",
        flush=True,
    )
    modes = ("none", "xbm", "xbn", "adaptive_xbn")
    timings = compare(
        {mode: make_step(mode, args, device) for mode in modes}, device, rounds=args.steps, warmup=3
    )
    for mode in modes:
        print(f"{mode:>13}: {timings[mode]} per step", flush=True)
    print(
        f"median [range] of {args.steps} alternating rounds: "
        f"XBM / none = {format_ratio(ratio(timings, 'xbm', 'none'))}; "
        f"XBN / XBM = {format_ratio(ratio(timings, 'xbn', 'xbm'))} (target <= 1.10); "
        f"adaptive XBN / XBM = {format_ratio(ratio(timings, 'adaptive_xbn', 'xbm'))}"
    )


if __name__ == "__main__":
    main()
