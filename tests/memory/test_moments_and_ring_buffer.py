"""The memory's pieces: moment matching, the Kalman filters, the ring buffer."""

import pytest
import torch

from dml.memory import (
    EmbeddingRingBuffer,
    MomentKalmanFilter,
    ScalarKalman,
    batch_moments,
    moment_match,
)


# --- moment matching ------------------------------------------------------------------------
def test_moment_match_gives_the_batch_moments():
    g = torch.Generator().manual_seed(0)
    memory = 3 * torch.randn(500, 16, generator=g, dtype=torch.float64) + 2
    batch = 0.5 * torch.randn(32, 16, generator=g, dtype=torch.float64) - 1
    out = moment_match(memory, batch)
    assert torch.allclose(out.mean(0), batch.mean(0), atol=1e-5)
    assert torch.allclose(out.std(0, unbiased=False), batch.std(0, unbiased=False), atol=1e-5)


def test_moment_match_is_identity_when_moments_agree():
    g = torch.Generator().manual_seed(1)
    memory = torch.randn(200, 8, generator=g, dtype=torch.float64)
    assert torch.allclose(moment_match(memory, memory.clone()), memory, atol=1e-10)


# --- Kalman filter --------------------------------------------------------------------------
def test_kalman_two_steps_by_hand():
    kf = ScalarKalman(dim=1, process_noise=0.5)
    # step 1 initialises: x = 2, P = R = 1
    assert kf.update(torch.tensor([2.0]), torch.tensor([1.0])).item() == pytest.approx(2.0)
    # step 2: P- = 1 + 0.5 = 1.5, K = 1.5 / (1.5 + 1) = 0.6, x = 2 + 0.6 (4 - 2) = 3.2,
    # P = 0.4 * 1.5 = 0.6
    assert kf.update(torch.tensor([4.0]), torch.tensor([1.0])).item() == pytest.approx(3.2)
    assert kf.p.item() == pytest.approx(0.6)


def test_kalman_without_process_noise_is_the_running_average():
    g = torch.Generator().manual_seed(2)
    ys = torch.randn(50, 4, generator=g, dtype=torch.float64)
    kf = ScalarKalman(dim=4, process_noise=0.0).double()
    for t, y in enumerate(ys, start=1):
        x = kf.update(y, torch.full((4,), 0.3, dtype=torch.float64))
        assert torch.allclose(x, ys[:t].mean(0), atol=1e-12)


def test_moment_filter_converges_on_a_stationary_stream():
    g = torch.Generator().manual_seed(3)
    true_mean, true_std = torch.linspace(-1, 1, 8), torch.linspace(0.5, 2, 8)
    kf = MomentKalmanFilter(8, process_noise_mean=1e-6, process_noise_var=1e-6)
    for _ in range(400):
        mean, var = kf.update(true_mean + true_std * torch.randn(16, 8, generator=g))
    assert torch.allclose(mean, true_mean, atol=0.05)
    # the expected population variance of batches of 16: (15 / 16) sigma^2
    assert torch.allclose(var.sqrt(), true_std * (15 / 16) ** 0.5, atol=0.05)


# --- ring buffer ----------------------------------------------------------------------------
def test_ring_buffer_order_wraparound_and_label_alignment():
    buf = EmbeddingRingBuffer(size=5, dim=1)
    for start in (0, 3, 6):  # batches of 3: 0 1 2 | 3 4 5 | 6 7 8
        values = torch.arange(start, start + 3)
        buf.enqueue(values[:, None].float(), values * 10)
    emb, labels = buf.valid()
    assert emb[:, 0].tolist() == [4, 5, 6, 7, 8]  # oldest first, the oldest 4 overwritten
    assert labels.tolist() == [40, 50, 60, 70, 80]
    assert len(buf) == 5 and int(buf.pointer) == 9 % 5
    big = torch.arange(100, 107)
    buf.enqueue(big[:, None].float(), big)  # larger than the buffer: newest 5 kept
    assert buf.valid()[1].tolist() == [102, 103, 104, 105, 106]


def test_plain_and_adaptive_xbn_target_the_same_variance():
    """Both modes match the population variance: the filter, on a stationary stream of small
    batches, converges to the mean of the batches' population variances (ratio 1), not to the
    unbiased one (ratio B / (B - 1) = 1.067 at B = 16)."""
    g = torch.Generator().manual_seed(5)
    kf = MomentKalmanFilter(4, process_noise_mean=0.0, process_noise_var=0.0)
    plain = []
    for _ in range(2000):
        batch = torch.randn(16, 4, generator=g, dtype=torch.float64)
        _, var = kf.update(batch)
        plain.append(batch_moments(batch)[1])
    ratio = var.double() / torch.stack(plain).mean(0)
    assert torch.allclose(ratio, torch.ones(4, dtype=torch.float64), atol=0.01)
