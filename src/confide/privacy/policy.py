"""The server's side of site-level DP-FedAvg for a whole run: what each round adds, spends and may spend.

:class:`SiteDP` ties the pieces of :mod:`confide.privacy.dp` and :mod:`confide.privacy.accountant` to a
run: the site layers (clip, and the noise share under distributed DP), the aggregator (equal weights, central
noise, a fixed denominator), the adaptive clip norm, and the accountant with its budget. It knows nothing of
stores or backends: the runner persists what :meth:`SiteDP.charge` returns before the round's result is used.

A round is one sampled Gaussian event on the population of sites: ``sampling = "fixed"`` (exactly m sites
drawn without replacement, replace-one neighbours) or ``"poisson"`` (each site with rate q, add-or-remove
neighbours), exactly as :meth:`confide.server.strategy.Strategy.select` draws them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from confide.errors import ConfigError
from confide.pipeline import Aggregator, Layer
from confide.privacy.accountant import LedgerEntry, PrivacyAccountant, calibrate_noise, combined_noise
from confide.privacy.dp import (
    AdaptiveClip,
    CentralDP,
    CentralNoise,
    ClipLayer,
    DistributedNoiseLayer,
    EqualMean,
)
from confide.randomness import Randomness

CLIP_KEY = "dp.clip_norm"
"""The adaptive clip norm in the server state (a one-value vector, so it is checkpointed with the model)."""


@dataclass(frozen=True)
class Charge:
    """What one round spent: recorded in the store before the round's result is used."""

    round: int
    entry: LedgerEntry
    epsilon: float
    """Epsilon of the whole run so far, this round included."""


