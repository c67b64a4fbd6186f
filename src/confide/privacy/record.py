"""Record-level DP-SGD's settings that follow from the federation: the noise multiplier for a target epsilon,
and a bound on every coordinate of a site's update, which secure aggregation's fixed-point range needs.

Both are pure functions of the sites' window counts and the local schedule (batch size, epochs, local step
cap, rounds); :mod:`confide.runtime.stack` applies them to a run. The schedule is the one
:class:`~confide.client.dpsgd.DPSGD` follows: each of a site's steps samples its n windows by Poisson
sampling at rate q = min(1, batch / n), clips each window's gradient to L2 norm C, adds N(0, (z C)^2) to
their sum and divides by the expected batch size q n; a site takes ``epochs x ceil(n / batch)`` steps a round,
at most ``max_steps``. A site accounts its own records with RDP at delta 1 / (10 n)
(:func:`confide.client.dpsgd.record_accountant`, :func:`confide.client.site.fit_private`), so the
calibration uses the same.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from confide.core import Plan
from confide.errors import ConfigError
from confide.privacy.accountant import PrivacyAccountant, calibrate_noise, round_up
from confide.privacy.policy import NOISE_DIGITS

ACCOUNTING = "rdp"
"""How a site accounts its records under DP-SGD (its reported epsilon); the calibration matches it."""
ADAM_BETAS = (0.9, 0.999)
"""Adam's (beta1, beta2): torch's defaults, which the sites' Adam uses (client.trainer.ClientOptimizer)."""
DEVIATIONS = 8.0
"""Standard deviations of room left for the random parts of an update (the batch sizes Poisson sampling
draws, the noise), as site-level DP's range leaves for its noise: beyond 8 nothing is left to clip."""


def record_delta(windows: int) -> float:
    """A site's delta for its own records: 1 / (10 x its windows)."""
    return 1.0 / (10 * max(windows, 1))


def record_noise_for(
    target_epsilon: float,
    windows: Iterable[int],
    batch_size: int,
    epochs: int,
    max_steps: int | None,
    rounds: int,
) -> tuple[float, int]:
    """The least noise multiplier (rounded up to :data:`~confide.privacy.policy.NOISE_DIGITS` significant
    digits, the value used) with which every site, taking part in all ``rounds`` rounds, spends at most
    ``target_epsilon`` on its records at its delta 1 / (10 n); and the window count of the site it was set by.

    Calibrated for the site with the fewest windows (the largest sampling rate), then checked at every other
    site size, since a larger site also takes more steps; the largest multiplier any site needs is returned.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ConfigError(f"privacy.record_target_epsilon must be a finite number > 0 (got {target_epsilon})")
    sizes = sorted({n for n in windows if n > 0})
    if not sizes:
        raise ConfigError("privacy.record_target_epsilon: no site has a training window to calibrate for")
    plan = Plan(round=1, epochs=epochs, max_steps=max_steps, batch_size=batch_size)

    def spent(n: int, z: float) -> float:
        accountant = PrivacyAccountant(ACCOUNTING, "poisson", n, record_delta(n))
        accountant.spend(z, min(1.0, batch_size / n), rounds * plan.local_steps(n))
        return accountant.epsilon()

    def calibrated(n: int) -> float:
        steps = rounds * plan.local_steps(n)
        z = calibrate_noise(
            target_epsilon, record_delta(n), steps, min(1.0, batch_size / n), n, "poisson", ACCOUNTING
        )
        return round_up(z, NOISE_DIGITS)

    noise, by = calibrated(sizes[0]), sizes[0]
    for n in sizes[1:]:
        if spent(n, noise) > target_epsilon:
            noise, by = calibrated(n), n
    return noise, by


def record_update_bound(
    learning_rate: float,
    clip: float,
    noise: float,
    momentum: float,
    batch_size: int,
    epochs: int,
    max_steps: int | None,
    windows: Iterable[int],
) -> float:
    """A bound on every coordinate of a DP-SGD update (local minus global weights) under plain SGD with
    momentum (no weight decay), for the largest of the sites with these window counts.

    A site with n windows takes k steps at expected batch b = q n. Step t moves the weights by lr / b times
    the noised sum of its |B_t| clipped gradients; momentum mu spreads each step's gradient over the later
    steps with weights summing to at most 1 / (1 - mu). So the update is lr / ((1 - mu) b) times
    (clipped part + noise part), where

    - the clipped part has L2 norm, hence every coordinate, at most C S, with S = sum of |B_t| drawn
      Binomial(k n, q): S <= k b + 8 sqrt(k b (1 - q)) but with negligible probability;
    - the noise part is, per coordinate, Gaussian with standard deviation at most z C sqrt(k): 8 of those.

    Hence |coordinate| <= lr C / (1 - mu) x (k + 8 sqrt(k (1 - q) / b) + 8 z sqrt(k) / b). It grows with k,
    and the noise term with 1 / b (a site smaller than the batch divides by its n), so every site size is
    tried and the largest bound kept.
    """
    plan = Plan(round=1, epochs=epochs, max_steps=max_steps, batch_size=batch_size)
    worst = 0.0
    for n in {n for n in windows if n > 0}:
        rate = min(1.0, batch_size / n)
        expected = rate * n
        steps = plan.local_steps(n)
        sampled = steps + DEVIATIONS * math.sqrt(steps * (1.0 - rate) / expected)
        noised = DEVIATIONS * noise * math.sqrt(steps) / expected
        worst = max(worst, sampled + noised)
    return learning_rate * clip / (1.0 - momentum) * worst


ADAM_MARGIN = 2.0**-10
"""Relative room above Adam's bound for the float32 rounding of local minus global weights."""


