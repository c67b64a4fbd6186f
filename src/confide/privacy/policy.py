"""The server's side of site-level DP-FedAvg for a whole run: what each round adds, spends and may spend.

:class:`SiteDP` ties the pieces of :mod:`confide.privacy.dp` and :mod:`confide.privacy.accountant` to a
run: the site layers (clip, and the noise share under distributed DP), the aggregator (equal weights, central
noise, a fixed denominator), the adaptive clip norm, and the accountants with the budget. It knows nothing of
stores or backends: the runner persists what :meth:`SiteDP.charge` returns before the round's result is used.

A round is one sampled Gaussian event on the population of sites: ``sampling = "fixed"`` (exactly m sites
drawn without replacement, replace-one neighbours) or ``"poisson"`` (each site with rate q, add-or-remove
neighbours), exactly as :meth:`confide.server.strategy.Strategy.select` draws them.

Trust model: every epsilon is stated against one adversary (:data:`TRUST`).

* ``"secret_sample"``: the adversary sees the released models but not who took part (central DP: the
  aggregator is trusted and adds the noise). Amplification by sampling holds: the *amplified* epsilon. It
  holds only while the sample stays secret: a sample drawn from a published run seed is not.
* ``"knows_sample"``: the adversary knows which sites took part in each round (distributed DP: the server
  draws the sample and sees who sends a masked input). No amplification: each site's epsilon is the
  composition of the Gaussian rounds it took part in (:class:`~confide.privacy.accountant.SiteLedger`), and
  the budget holds for the worst site.

Both are always computed and reported; the trust model decides which one the budget governs.

Slightly over ~400 lines: the run's two accounts (amplified and per site) and the budget check that reads
both stay side by side.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from confide.errors import ConfigError
from confide.pipeline import Aggregator, Layer
from confide.privacy.accountant import (
    LedgerEntry,
    PrivacyAccountant,
    SiteLedger,
    calibrate_noise,
    calibrate_site_noise,
    combine_noise,
    combined_noise,
    round_up,
)
from confide.privacy.dp import (
    AdaptiveClip,
    CentralDP,
    CentralNoise,
    ClipLayer,
    DistributedNoiseLayer,
    EqualMean,
)
from confide.privacy.matrix import (
    BandedLedger,
    BandedNoise,
    gram,
    max_participations,
    square_root_coefficients,
)
from confide.randomness import Randomness

CLIP_KEY = "dp.clip_norm"
"""The adaptive clip norm in the server state (a one-value vector, so it is checkpointed with the model)."""

TRUST = ("knows_sample", "secret_sample")
"""The adversaries an epsilon can be stated against (see the module's docstring)."""

NOISE_DIGITS = 4
"""Significant digits a calibrated noise multiplier is rounded up to: it is used exactly as printed."""

_CHARGE_STEP = 1000
"""Charged multipliers of short rounds are rounded down to 1/1000: equal rounds make one accountant event."""


@dataclass(frozen=True)
class Spent:
    """Epsilon spent so far at the run's delta, against each adversary, and which one the budget governs."""

    amplified: float
    """Against an adversary who does not know the sample: amplified by sampling."""
    worst_site: float
    """Against one who knows the sample: the site that has spent most."""
    median_site: float
    """Against one who knows the sample: the population's median site (never-sampled sites count)."""
    trust: str
    """The adversary the budget is held against: ``"knows_sample"`` or ``"secret_sample"``."""

    @property
    def epsilon(self) -> float:
        """The epsilon the budget governs: the worst site's if the adversary knows the sample."""
        return self.worst_site if self.trust == "knows_sample" else self.amplified


@dataclass(frozen=True)
class Charge:
    """What one round spent: recorded in the store before the round's result is used.

    ``round``, ``entry`` and ``participants`` are what a resumed run replays (:meth:`SiteDP.replay`).
    """

    round: int
    entry: LedgerEntry
    participants: tuple[str, ...] | None
    """The sites whose updates reached the sum (their number is the old ``reported``); None if unknown."""
    spent: Spent
    """The whole run's spend so far, this round included."""

    @property
    def epsilon(self) -> float:
        """The governing epsilon of the whole run so far, this round included."""
        return self.spent.epsilon


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
        trust: str | None = None,
        mechanism: str = "dp-fedavg",
        bands: int = 1,
        workload_momentum: float = 0.0,
    ) -> None:
        if placement not in ("central", "distributed"):
            raise ConfigError(f"privacy.dp must be 'central' or 'distributed' (got {placement!r})")
        check_mechanism(mechanism, placement, adaptive is not None)
        self.placement = placement
        self.mechanism = mechanism
        # Correlated noise claims no amplification: its epsilon holds against whoever knows the sample.
        self.trust = "knows_sample" if mechanism == "dp-ftrl" else check_trust(placement, trust)
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
        self.sites: SiteLedger | BandedLedger = SiteLedger(accounting, sampling, population, self.delta)
        self.coefficients: np.ndarray | None = None
        correlated = None
        if mechanism == "dp-ftrl":
            self.coefficients = square_root_coefficients(bands, workload_momentum)
            self.sites = BandedLedger(self.coefficients, accounting, sampling, population, self.delta)
            correlated = BandedNoise(self.coefficients)
        self.workload_momentum = workload_momentum
        self.participation_cap = 0
        """The most rounds one site may take part in (privacy.max_participations; 0: no cap)."""
        # Under adaptive clipping the budget z is shared with the noised bits: the updates get z_delta.
        update_noise = combined_noise(noise_multiplier, adaptive.bits_noise) if adaptive else noise_multiplier
        self.update_noise = update_noise
        self.clip = ClipLayer(clip_norm)
        self.layers: tuple[Layer, ...] = (self.clip,)
        self.central: CentralNoise | None = None
        if placement == "central":
            self.central = CentralNoise(clip_norm, update_noise, correlated)
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
        participations: int | None = None,
        **options: Any,
    ) -> SiteDP:
        """A policy whose noise multiplier keeps ``rounds`` rounds within ``target_epsilon``.

        Calibrated for the epsilon the budget governs. Against a sample-secret adversary: the amplified
        epsilon of ``rounds`` rounds. Against one who knows the sample: a site that takes part in
        ``participations`` rounds (default ``rounds``: without a cap on participation a site may be drawn
        every time), with no amplification. The multiplier is rounded up to :data:`NOISE_DIGITS` significant
        digits, and that printed value is the one used and accounted.
        """
        delta = delta or default_delta(population)
        placement = options.get("placement", "")
        if options.get("mechanism") == "dp-ftrl":
            # k rounds at least b apart cost sqrt(k G(0)) clip norms: a Gaussian of that sensitivity.
            bands = options.get("bands", 1)
            most = max_participations(rounds, bands)
            k = min(participations, most) if participations else most
            g0 = float(gram(square_root_coefficients(bands, options.get("workload_momentum", 0.0)))[0])
            z = calibrate_site_noise(target_epsilon, delta, k, sampling, accounting) * math.sqrt(g0)
        elif check_trust(placement, options.get("trust")) == "knows_sample":
            z = calibrate_site_noise(target_epsilon, delta, participations or rounds, sampling, accounting)
        else:
            sample = sampled(sampling, sites_per_round, population)
            z = calibrate_noise(target_epsilon, delta, rounds, sample, population, sampling, accounting)
        return cls(
            noise_multiplier=round_up(z, NOISE_DIGITS),
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

    def spent(self) -> Spent:
        """Epsilon against each adversary, and which one governs the budget."""
        worst = self.sites.worst().epsilon
        amplified = worst if self.mechanism == "dp-ftrl" else self.accountant.epsilon()
        return Spent(amplified, worst, self.sites.median(), self.trust)

    def epsilon(self) -> float:
        """The epsilon the budget governs (the worst site's when the adversary knows the sample)."""
        return self.amplified_epsilon() if self.trust == "secret_sample" else self.worst_site_epsilon()

    def amplified_epsilon(self) -> float:
        """Epsilon against an adversary who does not know who took part (amplified by sampling).

        Correlated noise claims no amplification: there it is the worst site's, which holds against anyone.
        """
        if self.mechanism == "dp-ftrl":
            return self.worst_site_epsilon()
        return self.accountant.epsilon()

    def recent(self) -> frozenset[str]:
        """Sites not to ask next round because their rounds would overlap under correlated noise (they took
        part in the last b - 1): none with fresh noise."""
        return self.sites.recent() if isinstance(self.sites, BandedLedger) else frozenset()

    def worst_site_epsilon(self) -> float:
        """Epsilon of the site that has spent most, against an adversary who knows who took part."""
        return self.sites.worst().epsilon

    def median_site_epsilon(self) -> float:
        """Epsilon of the population's median site, against an adversary who knows who took part."""
        return self.sites.median()

    def site_epsilons(self) -> dict[str, float]:
        """Each site's epsilon against an adversary who knows who took part (sites never sampled: absent)."""
        return self.sites.site_epsilons()

    def charged_noise(self, reported: int) -> float:
        """The noise multiplier a round is charged at when ``reported`` updates reach the sum.

        Under distributed DP each site carries 1/``share_sites`` of the noise variance, so when fewer updates
        arrive (dropouts, refused updates, a small Poisson draw) the sum is noised less and the round costs
        more: z_delta·sqrt(reported / share_sites), joined again with the clipping bits' noise under adaptive
        clipping, rounded down to 1/1000 (never in the run's favour, and equal rounds make one event). A
        round with more updates is charged at the planned multiplier. Central noise does not depend on who
        reported.
        """
        if isinstance(reported, bool) or not isinstance(reported, int) or reported < 0:
            raise ConfigError(f"a round's number of updates must be a whole number >= 0 (got {reported!r})")
        if self.placement == "central" or reported >= self.share_sites:
            return self.noise_multiplier
        update = self.update_noise * math.sqrt(reported / self.share_sites)
        bits = self.adaptive.bits_noise if self.adaptive is not None else None
        return math.floor(combine_noise(update, bits) * _CHARGE_STEP) / _CHARGE_STEP

    def charge(self, round: int, participants: Sequence[str] | int) -> Charge:
        """Spend round ``round`` on both accounts, given the sites whose updates reached the sum.

        A bare count (the old interface) charges the round to every site of the population: safe, since
        the per-site account can then only over-state, but it loses the per-site view.
        """
        if isinstance(participants, str):
            raise ConfigError(f"charge() takes a list of the round's sites (got {participants!r})")
        who = None if isinstance(participants, int) else tuple(participants)
        z = self.charged_noise(participants if who is None else len(who))  # type: ignore[arg-type]
        self.accountant.spend(z, self.sample)
        self.sites.record(z, who)
        return Charge(round, self.accountant.ledger()[-1], who, self.spent())

    def replay(
        self, entries: Sequence[LedgerEntry], participants: Sequence[Collection[str] | None] | None = None
    ) -> None:
        """Load the rounds already spent (a resumed run): ledger entries and, per entry, its participants.

        An entry without participants (None, or no list at all: a store written before they were kept) is
        charged to every site, so a resumed run never under-states a site's spend.
        """
        who = list(participants) if participants is not None else [None] * len(entries)
        if len(who) != len(entries):
            raise ConfigError(
                f"replay got {len(entries)} ledger entries but {len(who)} participant lists: give one list "
                "(or None) per entry"
            )
        for e, sites in zip(entries, who, strict=True):
            self.accountant.spend(e.noise_multiplier, e.sample, e.steps)
            self.sites.record(e.noise_multiplier, sites, e.steps)

    def over_budget(self, round: int, min_reported: int = 1, exclude: Collection[str] = ()) -> str | None:
        """Why round ``round`` may not run, or None if it may.

        The check is for the worst the round can charge: the fewest updates with which it would still be
        accepted (``min_reported``; the runner passes max(1, the deployment's minimum, secure aggregation's
        minimum)), and against a sample-knowing adversary the worst site taking part once more. Sites in
        ``exclude`` will not be asked this round (see :meth:`exhausted`); only a sample-knowing account may
        leave sites out, since leaving them out changes the sampling rate that amplification assumes.
        """
        if self.target_epsilon <= 0:
            return None
        if exclude and self.trust != "knows_sample":
            raise ConfigError(
                "sites may be left out of the sample only when the budget is held per site (trust "
                "'knows_sample'): amplification by sampling assumes the whole population is drawn from"
            )
        z = self.charged_noise(min_reported)
        stop = f"stopped before round {round}"
        after = f"The model of round {round - 1} is the run's result"
        if self.trust == "secret_sample":
            before, worst = self.amplified_epsilon(), self.accountant.epsilon_if(z, self.sample)
            what = "epsilon (amplified by sampling, against anyone who does not know who took part)"
        else:
            if self.population - len(set(exclude)) < min_reported:
                return (
                    f"{stop}: only {self.population - len(set(exclude))} sites can take part again without "
                    f"passing their budget of epsilon {self.target_epsilon:g}, and a round needs "
                    f"{min_reported}. {after}; to train longer, raise the budget or privacy.noise_multiplier"
                )
            site = self.sites.worst(z, exclude)
            before, worst = self.sites.worst(None, exclude).epsilon, site.epsilon
            what = (
                f"the epsilon of the worst site (one that would have taken part in {site.rounds} rounds) "
                "against a server that knows who took part"
            )
        if worst <= self.target_epsilon:
            return None
        return (
            f"{stop}: with as few as {min_reported} updates it would be charged at noise multiplier {z!r} "
            f"and raise {what} from {before:.3f} to {worst:.3f}, past the budget privacy.target_epsilon = "
            f"{self.target_epsilon:g} (delta = {self.delta:.2e}). {after}; to train longer, raise the budget "
            "or privacy.noise_multiplier"
        )

    def exhausted(self, min_reported: int = 1) -> frozenset[str]:
        """Sites that would pass the budget by taking part in the next round at its worst charge.

        For a strategy that holds the budget per site: leave these out of the sample and pass them to
        :meth:`over_budget` as ``exclude``, and the run goes on with the others (a privacy filter).
        """
        if self.target_epsilon <= 0:
            return frozenset()
        return self.sites.exhausted(self.charged_noise(min_reported), self.target_epsilon)

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
        """A few lines for the progress display and the report: the mechanism, and whom epsilon holds against.

        The noise multiplier is printed exactly as it is used and accounted.
        """
        where = "the aggregator adds it" if self.placement == "central" else "each site adds its share"
        clip = f"adaptive from C = {self.clip_norm:g}" if self.adaptive else f"C = {self.clip_norm:g}"
        budget = f", budget epsilon {self.target_epsilon:g}" if self.target_epsilon > 0 else ""
        sampling = "fixed-size" if self.sampling == "fixed" else "Poisson"
        if self.coefficients is not None:
            bands = self.coefficients.size
            return (
                "site-level DP-FTRL (central: the aggregator adds noise correlated across rounds by a "
                f"{bands}-banded square-root factorization, so most of it cancels in the model): "
                f"clip {clip}, "
                f"noise multiplier {self.noise_multiplier!r}, a site sits out {bands - 1} rounds after each "
                f"of its own, {self.accountant.method.upper()} accounting, delta {self.delta:.2e}{budget}. "
                "No amplification by sampling is claimed: each site's epsilon holds against anyone, a server "
                "that knows who took part included. The aggregator is trusted with the clipped updates."
            )
        if self.trust == "knows_sample":
            trust = (
                "The budget holds for every site against a server that knows which sites took part in each "
                "round, so sampling does not amplify: epsilon is the worst site's, from the rounds it took "
                "part in. The amplified epsilon is reported too; it holds only against someone who sees the "
                "models but not who took part."
            )
        else:
            trust = (
                "The aggregator is trusted; the budget holds against anyone who sees the models but not "
                "which sites took part (epsilon amplified by sampling), and only while the sample stays "
                "secret. The worst site's epsilon against someone who knows who took part is reported too."
            )
        return (
            f"site-level DP ({self.placement}: {where}): clip {clip}, noise multiplier "
            f"{self.noise_multiplier!r}, {self.accountant.method.upper()} accounting of "
            f"{sampling} sampling, delta {self.delta:.2e}{budget}. {trust}"
        )


def check_trust(placement: str, trust: str | None) -> str:
    """The adversary the budget is held against: the one ``placement`` implies unless ``trust`` is stricter.

    Under distributed DP the server sees who sends a masked input, so it always knows the sample, and
    ``"secret_sample"`` is refused. Under central DP the trusted aggregator adds the noise; a run may still
    hold its budget against a sample-knowing adversary (say, its seed is public).
    """
    implied = "knows_sample" if placement == "distributed" else "secret_sample"
    if trust is None:
        return implied
    if trust not in TRUST:
        raise ConfigError(f"the trust model must be one of 'knows_sample', 'secret_sample' (got {trust!r})")
    if placement == "distributed" and trust == "secret_sample":
        raise ConfigError(
            "under distributed DP the server sees which sites send a masked input, so it knows the sample "
            "and amplification by sampling does not hold against it: use trust = 'knows_sample', or central "
            "DP with a trusted aggregator"
        )
    return trust


MECHANISMS = ("dp-fedavg", "dp-ftrl")
"""Fresh noise every round (DP-FedAvg, McMahan et al. 2018), or noise correlated across rounds by a banded
matrix factorization (DP-FTRL, Kairouz et al. 2021; :mod:`confide.privacy.matrix`)."""


def check_mechanism(mechanism: str, placement: str, adaptive: bool) -> None:
    """Refuse a mechanism the rest of the DP settings cannot run, saying why and what would."""
    if mechanism not in MECHANISMS:
        raise ConfigError(f"privacy.mechanism must be one of 'dp-fedavg', 'dp-ftrl' (got {mechanism!r})")
    if mechanism != "dp-ftrl":
        return
    if placement != "central":
        raise ConfigError(
            "privacy.mechanism = 'dp-ftrl' correlates each round's noise with the rounds before, so whoever "
            "adds it must keep the earlier noise; sites that each add a share under secure aggregation "
            "cannot (undoing the correlation needs the earlier shares, which secure aggregation hides). Use "
            "privacy.dp = 'central' (a trusted aggregator adds the noise) with dp-ftrl, or keep "
            "privacy.mechanism = 'dp-fedavg' with distributed DP"
        )
    if adaptive:
        raise ConfigError(
            "privacy.mechanism = 'dp-ftrl' runs with a fixed clip norm: adaptive clipping's noised counts "
            "are not part of the factorization. Set privacy.adaptive_clip = false and choose "
            "privacy.clip_norm (`confide dp plan` shows the noise against it)"
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
