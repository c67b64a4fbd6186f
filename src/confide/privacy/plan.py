"""What site-level DP will do to a run, before it trains: the noise against the signal, and the epsilons.

`confide dp plan CONFIG` prints this, and `confide run` prints its warning. The numbers follow from the DP
policy (:class:`~confide.privacy.policy.SiteDP`), the number of rounds and the model's size alone:

* the noise on one round's mean update, per coordinate and as a norm, against the clip norm C, which bounds
  how far the mean of clipped updates can move (its signal);
* the noise left in the model after all rounds: sqrt(rounds) times a round's with fresh noise, much less
  with DP-FTRL's correlated noise (:func:`~confide.privacy.matrix.model_noise`), more with server momentum;
* epsilon against a server that knows who took part (the worst site: one in as many rounds as it may take
  part in), and against someone who sees the models but not who took part (amplified by sampling; not
  claimed under DP-FTRL).

When the run cannot learn. The noise-to-signal ratio compares the noise in the model after R rounds, as a
norm, with sqrt(R) C, what R rounds of mean updates of norm C pointing every which way would add up to
(times 1 / (1 - beta) under server momentum beta, which adds up the updates as it adds up the noise): with
fresh noise and plain SGD it is the noise of one round's mean over C. The demo federation learns at 11
(755 sites, 50 a round, z = 1.15 under distributed DP: accuracy 0.32 against 0.40 without DP); a federation
of 14 sites, 8 a round, central DP at epsilon 10 (z = 4.87) was over 250 and diverged. Above
:data:`CANNOT_LEARN` the plan says the run cannot learn, and what to change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from confide.privacy.accountant import PrivacyAccountant, gaussian_epsilon
from confide.privacy.matrix import gram, inverse_coefficients, max_participations, model_noise
from confide.privacy.policy import SiteDP

CANNOT_LEARN = 50.0
"""The noise-to-signal ratio above which the plan warns that a run cannot learn (see the module's text)."""


@dataclass(frozen=True)
class NoisePlan:
    """The noise and privacy a run's site-level DP will have, worked out before it trains."""

    description: str
    size: int
    """Parameters that travel (the update's length)."""
    rounds: int
    sites_per_round: int
    population: int
    clip_norm: float
    noise_multiplier: float
    round_std: float
    """Standard deviation of the noise on one round's mean update, per coordinate."""
    model_std: float
    """Standard deviation of the noise left in the model after all rounds, per coordinate (server step 1)."""
    fresh_model_std: float
    """The same with fresh noise calibrated to the same budget (equal to model_std under DP-FedAvg)."""
    participations: int
    """The most rounds one site may take part in."""
    epsilon_knows_sample: float
    epsilon_secret_sample: float | None
    """None where no amplification is claimed (DP-FTRL)."""
    delta: float
    momentum: float = 0.0
    """The server's momentum (beta), which adds up the noise and the updates alike in the model."""

    @property
    def round_noise_norm(self) -> float:
        return self.round_std * math.sqrt(self.size)

    @property
    def noise_to_signal(self) -> float:
        """The noise in the model after all rounds, as a norm, over sqrt(rounds) x clip norm x the gain
        the server's momentum gives every update (1 / (1 - beta), 1 without momentum)."""
        signal = math.sqrt(self.rounds) * self.clip_norm / (1.0 - self.momentum)
        return self.model_std * math.sqrt(self.size) / signal

    def warning(self) -> str | None:
        """A plain warning when the run cannot learn, naming what to change; None when it can."""
        ratio = self.noise_to_signal
        if ratio <= CANNOT_LEARN:
            return None
        changes = [
            f"more sites per round (the noise on the mean falls as 1 / sites: {self.sites_per_round} now)",
            "record-level DP instead (privacy.dp = 'none', privacy.record_dp = true): few sites with many "
            "records each is its case, since each site's noise is averaged over its records and then over "
            "the sites",
            "a larger budget (privacy.target_epsilon)",
        ]
        if self.fresh_model_std == self.model_std and self.rounds > 1:
            changes.append("correlated noise (privacy.dp = 'central', privacy.mechanism = 'dp-ftrl')")
        return (
            f"this run cannot learn: the noise left in the model is {ratio:.0f} times what {self.rounds} "
            f"rounds of clipped updates can move it (runs learn below about {CANNOT_LEARN:.0f}; the demo "
            "is at 11). Change one of: " + "; ".join(changes)
        )

    def lines(self) -> list[str]:
        """The plan as plain lines, one fact each."""
        out = [
            f"{self.population:,} sites, {self.sites_per_round} a round, {self.rounds} rounds, "
            f"{self.size:,} parameters in each update",
            self.description,
            f"noise on one round's mean update: std {self.round_std:.4g} per coordinate, "
            f"{self.round_noise_norm:.4g} as a norm, {self.round_noise_norm / self.clip_norm:.3g} times the "
            f"clip norm {self.clip_norm:g} (the most the mean of clipped updates can move)",
            f"noise left in the model after {self.rounds} rounds (server step 1): std {self.model_std:.4g} "
            "per coordinate"
            + (
                f", against {self.fresh_model_std:.4g} with fresh noise at the same epsilon"
                if self.fresh_model_std != self.model_std
                else ""
            ),
            f"noise-to-signal ratio: {self.noise_to_signal:.3g} (the noise in the model over what "
            f"{self.rounds} rounds of clipped updates add up to; the demo learns at 11)",
            f"epsilon at delta {self.delta:.2e} against a server that knows who took part (a site in "
            f"{self.participations} rounds): {self.epsilon_knows_sample:.3f}",
        ]
        if self.epsilon_secret_sample is None:
            out.append(
                "epsilon against someone who does not know who took part: the same (no amplification by "
                "sampling is claimed)"
            )
        else:
            out.append(
                "epsilon against someone who sees the models but not who took part (amplified by "
                f"sampling, if all {self.rounds} rounds run): {self.epsilon_secret_sample:.3f}"
            )
        warning = self.warning()
        out.append(f"WARNING: {warning}" if warning else "verdict: the noise leaves this run room to learn")
        return out


def plan(dp: SiteDP, rounds: int, size: int, optimizer: str = "sgd", beta1: float = 0.0) -> NoisePlan:
    """The plan of ``rounds`` rounds of ``dp`` on updates of ``size`` values, with the server's optimizer
    (its momentum decides how the noise adds up in the model)."""
    momentum = beta1 if optimizer == "momentum" else 0.0
    m = dp.sites_per_round
    sensitivity = dp.sites.sensitivity
    z = dp.noise_multiplier
    mean_std = dp.update_noise * dp.clip_norm / m
    if dp.coefficients is not None:
        bands = dp.coefficients.size
        k = max_participations(rounds, bands)
        cap = _cap(dp)
        k = min(k, cap) if cap else k
        g0 = float(gram(dp.coefficients)[0])
        precision = k * g0 * (sensitivity / z) ** 2 if z > 0 else math.inf
        epsilon = gaussian_epsilon(precision, dp.delta, dp.accountant.method)
        model = float(model_noise(dp.coefficients, rounds, momentum)[-1]) * mean_std
        # One round's share of the correlated noise, once the stream is long: C^-1's coefficients squared.
        per_round = float(np.sqrt(np.sum(inverse_coefficients(dp.coefficients, rounds) ** 2))) * mean_std
        # Fresh noise at the same epsilon for a site in k rounds: z / sqrt(G(0)).
        fresh = float(model_noise(None, rounds, momentum)[-1]) * mean_std / math.sqrt(g0)
        amplified = None
    else:
        cap = _cap(dp)
        k = cap or rounds
        precision = k * (sensitivity / z) ** 2 if z > 0 else math.inf
        epsilon = gaussian_epsilon(precision, dp.delta, dp.accountant.method)
        model = fresh = float(model_noise(None, rounds, momentum)[-1]) * mean_std
        per_round = mean_std
        accountant = PrivacyAccountant(dp.accountant.method, dp.sampling, dp.population, dp.delta)
        amplified = accountant.epsilon_if(z, dp.sample, rounds) if z > 0 else math.inf
    return NoisePlan(
        description=dp.describe(),
        size=size,
        rounds=rounds,
        sites_per_round=m,
        population=dp.population,
        clip_norm=dp.clip_norm,
        noise_multiplier=z,
        round_std=per_round,
        model_std=model,
        fresh_model_std=fresh,
        participations=k,
        epsilon_knows_sample=epsilon,
        epsilon_secret_sample=amplified,
        delta=dp.delta,
        momentum=momentum,
    )


def _cap(dp: SiteDP) -> int:
    """The most rounds the policy lets one site take part in (privacy.max_participations; 0: no cap)."""
    return dp.participation_cap if dp.target_epsilon > 0 else 0  # the budget is what enforces the cap


@dataclass(frozen=True)
class RecordPlan:
    """What record-level DP-SGD will do to a run: each step's noise against its clip, and the records'
    epsilon, worked out before it trains.

    The noise-to-signal ratio is read as site-level DP's: the noise of one step's mean gradient, as a norm,
    over the clip norm (the most that mean can move), z sqrt(d) / batch, and then averaged over the sites of
    a round, whose noises are independent: divided by sqrt(sites per round). The 10-play example is at about
    1.5; site-level DP on 14 sites was over 250.
    """

    size: int
    sites_per_round: int
    rounds: int
    batch_size: int
    clip: float
    noise_multiplier: float
    calibrated: bool
    worst_epsilon: float
    """The largest epsilon any site spends on its records if it takes part in every round."""

    @property
    def step_noise_norm(self) -> float:
        """The noise of one step's mean gradient, as a norm over the clip norm."""
        return self.noise_multiplier * math.sqrt(self.size) / self.batch_size

    @property
    def noise_to_signal(self) -> float:
        return self.step_noise_norm / math.sqrt(self.sites_per_round)

    def warning(self) -> str | None:
        if self.noise_to_signal <= CANNOT_LEARN:
            return None
        return (
            "this run cannot learn: each DP-SGD step's noise is "
            f"{self.step_noise_norm:.0f} times the clip norm, {self.noise_to_signal:.0f} after "
            f"averaging over {self.sites_per_round} sites (runs learn below about "
            f"{CANNOT_LEARN:.0f}). Change one of: a larger client.batch_size (the noise on the "
            "mean falls as 1 / batch), more sites per round, a larger "
            "privacy.record_target_epsilon"
        )

    def lines(self) -> list[str]:
        how = "calibrated to the target" if self.calibrated else "as set"
        warning = self.warning()
        return [
            f"record-level DP-SGD at every site: per-window clip {self.clip:g}, noise multiplier "
            f"{self.noise_multiplier:.4g} ({how}), batch {self.batch_size}",
            f"noise on one step's mean gradient: {self.step_noise_norm:.3g} times the clip norm as a norm; "
            f"{self.noise_to_signal:.3g} after the server averages {self.sites_per_round} sites' independent "
            "noise",
            f"epsilon per window, the worst site if it takes part in all {self.rounds} rounds: "
            f"{self.worst_epsilon:.3f} (each site at delta 1 / (10 x its windows))",
            f"WARNING: {warning}" if warning else "verdict: the noise leaves this run room to learn",
        ]


def record_plan(
    windows: list[int],
    size: int,
    *,
    sites_per_round: int,
    rounds: int,
    batch_size: int,
    epochs: int,
    max_steps: int | None,
    clip: float,
    noise_multiplier: float,
    calibrated: bool,
) -> RecordPlan:
    """The plan of record-level DP-SGD for sites of these window counts (each in every round: the worst)."""
    from confide.core import Plan
    from confide.privacy.record import ACCOUNTING, record_delta

    step = Plan(round=1, epochs=epochs, max_steps=max_steps, batch_size=batch_size)
    worst = 0.0
    for n in sorted({n for n in windows if n > 0}):
        accountant = PrivacyAccountant(ACCOUNTING, "poisson", n, record_delta(n))
        if noise_multiplier > 0:
            accountant.spend(noise_multiplier, min(1.0, batch_size / n), rounds * step.local_steps(n))
            worst = max(worst, accountant.epsilon())
        else:
            worst = math.inf
    return RecordPlan(size, sites_per_round, rounds, batch_size, clip, noise_multiplier, calibrated, worst)
