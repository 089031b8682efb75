"""Training-step overhead of IBC's message passing, in one process.

1. The full training step (forward, IBC losses, backward, optimizer step) of a DMLModule with
   IBC, with the MPN branch (mpn_weight 1) and without it (mpn_weight 0, the backbone's
   cross-entropy alone), same backbone, batch and data: the ratio is the MPN's overhead.
2. The MPN branch alone (MPN + neck + classifier, forward and backward) at the published batch
   sizes and layer / head counts, 512-d, next to a ResNet-50 forward and backward on the same
   batch at 227 px (``--resnet``; slow on a CPU).

    python benchmarks/ibc_speed.py [--backbone small_cnn] [--size 64] [--steps 10] [--resnet]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from timing import compare, format_ratio, ratio, seconds_per_call

# data set -> (classes x samples, layers, heads, concat), docs/methods/ibc.md
PUBLISHED = {
    "CUB": (6 * 9, 1, 2, False),
    "Cars": (10 * 7, 2, 8, True),
    "SOP": (15 * 6, 1, 8, False),
    "In-Shop": (14 * 4, 1, 4, False),
}


def training_step(mpn_weight, args, device):
    from dml.module import BackboneConfig, DMLModule, IBCConfig, LossConfig, OptimizerConfig

    torch.manual_seed(0)
    module = DMLModule(
        backbone=BackboneConfig(args.backbone, pretrained=False),
        pooling={"name": "gmp"},
        embedding_dim=args.dim,
        num_classes=100,
        loss=LossConfig(name="none"),
        optimizer=OptimizerConfig(name="radam"),
        ibc=IBCConfig(enabled=True, heads=2, mpn_weight=mpn_weight),
    ).to(device)
    opt = torch.optim.RAdam(module.parameters(), lr=1e-4)
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    labels = torch.arange(args.batch, device=device) // 4

    def step():
        opt.zero_grad()
        sum(module.objective(module.embed(images), labels).values()).backward()
        opt.step()

    return step


def mpn_seconds(batch, layers, heads, concat, device, steps):
    from dml.losses import IntraBatchConnections
    from dml.models import MessagePassingNetwork

    torch.manual_seed(0)
    mpn = MessagePassingNetwork(512, layers, heads, concat=concat)
    ibc = IntraBatchConnections(mpn, 512, 100, mpn_weight=1).to(device)
    raw = torch.randn(batch, 512, device=device, requires_grad=True)
    labels = torch.arange(batch, device=device) % 100

    def step():
        ibc(raw, F.normalize(raw, dim=1), labels)["ibc_mpn"].backward()

    return seconds_per_call(step, steps, device)


def resnet_seconds(batch, device, steps):
    import torchvision

    net = torchvision.models.resnet50().to(device)
    x = torch.randn(batch, 3, 227, 227, device=device)

    def step():
        net(x).sum().backward()

    return seconds_per_call(step, steps, device, warmup=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="small_cnn")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--resnet", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    timings = compare(
        {"without": training_step(0.0, args, device), "with": training_step(1.0, args, device)},
        device,
        rounds=args.steps,
    )
    print(
        f"training step ({args.backbone}, {args.size} px, batch {args.batch}, {args.dim}-d, "
        f"{device.type}; median [range] of {args.steps} alternating rounds): without MPN "
        f"{timings['without']}, with MPN {timings['with']}, ratio "
        f"{format_ratio(ratio(timings, 'with', 'without'))}"
    )
    for name, (batch, layers, heads, concat) in PUBLISHED.items():
        s = mpn_seconds(batch, layers, heads, concat, device, args.steps)
        line = (
            f"{name}: MPN branch fwd+bwd, batch {batch}, {layers} layer(s) x {heads} heads: "
            f"{1000 * s:.2f} ms"
        )
        if args.resnet:
            r = resnet_seconds(batch, device, max(1, args.steps // 5))
            line += f"; ResNet-50 fwd+bwd at 227 px {1000 * r:.0f} ms; MPN share {s / r:.4f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
