"""GSP: generalized sum pooling (Gurbuz et al., ICCV 2023), docs/methods/gsp.md.

A feature map of n = H*W local features x_i is pooled as f = (1/n) sum_i w_i x_i, where the
weights come from a partial entropic optimal transport of the features (mass 1/n each) to m
learnable prototypes w_k: a fraction mu of the mass is transported, the rest goes to a residual
bin at zero cost. Features close to some prototype are transported and pooled; the others are
discarded as background.

Costs live in the embedding space: u_i = W x_i + b with (W, b) the embedding head's linear map
(a 1x1 convolution sharing its weights), and c_ki = || n(w_k) - n(u_i) ||_2 with the Lipschitz
normalisation n(v) = v if ||v|| <= 1 else v / ||v||. Because the head is linear and the weights
average to one, W f + b = (1/n) sum_i w_i u_i: pooling x and then applying the head is the
paper's pooling of u.

Closed form of the plan (kernel K_ki = exp(-gamma c_ki), one scalar nu per image):
    residual rho_i = (1/n) / (1 + nu sum_k K_ki),   pi_ki = nu K_ki rho_i,
nu fixed by sum_{k,i} pi_ki = mu. Pooling weights w_i = (1 - n rho_i) / mu (they average to 1),
attributes a_k = (1/mu) sum_i pi_ki (a distribution over prototypes). mu = 1 is exactly GAP.

The gradient of the plan with respect to the costs is the implicit (KKT) one, O(m n) and
computed from the solution alone: backward never unrolls the solver iterations.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from dml.errors import ConfigError
from dml.functional import lipschitz_normalize
from dml.models.pooling import Pooling, PoolingOutput
from dml.selection import greedy_k_center


def _solve_log_nu(
    log_s: torch.Tensor, mu: float, iters: int, tol: float, check_every: int = 8
) -> torch.Tensor:
    """t = log nu per image with mean_i sigmoid(t + log s_i) = mu (B,), from log s (B, n).

    The transported share of feature i is sigmoid(t + log s_i), increasing in t, so the root is
    bracketed by [logit(mu) - max log s, logit(mu) - min log s]. Newton steps, falling back to
    bisection whenever a step would leave the bracket: quadratic convergence, never divergence.
    Whether every image's mass is within ``tol * mu`` of mu is read on the host only every
    ``check_every`` iterations (a GPU synchronises on each read): one read per step where Newton
    converges in fewer than 8 iterations. Until the read, converged images go on with Newton
    steps clipped to their bracket, never bisection (a step too small to move t would fail the
    strict bracket test), so each only gets closer to its root.
    """
    target = math.log(mu) - math.log1p(-mu)
    lo = target - log_s.max(1).values
    hi = target - log_s.min(1).values
    t = target - log_s.mean(1)
    for i in range(iters):
        share = torch.sigmoid(t[:, None] + log_s)
        f = share.mean(1) - mu
        done = f.abs() <= tol * mu
        if (i + 1) % check_every == 0 and bool(done.all()):
            break
        lo = torch.where(f < 0, t, lo)
        hi = torch.where(f > 0, t, hi)
        slope = (share * (1 - share)).mean(1)
        step = t - f / slope.clamp_min(1e-30)
        inside = (step > lo) & (step < hi)
        t = torch.where(
            done,
            torch.minimum(torch.maximum(step, lo), hi),
            torch.where(inside, step, 0.5 * (lo + hi)),
        )
    return t


def transport_plan(
    costs: torch.Tensor, mu: float, gamma: float, iters: int, tol: float
) -> torch.Tensor:
    """costs (B, m, n) -> plan (B, m + 1, n): row 0 the residual rho, rows 1..m the plan pi."""
    n = costs.shape[-1]
    logits = -gamma * costs  # log K
    log_s = torch.logsumexp(logits, dim=1)  # log sum_k K_ki, (B, n)
    if mu >= 1.0:
        # Everything is transported: rho = 0 and pi_ki = (1/n) softmax_k(-gamma c_ki).
        rho = torch.zeros_like(log_s)
        pi = torch.softmax(logits, dim=1) / n
    else:
        t = _solve_log_nu(log_s, mu, iters, tol)
        share = torch.sigmoid(t[:, None] + log_s)  # 1 - n rho_i
        rho = (1.0 - share) / n
        pi = torch.softmax(logits, dim=1) * (share / n)[:, None, :]
    return torch.cat([rho[:, None, :], pi], dim=1)


class PartialTransport(torch.autograd.Function):
    """``transport_plan`` with the analytical backward (module docstring)."""

    @staticmethod
    def forward(ctx, costs, mu: float, gamma: float, iters: int, tol: float):
        plan = transport_plan(costs, mu, gamma, iters, tol)
        ctx.save_for_backward(plan)
        ctx.mu, ctx.gamma = mu, gamma
        return plan

    @staticmethod
    def backward(ctx, grad_plan):
        (plan,) = ctx.saved_tensors
        n = plan.shape[-1]
        g = plan * grad_plan  # X * G
        g_rho, g_pi = g[:, 0], g[:, 1:]
        rho, pi = plan[:, 0], plan[:, 1:]
        s = g_rho + g_pi.sum(1)  # (B, n)
        if ctx.mu >= 1.0:
            lam_rho = torch.zeros_like(rho)
        else:
            num = g_rho.sum(1) - n * (s * rho).sum(1)
            den = 1.0 - ctx.mu - n * (rho * rho).sum(1)
            lam_rho = (-num / den)[:, None] * rho
        grad_costs = -ctx.gamma * (g_pi - n * pi * (s + lam_rho)[:, None, :])
        return grad_costs, None, None, None, None


def partial_transport(
    costs: torch.Tensor, mu: float, gamma: float, iters: int = 50, tol: float = 1e-7
) -> torch.Tensor:
    """The entropic partial transport plan, differentiable with the analytical backward.

    costs (B, m, n): m prototypes, n locations. Returns (B, m + 1, n) whose row 0 is the
    residual mass and rows 1..m the mass sent to each prototype; every column sums to 1/n and
    rows 1..m sum to mu. Solved in float32 at least (float64 stays float64), also under
    autocast.
    """
    if costs.ndim != 3:
        raise ValueError(f"partial_transport: costs must be (B, m, n), got {tuple(costs.shape)}")
    if not 0.0 < mu <= 1.0:
        raise ValueError(f"partial_transport: mu must be in (0, 1], got {mu}")
    dtype = torch.float64 if costs.dtype == torch.float64 else torch.float32
    with torch.autocast(costs.device.type, enabled=False):
        if torch.jit.is_tracing():  # an export: plain ops, all ``iters`` solver steps
            return transport_plan(costs.to(dtype), float(mu), float(gamma), int(iters), 0.0)
        return PartialTransport.apply(
            costs.to(dtype), float(mu), float(gamma), int(iters), float(tol)
        )


class GSP(Pooling):
    """Generalized sum pooling, a drop-in for GAP (``pooling: {name: gsp}``).

    Args:
        in_channels: channels of the feature map (given by the model).
        num_prototypes: m (64 below 1,000 training classes, 128 above, in the paper).
        mu: transport ratio, the share of the mass pooled (0.3 in the paper; 1 is GAP).
        gamma: entropy weight 1/epsilon (5 with pair losses, 0.5 with proxy losses).
        iters, tol: solver iterations (at most) and tolerance on the transported mass.
        reduction: avg (the paper's sum pooling), max or gem over the re-weighted map.
        gem_p: exponent of the gem reduction.
        init: how the prototypes are picked by greedy k-center before the first step:
            "proxies" (rows of the loss's proxies or classifier), "embeddings" (normalised GAP
            embeddings of ``init_batches`` training batches, as the MLRC framework does), or
            "auto" (proxies when the loss has at least m of them, else embeddings).
        embedding_dim: dimension of the prototypes (the embedding head's output; set by the
            model).
    The forward needs the head's linear map (``projection``) to compute the costs.
    """

    def __init__(
        self,
        in_channels: int,
        num_prototypes: int = 64,
        mu: float = 0.3,
        gamma: float = 5.0,
        iters: int = 50,
        tol: float = 1e-6,
        reduction: str = "avg",
        gem_p: float = 3.0,
        init: str = "auto",
        init_batches: int = 8,
        embedding_dim: int = 512,
    ):
        super().__init__()
        if not 0.0 < mu <= 1.0:
            raise ConfigError(
                f"model.pooling.params.mu: the transport ratio must be in (0, 1], got {mu}"
            )
        if reduction not in ("avg", "max", "gem"):
            raise ConfigError(
                f"model.pooling.params.reduction: expected avg, max or gem, got {reduction!r}"
            )
        if init not in ("auto", "proxies", "embeddings"):
            raise ConfigError(
                f"model.pooling.params.init: expected auto, proxies or embeddings, got {init!r}"
            )
        self.init, self.init_batches = init, init_batches
        if num_prototypes < 1:
            raise ConfigError("model.pooling.params.num_prototypes must be >= 1")
        self.mu, self.gamma, self.iters, self.tol = mu, gamma, iters, tol
        self.reduction, self.gem_p = reduction, gem_p
        self.prototypes = nn.Parameter(torch.randn(num_prototypes, embedding_dim) * 0.01)
        # Set once the prototypes are picked by greedy k-center; saved in checkpoints.
        self.register_buffer("initialized", torch.tensor(False))
        self._known_initialized = False  # host copy of a True flag: no device read per step

    produces_attributes = True
    uses_projection = True  # costs in the embedding space: needs the head's linear map

    def wants_initialization(self) -> bool:
        """Asked at every training step: the buffer (on the GPU) is read only until it is
        True, since reading it is a host-device synchronisation."""
        if not self._known_initialized:
            self._known_initialized = bool(self.initialized)
        return not self._known_initialized

    def _load_from_state_dict(self, *args, **kwargs):
        self._known_initialized = False  # a checkpoint may hold either value
        super()._load_from_state_dict(*args, **kwargs)

    def candidate_source(self, num_class_rows: Optional[int]) -> str:
        """proxies: the loss's class rows; embeddings: GAP embeddings; auto: the class rows when
        there are at least m of them."""
        if self.init == "proxies" or (
            self.init == "auto"
            and num_class_rows is not None
            and num_class_rows >= len(self.prototypes)
        ):
            if num_class_rows is None:
                raise ConfigError(
                    "model.pooling.params.init: proxies, but the loss has no "
                    "proxies or class weights"
                )
            return "class_rows"
        return "embeddings"

    def initialize(self, candidates: torch.Tensor) -> None:
        self.initialize_prototypes(candidates)

    @torch.no_grad()
    def initialize_prototypes(self, candidates: torch.Tensor) -> None:
        """Pick m prototypes among ``candidates`` (N, D) by greedy k-center, normalised."""
        candidates = lipschitz_normalize(candidates.float())
        idx = greedy_k_center(candidates, len(self.prototypes))
        self.prototypes.copy_(candidates[idx].to(self.prototypes))
        self.initialized.fill_(True)
        self._known_initialized = True

    def costs(self, u: torch.Tensor) -> torch.Tensor:
        """c_ki = ||n(w_k) - n(u_i)||, u (B, n, D) -> (B, m, n)."""
        w = lipschitz_normalize(self.prototypes).to(u.dtype)
        un = lipschitz_normalize(u)
        sq = (
            (w * w).sum(-1)[None, :, None]
            + (un * un).sum(-1)[:, None, :]
            - 2.0 * torch.einsum("kd,bnd->bkn", w, un)
        )
        return sq.clamp_min(1e-12).sqrt()

    def forward(self, x: torch.Tensor, projection: Optional[nn.Linear] = None) -> PoolingOutput:
        if projection is None:
            raise ValueError("GSP needs the embedding head's linear map (projection=...)")
        b, c, h, w = x.shape
        feats = x.flatten(2).transpose(1, 2)  # (B, n, C)
        # projection, costs and plan in float32 also under mixed precision: a cost off by
        # bfloat16's 2^-9 relative error moves exp(-gamma c) by gamma times as much
        with torch.autocast(x.device.type, enabled=False):
            u = projection(feats.float() if feats.dtype != torch.float64 else feats)
            plan = partial_transport(self.costs(u), self.mu, self.gamma, self.iters, self.tol)
        n = h * w
        rho, pi = plan[:, 0], plan[:, 1:]
        weights = (1.0 - n * rho) / self.mu  # (B, n), mean 1
        attributes = pi.sum(-1) / self.mu  # (B, m), sums to 1
        weighted = feats * weights.to(feats.dtype)[..., None]
        if self.reduction == "avg":
            pooled = weighted.mean(1)
        elif self.reduction == "max":
            pooled = weighted.amax(1)
        else:
            pooled = weighted.clamp_min(1e-6).pow(self.gem_p).mean(1).pow(1.0 / self.gem_p)
        return PoolingOutput(pooled, weights=weights, attributes=attributes)