class SiteDP:
    """Site-level differential privacy for one run (McMahan et al. 2018, Andrew et al. 2021)."""

    def __init__(
        self,
        placement: str,
        clip_norm: float,
        noise_multiplier: float,
        population: int,
        sites_per_round: int,
        sampling: str = "fixed",
        accounting: str = "rdp",
        delta: float = 0.0,
        target_epsilon: float = 0.0,
        adaptive: AdaptiveClip | None = None,
    ) -> None:
        if placement not in ("central", "distributed"):
            raise ConfigError(f"privacy.dp must be 'central' or 'distributed' (got {placement!r})")
        self.placement = placement
        self.population = population
        self.sites_per_round = sites_per_round
        self.sampling = sampling
        self.sample = sampled(sampling, sites_per_round, population)
        # Under distributed DP each site's share of the noise is sized so that the sum of `share_sites`
        # updates carries the full noise. With fixed-size sampling that is the round's m sites; under Poisson
        # sampling the count varies around m, so the shares are sized for m - 2 sqrt(m) (rarely undershot):
        # a round with more sites than that carries more noise than planned, never less unless sites drop.
        self.share_sites = (
            sites_per_round
            if sampling == "fixed"
            else max(1, math.floor(sites_per_round - 2 * math.sqrt(sites_per_round)))
        )
        self.delta = delta or default_delta(population)
        self.target_epsilon = target_epsilon
        self.noise_multiplier = noise_multiplier
        self.adaptive = adaptive
        self.accountant = PrivacyAccountant(accounting, sampling, population, self.delta)
        # Under adaptive clipping the budget z is shared with the noised bits: the updates get z_delta.
        update_noise = combined_noise(noise_multiplier, adaptive.bits_noise) if adaptive else noise_multiplier
        self.update_noise = update_noise
        self.clip = ClipLayer(clip_norm)
        self.layers: tuple[Layer, ...] = (self.clip,)
        self.central: CentralNoise | None = None
        if placement == "central":
            self.central = CentralNoise(clip_norm, update_noise)
        else:
            self.noise_share = DistributedNoiseLayer(clip_norm, update_noise, self.share_sites)
            self.layers = (self.clip, self.noise_share)
        mean = EqualMean(expected_sites=float(sites_per_round))
        self.aggregator: Aggregator = mean if self.central is None else CentralDP(mean, self.central)

    @classmethod
    def calibrated(
        cls,
        target_epsilon: float,
        rounds: int,
        *,
        population: int,
        sites_per_round: int,
        sampling: str = "fixed",
        accounting: str = "rdp",
        delta: float = 0.0,
        **options: Any,
    ) -> SiteDP:
        """A policy whose noise multiplier spends exactly ``target_epsilon`` in ``rounds`` rounds."""
        z = calibrate_noise(
            target_epsilon,
            delta or default_delta(population),
            rounds,
            sampled(sampling, sites_per_round, population),
            population,
            sampling,
            accounting,
        )
        return cls(
            noise_multiplier=z,
            target_epsilon=target_epsilon,
            population=population,
            sites_per_round=sites_per_round,
            sampling=sampling,
            accounting=accounting,
            delta=delta,
            **options,
        )

    @property
    def clip_norm(self) -> float:
        return self.clip.clip_norm

    def set_clip_norm(self, clip_norm: float) -> None:
        """Use ``clip_norm`` from now on: at the sites and in the noise (adaptive clipping moves it)."""
        self.clip.clip_norm = float(clip_norm)
        if self.central is not None:
            self.central.clip_norm = float(clip_norm)
        if self.placement == "distributed":
            self.noise_share.clip_norm = float(clip_norm)

    def epsilon(self) -> float:
        return self.accountant.epsilon()

    def over_budget(self, round: int) -> str | None:
        """Why round ``round`` may not run (it would take epsilon past the target), or None if it may."""
        if self.target_epsilon <= 0:
            return None
        after = self.accountant.epsilon_if(self.noise_multiplier, self.sample)
        if after <= self.target_epsilon:
            return None
        return (
            f"stopped before round {round}: it would raise epsilon from {self.epsilon():.3f} to "
            f"{after:.3f}, past the budget privacy.target_epsilon = {self.target_epsilon:g} "
            f"(delta = {self.delta:.2e}). The model of round {round - 1} is the run's result; to train "
            "longer, raise the budget or privacy.noise_multiplier"
        )

    def charge(self, round: int, reported: int) -> Charge:
        """Spend round ``round`` on the accountant, given the number of updates that reached the sum.

        Under distributed DP each site carries 1/``share_sites`` of the noise variance, so when fewer updates
        arrive (dropouts, refused updates, a small Poisson draw) the sum is noised less and the round costs
        more: it is charged with the noise multiplier of what was actually added. A round with more updates
        is charged at the planned multiplier. Central noise does not depend on who reported.
        """
        z = self.noise_multiplier
        if self.placement == "distributed" and reported < self.share_sites:
            # Rounded down to 1/1000 (never in the run's favour), so that rounds with the same number of
            # survivors are one event to the accountant and epsilon stays quick to compute.
            z = math.floor(self.noise_share.effective_noise_multiplier(reported) * 1000) / 1000
        self.accountant.spend(z, self.sample)
        entry = self.accountant.ledger()[-1]
        return Charge(round, entry, self.accountant.epsilon())

    def replay(self, entries: list[LedgerEntry]) -> None:
        """Load the ledger of rounds already spent (a resumed run)."""
        for e in entries:
            self.accountant.spend(e.noise_multiplier, e.sample, e.steps)

    def adapt(self, unclipped: float, reported: int, randomness: Randomness) -> float:
        """Adaptive clipping after a round: move C from the noised count of unclipped updates."""
        if self.adaptive is None:
            return self.clip_norm
        state = self.adaptive.update(
            unclipped, reported, randomness, expected_sites=float(self.sites_per_round)
        )
        # Kept at float32 precision, as the checkpoint keeps it, so a resumed run goes on from the same C.
        clip = float(np.float32(state.clip_norm))
        self.adaptive = replace(state, clip_norm=clip)
        self.set_clip_norm(clip)
        return clip

    def describe(self) -> str:
        """One line for the progress display and the report."""
        where = "the aggregator adds it" if self.placement == "central" else "each site adds its share"
        clip = f"adaptive from C = {self.clip_norm:g}" if self.adaptive else f"C = {self.clip_norm:g}"
        budget = f", budget epsilon {self.target_epsilon:g}" if self.target_epsilon > 0 else ""
        sampling = "fixed-size" if self.sampling == "fixed" else "Poisson"
        return (
            f"site-level DP ({self.placement}: {where}): clip {clip}, noise multiplier "
            f"{self.noise_multiplier:.3f}, {self.accountant.method.upper()} accounting of "
            f"{sampling} sampling, delta {self.delta:.2e}{budget}"
        )


def expected_bits_noise(sites_per_round: int) -> float:
    """Andrew et al. 2021's default noise on the sum of clipping bits: expected sites per round / 20."""
    return sites_per_round / 20.0


def default_delta(population: int) -> float:
    """The delta a run reports at unless it sets one: 1 / (10 x sites), below the usual 1 / sites."""
    return 1.0 / (10 * population)


def sampled(sampling: str, sites_per_round: int, population: int) -> float:
    """What the accountant needs of a round's sampling: the sample size (fixed) or the rate (Poisson)."""
    return sites_per_round if sampling == "fixed" else sites_per_round / population
