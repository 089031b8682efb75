"""GSP cost, in one process:

1. A training step (forward + backward + optimizer step) of ResNet-50 (or ``--backbone``, e.g.
   ``timm:vit_small_patch16_224``: GSP over its 196 patch tokens) + pooling + 512-d head
   with GSP vs GAP, same batch, timed in alternating rounds (``timing.compare``: median and
   range over rounds). Reports seconds per step and the activation memory saved for backward
   (exact, from saved-tensor hooks; on CUDA also the peak allocated memory).
2. The transport solver alone: the analytical backward (``dml.models.gsp.partial_transport``)
   vs autograd through the unrolled fixed-point iterations (nu <- mu / sum_i r_i s_i), at 20
   and 100 iterations forced (tol 0): time of forward + backward, saved bytes, and the
   gradient difference; and the analytic solver at its default tolerance.

    python benchmarks/gsp_speed.py [--backbone resnet50] [--batch 8] [--size 224] [--steps 5]
        [--device cpu]
        [--precision fp32|bf16]
"""

from __future__ import annotations

import argparse

import torch
from timing import compare, format_ratio, ratio, seconds_per_call


class SavedBytes:
    """Total bytes autograd saves for backward inside the context."""

    def __init__(self):
        self.total = 0

    def __enter__(self):
        def pack(t):
            self.total += t.numel() * t.element_size()
            return t

        self.ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)