def adam_update_bound(
    learning_rate: float,
    batch_size: int,
    epochs: int,
    max_steps: int | None,
    windows: Iterable[int],
    betas: tuple[float, float] = ADAM_BETAS,
) -> float:
    """A bound on every coordinate of an update Adam (fresh each round) makes in the largest site's steps,
    whatever its gradients: noised, clipped or not, with L2 weight decay folded into them or not.

    Adam's step t moves a coordinate by lr |m_t| / (1 - b1^t) / (sqrt(v_t / (1 - b2^t)) + eps), with
    m_t = (1 - b1) sum_s b1^(t-s) g_s and v_t = (1 - b2) sum_s b2^(t-s) g_s^2. By Cauchy-Schwarz,
    |sum_s b1^(t-s) g_s| <= sqrt(sum_j (b1^2 / b2)^j) sqrt(v_t / (1 - b2)) (for b1^2 < b2), so the step is at
    most lr A_t with A_t = (1 - b1) sqrt(S_t) sqrt(1 - b2^t) / ((1 - b1^t) sqrt(1 - b2)), S_t the sum of t
    terms (b1^2 / b2)^j; the bound is attained when the gradients grow as (b1 / b2)^-s. A_1 = 1, and with
    the default betas the first 10 steps add up to 10.2 (Kingma and Ba 2015, section 2.1, give the usual
    approximate form of this bound).
    """
    beta1, beta2 = betas
    ratio = beta1 * beta1 / beta2
    if not (0 <= beta1 < 1 and 0 < beta2 < 1 and ratio < 1):
        raise ConfigError(f"Adam's step has no bound for betas {betas}: it needs beta1^2 < beta2")
    plan = Plan(round=1, epochs=epochs, max_steps=max_steps, batch_size=batch_size)
    steps = max((plan.local_steps(n) for n in windows if n > 0), default=0)
    total = 0.0
    for t in range(1, steps + 1):
        terms = (1.0 - ratio**t) / (1.0 - ratio)
        total += (
            (1 - beta1) * math.sqrt(terms) * math.sqrt(1 - beta2**t) / ((1 - beta1**t) * math.sqrt(1 - beta2))
        )
    # Adam's first steps move every coordinate by almost exactly lr, so the bound is reached, and the update
    # (local minus global weights, in float32) can round past it: a margin of 2^-10 covers that rounding for
    # weights up to about 100 times the update.
    return learning_rate * total * (1.0 + ADAM_MARGIN)
