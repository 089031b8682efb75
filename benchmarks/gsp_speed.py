"""GSP cost, in one process:

1. A training step (forward + backward + optimizer step) of ResNet-50 + pooling + 512-d head
   with GSP vs GAP, same batch. Reports seconds per step and the activation memory saved for
   backward (exact, from saved-tensor hooks; on CUDA also the peak allocated memory).
2. The transport solver alone: the analytical backward (``dml.models.gsp.partial_transport``)
   vs autograd through the unrolled fixed-point iterations (nu <- mu / sum_i r_i s_i), at 20
   and 100 iterations forced (tol 0): time of forward + backward, saved bytes, and the
   gradient difference; and the analytic solver at its default tolerance.

    python benchmarks/gsp_speed.py [--batch 8] [--size 224] [--steps 5] [--device cpu]
"""
from __future__ import annotations

import argparse

import torch
from timing import seconds_per_call


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


def train_step_cost(pooling_name, args, device):
    from dml.module import BackboneConfig, DMLModule, LossConfig, PoolingConfig

    torch.manual_seed(0)
    params = {"num_prototypes": 64, "mu": 0.3, "gamma": 5.0} if pooling_name == "gsp" else {}
    model = DMLModule(backbone=BackboneConfig("resnet50", pretrained=False),
                      pooling=PoolingConfig(pooling_name, params), embedding_dim=512,
                      loss=LossConfig("multi_similarity"), num_classes=100).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    labels = torch.arange(args.batch // 4, device=device).repeat_interleave(4)

    saved_bytes = []

    def step():
        opt.zero_grad(set_to_none=True)
        with SavedBytes() as saved:
            loss = sum(model.objective(model.embed(images), labels).values())
        loss.backward()
        opt.step()
        saved_bytes.append(saved.total)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = seconds_per_call(step, args.steps, device)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return seconds, saved_bytes[-1], peak


def unrolled_transport(costs, mu, gamma, iters):
    """The fixed-point solver written in differentiable torch ops (autograd unrolls it)."""
    n = costs.shape[-1]
    k = torch.exp(-gamma * costs)
    s = k.sum(1)  # (B, n)
    nu = torch.full(s.shape[:1], mu / (1 - mu), dtype=costs.dtype, device=costs.device) \
        / s.mean(1)
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
    out = {}
    for name, fn in (("analytic", lambda c: partial_transport(c, 0.3, 5.0, iters=iters, tol=0.0)),
                     ("unrolled", lambda c: unrolled_transport(c, 0.3, 5.0, iters))):
        c = costs.clone().requires_grad_()
        with SavedBytes() as saved:
            plan = fn(c)
        (plan * weights).sum().backward()
        grad = c.grad.clone()

        def forward_backward(fn=fn):
            (fn(costs.clone().requires_grad_()) * weights).sum().backward()

        out[name] = (seconds_per_call(forward_backward, repeats, device), saved.total, grad)
    diff = (out["analytic"][2] - out["unrolled"][2]).abs().max().item()
    return out, diff


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {device}, torch threads {torch.get_num_threads()}, ResNet-50 at "
          f"{args.size} px, batch {args.batch}, 512-d head, multi-similarity loss", flush=True)

    results = {}
    for name in ("gap", "gsp"):
        results[name] = train_step_cost(name, args, device)
        sec, saved, peak = results[name]
        extra = f", peak allocated {peak / 2**20:.0f} MiB" if peak is not None else ""
        print(f"{name}: {sec:.3f} s/step, saved for backward {saved / 2**20:.1f} MiB{extra}",
              flush=True)
    ratio = results["gsp"][0] / results["gap"][0]
    mem_ratio = results["gsp"][1] / results["gap"][1]
    print(f"GSP / GAP step time = {ratio:.3f} (target <= 1.15); saved memory ratio "
          f"{mem_ratio:.3f}", flush=True)

    print("\nsolver alone: B=32 images, m=64 prototypes, n=49 locations, mu=0.3, gamma=5")
    from dml.models.gsp import partial_transport
    g = torch.Generator().manual_seed(0)
    costs = (2 * torch.rand(32, 64, 49, generator=g)).to(device)
    seconds = seconds_per_call(
        lambda: partial_transport(costs.clone().requires_grad_(), 0.3, 5.0).sum().backward(),
        20, device)
    print(f"default (tol 1e-6, stops when converged): analytic {1000 * seconds:.2f} ms "
          f"forward + backward")
    for iters in (20, 100):
        out, diff = solver_cost(iters, device)
        (ta, sa, _), (tu, su, _) = out["analytic"], out["unrolled"]
        print(f"iters={iters:3d}: analytic {1000 * ta:.2f} ms, saved {sa / 2**10:.0f} KiB | "
              f"unrolled autograd {1000 * tu:.2f} ms, saved {su / 2**10:.0f} KiB | "
              f"max |grad difference| {diff:.2e}", flush=True)


if __name__ == "__main__":
    main()