def train_step(pooling_name, args, device):
    """A training step of the model with ``pooling_name``, and the bytes it saved last time."""
    from dml.module import BackboneConfig, DMLModule, LossConfig, PoolingConfig

    torch.manual_seed(0)
    params = {"num_prototypes": 64, "mu": 0.3, "gamma": 5.0} if pooling_name == "gsp" else {}
    model = DMLModule(
        backbone=BackboneConfig(args.backbone, pretrained=False),
        pooling=PoolingConfig(pooling_name, params),
        embedding_dim=512,
        loss=LossConfig("multi_similarity"),
        num_classes=100,
    ).to(device)
    model.train()
    if args.channels_last:
        model.apply_device_settings(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    labels = torch.arange(args.batch // 4, device=device).repeat_interleave(4)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    saved_bytes = []

    def step():
        opt.zero_grad(set_to_none=True)
        with (
            SavedBytes() as saved,
            torch.autocast(device.type, dtype=dtype, enabled=args.precision == "bf16"),
        ):
            loss = sum(model.objective(model.embed(images), labels).values())
        loss.backward()
        opt.step()
        saved_bytes.append(saved.total)

    return step, saved_bytes


def profile_steps(steps, device, repeats: int = 3) -> None:
    """torch.profiler over ``repeats`` steps of each pooling: operators by device time, and the
    device's busy time against the wall time (idle = waiting for the host)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for name, (step, _) in steps.items():
        with profile(activities=activities) as prof:
            for _ in range(repeats):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        events = prof.key_averages()
        print(f"\nprofile of {repeats} {name} steps (by {key}):")
        print(events.table(sort_by=key, row_limit=18, max_name_column_width=60))


def peak_memory(step, device):
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def unrolled_transport(costs, mu, gamma, iters):
    """The fixed-point solver written in differentiable torch ops (autograd unrolls it)."""
    n = costs.shape[-1]
    k = torch.exp(-gamma * costs)
    s = k.sum(1)  # (B, n)
    nu = torch.full(s.shape[:1], mu / (1 - mu), dtype=costs.dtype, device=costs.device) / s.mean(1)
    for _ in range(iters):
        r = (1.0 / n) / (1.0 + nu[:, None] * s)
        nu = mu / (r * s).sum(1)
    r = (1.0 / n) / (1.0 + nu[:, None] * s)
    pi = nu[:, None, None] * k * r[:, None, :]
    return torch.cat([r[:, None], pi], 1)


def solver_cost(iters, device, b=32, m=64, n=49, repeats=20):
    from dml.models.gsp import partial_transport

    g = torch.Generator(device="cpu").manual_seed(0)
    costs = (2 * torch.rand(b, m, n, generator=g)).to(device)
    weights = torch.rand(b, m + 1, n, generator=g).to(device)
    fns = {
        "analytic": lambda c: partial_transport(c, 0.3, 5.0, iters=iters, tol=0.0),
        "unrolled": lambda c: unrolled_transport(c, 0.3, 5.0, iters),
    }
    out = {}
    for name, fn in fns.items():
        c = costs.clone().requires_grad_()
        with SavedBytes() as saved:
            plan = fn(c)
        (plan * weights).sum().backward()
        out[name] = [None, saved.total, c.grad.clone()]

    def forward_backward(fn):
        return lambda: (fn(costs.clone().requires_grad_()) * weights).sum().backward()

    timings = compare(
        {name: forward_backward(fn) for name, fn in fns.items()}, device, rounds=repeats
    )
    for name in fns:
        out[name][0] = timings[name].median
    diff = (out["analytic"][2] - out["unrolled"][2]).abs().max().item()
    return out, diff


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--backbone",
        default="resnet50",
        help="resnet50 (7 x 7 = 49 locations at 224 px) or a timm name, e.g. "
        "timm:vit_small_patch16_224 (ViT-S/16: 14 x 14 = 196 patch tokens)",
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default=None,
        help="default: bf16 on CUDA, fp32 on a CPU (as training runs)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also print torch.profiler's top operators of each step",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    args.channels_last = device.type == "cuda" and not args.backbone.startswith("timm:vit")
    print(
        f"device {device}, torch threads {torch.get_num_threads()}, {args.backbone} at "
        f"{args.size} px, batch {args.batch}, 512-d head, multi-similarity loss, "
        f"{args.precision}{', channels-last' if args.channels_last else ''}",
        flush=True,
    )

    steps = {name: train_step(name, args, device) for name in ("gap", "gsp")}
    peaks = {name: peak_memory(steps[name][0], device) for name in steps}
    timings = compare({name: step for name, (step, _) in steps.items()}, device, rounds=args.steps)
    for name, (_, saved) in steps.items():
        extra = f", peak allocated {peaks[name] / 2**20:.0f} MiB" if peaks[name] else ""
        print(
            f"{name}: {timings[name]} per step (median [range] of {args.steps} alternating "
            f"rounds), saved for backward {saved[-1] / 2**20:.1f} MiB{extra}",
            flush=True,
        )
    mem_ratio = steps["gsp"][1][-1] / steps["gap"][1][-1]
    print(
        f"GSP / GAP step time = {format_ratio(ratio(timings, 'gsp', 'gap'))} (target <= 1.15); "
        f"saved memory ratio {mem_ratio:.3f}",
        flush=True,
    )

    if args.profile:
        profile_steps(steps, device)

    print("\nsolver alone: B=32 images, m=64 prototypes, n=49 locations, mu=0.3, gamma=5")
    from dml.models.gsp import partial_transport

    g = torch.Generator().manual_seed(0)
    costs = (2 * torch.rand(32, 64, 49, generator=g)).to(device)
    seconds = seconds_per_call(
        lambda: partial_transport(costs.clone().requires_grad_(), 0.3, 5.0).sum().backward(),
        20,
        device,
    )
    print(
        f"default (tol 1e-6, stops when converged): analytic {1000 * seconds:.2f} ms "
        f"forward + backward"
    )
    for iters in (20, 100):
        out, diff = solver_cost(iters, device)
        (ta, sa, _), (tu, su, _) = out["analytic"], out["unrolled"]
        print(
            f"iters={iters:3d}: analytic {1000 * ta:.2f} ms, saved {sa / 2**10:.0f} KiB | "
            f"unrolled autograd {1000 * tu:.2f} ms, saved {su / 2**10:.0f} KiB | "
            f"max |grad difference| {diff:.2e}",
            flush=True,
        )


if __name__ == "__main__":
    main()
