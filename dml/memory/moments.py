"""XBN's moment matching and the adaptive (Kalman-filtered) estimate of the batch moments.

moment_match (docs/methods/xbn.md, "XBN"), per dimension d:
    z'_d = sigma_B,d * (z_d - mu_M,d) / sigma_M,d + mu_B,d
so that the memory's first and second moments equal the current batch's.

The adaptive variant treats each batch's per-dimension mean and variance as noisy
observations of the true moments and filters them over steps with scalar Kalman filters
(per dimension, random-walk process noise q):
    predict:  P <- P + q
    update:   K = P / (P + R),  x <- x + K (y - x),  P <- (1 - K) P
with observation noise R = var / B for the mean and R = 2 var^2 (B - 1) / B^2 for the
variance (the sampling variances of the mean and of the population variance of B Gaussian
samples), var being the filter's prior estimate. The variance is the population one, as in the
plain match to a batch, so both modes target the same moments.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn


def batch_moments(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and (population) variance of x (N, D)."""
    mean = x.mean(0)
    return mean, (x - mean).pow(2).mean(0)


def _affine(memory: torch.Tensor, target, eps: float):
    """Per-dimension (scale, shift) with scale * memory + shift having the target moments."""
    mu_b, var_b = target
    var_m, mu_m = torch.var_mean(memory, dim=0, unbiased=False)
    scale = (var_b.clamp_min(0) + eps).sqrt() / (var_m + eps).sqrt()
    return scale, mu_b - mu_m * scale


def moment_match(
    memory: torch.Tensor,
    batch: torch.Tensor = None,
    eps: float = 1e-12,
    target: Tuple[torch.Tensor, torch.Tensor] = None,
) -> torch.Tensor:
    """memory (M, D) transformed so that its per-dimension mean and standard deviation equal
    those of ``batch`` (N, D), or the given ``target`` (mean, variance)."""
    scale, shift = _affine(memory, batch_moments(batch) if target is None else target, eps)
    return torch.addcmul(shift, memory, scale)


class ScalarKalman(nn.Module):
    """Independent scalar Kalman filters, one per dimension, for a random-walk state.

    State: estimate x (D,) and its error variance P (D,). The first observation initialises
    x = y, P = R. Saved in checkpoints (buffers).
    """

    def __init__(self, dim: int, process_noise: float):
        super().__init__()
        if process_noise < 0:
            raise ValueError(f"process noise must be >= 0, got {process_noise}")
        self.q = process_noise
        self.register_buffer("x", torch.zeros(dim))
        self.register_buffer("p", torch.zeros(dim))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        y, r = y.to(self.x), r.to(self.x)
        if int(self.steps) == 0:
            self.x.copy_(y)
            self.p.copy_(r)
        else:
            p_pred = self.p + self.q
            gain = p_pred / (p_pred + r).clamp_min(1e-30)
            self.x.add_(gain * (y - self.x))
            self.p.copy_((1 - gain) * p_pred)
        self.steps.add_(1)
        return self.x.clone()


class MomentKalmanFilter(nn.Module):
    """Filtered per-dimension mean and variance of a stream of batches (adaptive XBN)."""

    def __init__(self, dim: int, process_noise_mean: float = 1e-5, process_noise_var: float = 1e-6):
        super().__init__()
        self.mean = ScalarKalman(dim, process_noise_mean)
        self.var = ScalarKalman(dim, process_noise_var)

    @torch.no_grad()
    def update(self, batch: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Filtered (mean, population variance): the same variance definition as plain XBN's
        match to the batch, so that both modes target the same moments."""
        b = len(batch)
        mean, var = batch_moments(batch.detach().float())
        # Observation noise from the filter's prior variance, not from this batch: a noise
        # level computed from the observation itself would favour low-variance batches and
        # bias the estimate down.
        prior_var = var if int(self.var.steps) == 0 else self.var.x.clamp_min(1e-12)
        mean_f = self.mean.update(mean, prior_var / b)
        var_f = self.var.update(var, 2 * prior_var.pow(2) * max(b - 1, 1) / b**2)
        return mean_f, var_f.clamp_min(0)
