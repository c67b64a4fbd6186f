"""Record-level DP-SGD's settings from the federation: the noise calibrated to a target epsilon for every
site, and the bound on a DP-SGD update that secure aggregation's range is derived from."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from confide.client.dpsgd import record_accountant
from confide.client.trainer import ClientOptimizer
from confide.core import Plan
from confide.errors import ConfigError
from confide.privacy.record import (
    ADAM_BETAS,
    ADAM_MARGIN,
    adam_update_bound,
    record_noise_for,
    record_update_bound,
)

SIZES = (300, 640, 2000)
"""Window counts of three sites: the smallest samples at the largest rate, the largest takes most steps."""


def epsilon_at(n: int, noise: float, batch: int, rounds: int, max_steps: int | None = None) -> float:
    """The epsilon a site reports (confide.client.site.fit_private's accountant) after ``rounds`` rounds."""
    accountant = record_accountant(n, 1.0 / (10 * n))
    steps = Plan(round=1, batch_size=batch, max_steps=max_steps).local_steps(n)
    accountant.spend(noise, min(1.0, batch / n), rounds * steps)
    return accountant.epsilon()


def test_the_calibrated_noise_keeps_every_site_within_the_target_and_is_tight_for_the_smallest() -> None:
    noise, by = record_noise_for(8.0, SIZES, batch_size=32, epochs=1, max_steps=None, rounds=5)
    assert by == 300
    assert float(f"{noise:.4g}") == noise  # rounded up to 4 significant digits, the value used
    spent = [epsilon_at(n, noise, 32, 5) for n in SIZES]
    assert all(e <= 8.0 for e in spent)
    assert spent[0] > 7.9  # the smallest site's budget is used, not wasted
    assert epsilon_at(300, noise * 0.99, 32, 5) > 8.0


def test_a_larger_site_that_needs_more_noise_sets_it() -> None:
    # Both sites smaller than the batch: every window in every step (q = 1), one step a round; the larger
    # site's delta, 1 / (10 n), is the smaller, so at equal noise its epsilon is the larger.
    noise, by = record_noise_for(2.0, (5, 10), batch_size=10, epochs=1, max_steps=None, rounds=3)
    assert by == 10
    assert epsilon_at(5, noise, 10, 3) < epsilon_at(10, noise, 10, 3) <= 2.0
    with pytest.raises(ConfigError, match="record_target_epsilon must be a finite number > 0"):
        record_noise_for(0.0, SIZES, 32, 1, None, 5)


def test_the_update_bound_by_hand() -> None:
    # 100 windows, batch 10: q = 0.1, expected batch 10, 10 steps; lr 0.5, C 1, z 1.
    sampled = 10 + 8 * math.sqrt(10 * 0.9 / 10)
    noised = 8 * 1.0 * math.sqrt(10) / 10
    plain = record_update_bound(0.5, 1.0, 1.0, 0.0, 10, 1, None, [100])
    assert plain == pytest.approx(0.5 * (sampled + noised))
    assert record_update_bound(0.5, 1.0, 1.0, 0.5, 10, 1, None, [100]) == pytest.approx(2 * plain)
    # A site smaller than the batch takes every window every step (no sampling term) and divides by its 4.
    small = record_update_bound(0.5, 1.0, 1.0, 0.0, 10, 1, None, [4])
    assert small == pytest.approx(0.5 * (1 + 8 * 1.0 / 4))
    # The largest of the sites' bounds; the step cap bounds it whatever the site's size.
    assert record_update_bound(0.5, 1.0, 1.0, 0.0, 10, 1, None, [4, 100]) == pytest.approx(plain)
    capped = record_update_bound(0.5, 1.0, 1.0, 0.0, 10, 1, 3, [100, 10**6])
    largest = 0.5 * (3 + 8 * math.sqrt(3 * (1 - 1e-5) / 10) + 8 * math.sqrt(3) / 10)
    assert capped == pytest.approx(largest)


def adam_moves(gradients: np.ndarray, learning_rate: float, weight_decay: float = 0.0) -> np.ndarray:
    """How far the sites' Adam moves each coordinate, step after step, fed these gradients (steps, d)."""
    weights = torch.nn.Parameter(torch.zeros(gradients.shape[1], dtype=torch.float64))
    optimizer = ClientOptimizer("adam", weight_decay=weight_decay).build([weights])
    assert optimizer.param_groups[0]["betas"] == ADAM_BETAS
    for group in optimizer.param_groups:
        group["lr"] = learning_rate
    moved = []
    for gradient in gradients:
        weights.grad = torch.from_numpy(gradient)
        optimizer.step()
        moved.append(weights.detach().numpy().copy())
    return np.abs(np.array(moved))


def test_adams_update_stays_within_its_bound_and_the_worst_gradients_reach_it() -> None:
    steps, learning_rate = 12, 0.01
    beta1, beta2 = ADAM_BETAS
    bound = adam_update_bound(learning_rate, batch_size=10, epochs=1, max_steps=None, windows=[steps * 10])
    margin = 1 + ADAM_MARGIN  # room for the float32 rounding of local minus global weights
    assert adam_update_bound(learning_rate, 10, 1, None, [10]) == pytest.approx(learning_rate * margin)
    rng = np.random.default_rng(0)
    noisy = rng.standard_normal((steps, 500)) * np.exp(rng.uniform(-8, 8, (steps, 500)))
    assert adam_moves(noisy, learning_rate, weight_decay=0.5).max() <= bound
    # Each step's worst case: gradients growing as (b2 / b1)^s, the same sign throughout, make Cauchy-Schwarz
    # an equality; the bound sums these per-step worst cases, so no single sequence reaches the sum, but each
    # step alone reaches its term.
    last = [(beta2 / beta1) ** s for s in range(steps)]
    worst = adam_moves(np.array(last)[:, None], learning_rate)
    final_step = worst[-1, 0] - worst[-2, 0]
    previous = adam_update_bound(learning_rate, 10, 1, None, [(steps - 1) * 10])
    assert final_step == pytest.approx((bound - previous) / margin, rel=1e-6)
