"""What a run has spent of its privacy budget: sampled Gaussian events composed with dp-accounting.

Every DP round of DP-FedAvg (McMahan et al. 2018), and every step of DP-SGD (Abadi et al. 2016), is one
*sampled Gaussian event*: a random subset of the population (sites, or a site's records) contributes a
clipped update, and Gaussian noise of standard deviation ``noise_multiplier × clip_norm`` goes on the sum.
The accountant keeps the list of these events (the ledger) and asks Google's ``dp-accounting`` what
epsilon they add up to at the configured delta, with Rényi DP (``"rdp"``, Mironov 2017) or privacy loss
distributions (``"pld"``, tighter, Koskela et al. 2020 / Doroshenko et al. 2022).

The ledger is the whole state: a store persists it, and :meth:`PrivacyAccountant.from_ledger` gives back an
accountant that reports the very same epsilon, so a resumed run never under-counts what it spent.

Two ways to sample, and each fixes the neighbouring relation of the guarantee:

* ``"poisson"``: each member takes part independently with probability ``q`` (the sample size varies).
  Datasets are neighbours when one has a member more (ADD_OR_REMOVE_ONE). One member moves the noised sum
  by at most ``clip_norm``, which is what ``GaussianDpEvent`` assumes. RDP and PLD both support it.
* ``"fixed"``: exactly ``m`` of the ``population`` members are drawn without replacement, as
  :meth:`confide.server.strategy.Strategy.select` does. Amplification by sampling without replacement is
  only known under REPLACE_ONE (Wang, Balle & Kasiviswanathan 2019): the population size is public, and
  neighbours differ in the *contents* of one member. Replacing an update ``+C`` by ``-C`` moves the sum by
  ``2 clip_norm``, so each event is accounted with noise multiplier ``z / 2``. dp-accounting 0.6 does not do
  this itself: ``GaussianDpEvent`` defines ``noise_multiplier = sigma / C`` with C the norm bound, while its
  RDP formula for sampling without replacement reads it as sigma over the L2 *sensitivity*
  (google/differential-privacy issue #378); passing ``z`` unchanged would under-state the RDP fourfold.
  Only RDP supports this sampling: dp-accounting has no PLD for ``SampledWithoutReplacementDpEvent``, so
  ``method="pld"`` with ``sampling="fixed"`` raises :class:`~confide.errors.ConfigError`.

Epsilons under the two relations are not interchangeable: a replace-one guarantee is roughly an
add-or-remove guarantee for two members, so report which one a number is (:attr:`relation`).

Amplification by sampling holds only against an adversary who does not know who was sampled. Against one who
does (under distributed DP, the server: it draws the sample and sees who sends a masked input), each round a
site took part in is a plain Gaussian mechanism and the rounds it sat out cost it nothing.
:class:`SiteLedger` keeps that per-site account. This file is over 400 lines because the two accounts, one
for each adversary, are kept side by side: they must read the same events with the same sensitivity.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Collection, Iterable, Sequence
from decimal import ROUND_CEILING, Decimal
from typing import NamedTuple

import dp_accounting
from dp_accounting import pld, rdp
from dp_accounting.gaussian_mechanism import get_epsilon_gaussian, get_sigma_gaussian

from confide.errors import ConfigError

METHODS = ("rdp", "pld")
SAMPLINGS = ("poisson", "fixed")

REPLACE_ONE_SENSITIVITY = 2.0
"""How far one member can move a clipped sum under REPLACE_ONE, in units of the clip norm (+C becomes -C)."""

_RELATIONS = {
    "poisson": dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    "fixed": dp_accounting.NeighboringRelation.REPLACE_ONE,
}


class LedgerEntry(NamedTuple):
    """One recorded composition: ``steps`` sampled Gaussian events with the same parameters.

    A plain tuple of numbers and a word, so a store can keep it as JSON and hand it back as a list.
    """

    noise_multiplier: float
    """Noise standard deviation over the clip norm (z): what the mechanism adds, before any sensitivity."""
    sampling: str
    """``"poisson"`` or ``"fixed"``."""
    sample: float
    """The sampling rate q (Poisson), or the number of members drawn, a whole number (fixed)."""
    steps: int


def _check_choices(method: str, sampling: str) -> None:
    if method not in METHODS:
        raise ConfigError(f"privacy.accounting must be one of 'rdp', 'pld' (got {method!r})")
    if sampling not in SAMPLINGS:
        raise ConfigError(f"privacy.sampling must be one of 'poisson', 'fixed' (got {sampling!r})")
    if method == "pld" and sampling == "fixed":
        raise ConfigError(
            "privacy.accounting = 'pld' cannot account fixed-size sampling without replacement "
            "(dp-accounting has no privacy loss distribution for it): use accounting = 'rdp' with fixed-size "
            "sampling, or Poisson sampling with 'pld'"
        )


def _check_entry(noise_multiplier: float, sampling: str, sample: float, steps: int, population: int) -> None:
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ConfigError(f"the noise multiplier must be a finite number >= 0 (got {noise_multiplier})")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a whole number >= 1 (got {steps!r})")
    if sampling == "poisson":
        if not 0 < sample <= 1:
            raise ConfigError(f"the Poisson sampling rate must lie in (0, 1] (got {sample})")
    elif not (float(sample).is_integer() and 1 <= sample <= population):
        raise ConfigError(
            f"a fixed-size sample must be a whole number from 1 to the population {population} (got {sample})"
        )


def _event(noise_multiplier: float, sampling: str, sample: float, population: int) -> dp_accounting.DpEvent:
    """One sampled Gaussian event, with the noise multiplier expressed over the relation's sensitivity."""
    if noise_multiplier == 0:
        return dp_accounting.NonPrivateDpEvent()
    if sampling == "poisson":
        return dp_accounting.PoissonSampledDpEvent(sample, dp_accounting.GaussianDpEvent(noise_multiplier))
    return dp_accounting.SampledWithoutReplacementDpEvent(
        population, int(sample), dp_accounting.GaussianDpEvent(noise_multiplier / REPLACE_ONE_SENSITIVITY)
    )


def _fresh(method: str, sampling: str) -> dp_accounting.PrivacyAccountant:
    if method == "rdp":
        return rdp.RdpAccountant(neighboring_relation=_RELATIONS[sampling])
    return pld.PLDAccountant(neighboring_relation=_RELATIONS[sampling])


class PrivacyAccountant:
    """The (epsilon, delta) a sequence of sampled Gaussian events has cost, for one population.

    ``population`` is the number of members that may be sampled (sites for DP-FedAvg, a site's records for
    DP-SGD); ``delta`` is the fixed delta every epsilon is reported at (commonly below 1 / population).
    """

    def __init__(self, method: str, sampling: str, population: int, delta: float) -> None:
        _check_choices(method, sampling)
        if isinstance(population, bool) or not isinstance(population, int) or population < 1:
            raise ConfigError(f"the population must be a whole number >= 1 (got {population!r})")
        if not 0 < delta < 1:
            raise ConfigError(f"privacy.delta must lie in (0, 1) (got {delta})")
        self.method = method
        self.sampling = sampling
        self.population = population
        self.delta = delta
        self._ledger: list[LedgerEntry] = []
        self._cached: tuple[int, float] = (0, 0.0)

    @property
    def relation(self) -> str:
        """The neighbouring relation the epsilon holds for: ``"add_or_remove_one"`` or ``"replace_one"``."""
        return _RELATIONS[self.sampling].name.lower()

    def _entry(self, noise_multiplier: float, sample: float, steps: int) -> LedgerEntry:
        _check_entry(noise_multiplier, self.sampling, sample, steps, self.population)
        value = float(sample) if self.sampling == "poisson" else int(sample)
        return LedgerEntry(float(noise_multiplier), self.sampling, value, steps)

    def spend(self, noise_multiplier: float, sample: float, steps: int = 1) -> None:
        """Record ``steps`` events: noise ``noise_multiplier`` (z) on a sample of rate or size ``sample``."""
        self._ledger.append(self._entry(noise_multiplier, sample, steps))

    def epsilon(self) -> float:
        """Epsilon at :attr:`delta` for all recorded events (0 before any, inf if one had no noise)."""
        count, value = self._cached
        if count != len(self._ledger):
            value = self._epsilon_of(self._ledger)
            self._cached = (len(self._ledger), value)
        return value

    def epsilon_if(self, noise_multiplier: float, sample: float, steps: int = 1) -> float:
        """Epsilon after ``steps`` more such events, without recording them.

        This is how a run stops *before* the round that would overspend: compare it with the budget first.
        """
        return self._epsilon_of([*self._ledger, self._entry(noise_multiplier, sample, steps)])

    def ledger(self) -> list[LedgerEntry]:
        """The recorded entries, oldest first (a copy)."""
        return list(self._ledger)

    @classmethod
    def from_ledger(
        cls,
        entries: Iterable[Sequence[float | str | int]],
        *,
        method: str,
        sampling: str,
        population: int,
        delta: float,
    ) -> PrivacyAccountant:
        """An accountant that has recorded ``entries`` (LedgerEntry values, or 4-item lists from JSON)."""
        accountant = cls(method, sampling, population, delta)
        for raw in entries:
            noise_multiplier, entry_sampling, sample, steps = raw
            if entry_sampling != sampling:
                raise ConfigError(
                    f"the privacy ledger holds a {entry_sampling!r} sampling entry, but this run accounts "
                    f"{sampling!r} sampling: replay a ledger with the sampling it was written with"
                )
            accountant.spend(float(noise_multiplier), float(sample), int(steps))
        return accountant

    def _epsilon_of(self, entries: Sequence[LedgerEntry]) -> float:
        if not entries:
            return 0.0
        # Entries with the same parameters become one self-composition (composition does not depend on the
        # order of events): dp-accounting composes a PLD of k identical steps by repeated squaring in one go,
        # where k single compositions of an ever wider distribution take minutes (100 one-step rounds: ~40 s
        # against ~0.5 s).
        counts: dict[LedgerEntry, int] = {}
        for entry in entries:
            key = entry._replace(steps=0)
            counts[key] = counts.get(key, 0) + entry.steps
        groups = list(counts.items())
        event = dp_accounting.ComposedDpEvent(
            [
                dp_accounting.SelfComposedDpEvent(
                    _event(key.noise_multiplier, key.sampling, key.sample, self.population), steps
                )
                for key, steps in groups
            ]
        )
        accountant = _fresh(self.method, self.sampling)
        accountant.compose(event)
        return float(accountant.get_epsilon(self.delta))

    def __repr__(self) -> str:
        return (
            f"PrivacyAccountant(method={self.method!r}, sampling={self.sampling!r}, "
            f"population={self.population}, delta={self.delta}, entries={len(self._ledger)})"
        )


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    rounds: int,
    sample: float,
    population: int,
    sampling: str = "poisson",
    method: str = "rdp",
    tolerance: float = 1e-4,
) -> float:
    """The least noise multiplier z with which ``rounds`` events stay within ``target_epsilon`` at ``delta``.

    ``sample`` is the sampling rate (Poisson) or sample size (fixed), as in :meth:`PrivacyAccountant.spend`.
    The answer is within ``tolerance`` of the optimum and never over budget (dp-accounting's
    ``calibrate_dp_mechanism``: Brent's method, then a step to the safe side). For adaptive clipping this is
    the *combined* multiplier; :func:`combined_noise` splits it between the updates and the clipping bits.
    """
    _check_choices(method, sampling)
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ConfigError(f"privacy.target_epsilon must be a finite number > 0 (got {target_epsilon})")
    if not 0 < delta < 1:
        raise ConfigError(f"privacy.delta must lie in (0, 1) (got {delta})")
    _check_entry(1.0, sampling, sample, rounds, population)

    def event(noise_multiplier: float) -> dp_accounting.DpEvent:
        return dp_accounting.SelfComposedDpEvent(
            _event(noise_multiplier, sampling, sample, population), rounds
        )

    return float(
        dp_accounting.calibrate_dp_mechanism(
            lambda: _fresh(method, sampling),
            event,
            target_epsilon,
            delta,
            dp_accounting.LowerEndpointAndGuess(0.0, 1.0),
            tol=tolerance,
        )
    )


def combined_noise(noise_multiplier: float, bits_noise: float) -> float:
    """The noise multiplier left for the updates when adaptive clipping also releases noised bits.

    Andrew et al. 2021 ("Differentially Private Learning with Adaptive Clipping") release, each round, the
    noised sum of updates (multiplier z_delta) and the noised count of unclipped updates (standard deviation
    sigma_b on bits that move by 1/2 per site once centred). Together they cost as much as one Gaussian
    event of multiplier z, where z^-2 = z_delta^-2 + (2 sigma_b)^-2, so for a budget z the updates get

        z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2).

    Under REPLACE_ONE both sensitivities double, and the same split holds. Account the run with ``z``; add
    ``z_delta × C`` noise to the updates and ``sigma_b`` to the bits.
    """
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ConfigError(f"privacy.noise_multiplier must be a finite number > 0 (got {noise_multiplier})")
    if not bits_noise > 0:
        raise ConfigError(
            f"privacy.bits_noise must be > 0 (got {bits_noise}): unnoised clipping bits are not private"
        )
    remaining = noise_multiplier**-2 - (2.0 * bits_noise) ** -2
    if remaining <= 0:
        raise ConfigError(
            f"the noise on the clipping bits (bits_noise = {bits_noise}) uses the whole privacy budget of "
            f"noise_multiplier = {noise_multiplier}: it needs 2 × bits_noise > noise_multiplier. Raise "
            "bits_noise (Andrew et al. 2021 use expected sites per round / 20) or the noise multiplier"
        )
    return float(remaining**-0.5)


def round_up(value: float, digits: int = 4) -> float:
    """``value`` rounded up to ``digits`` significant digits: a calibrated noise multiplier as it is printed.

    The printed number is the one used and accounted, so that what a report says can be checked by hand;
    rounding up only adds noise. Works on the shortest decimal that reads back as ``value`` (``repr``), so a
    value that already has ``digits`` digits (0.65) stays as it is instead of becoming 0.6501.
    """
    if not (math.isfinite(value) and value > 0):
        return value
    exact = Decimal(repr(value))
    step = Decimal(1).scaleb(exact.adjusted() - digits + 1)
    return float(exact.quantize(step, rounding=ROUND_CEILING))


def combine_noise(update_noise: float, bits_noise: float | None) -> float:
    """What updates noised at ``update_noise`` and clipping bits at ``bits_noise`` cost together, as one z.

    The inverse of :func:`combined_noise` (Andrew et al. 2021): z = (z_delta^-2 + (2 sigma_b)^-2)^(-1/2).
    Without adaptive clipping (``bits_noise`` None) it is ``update_noise`` itself.
    """
    if bits_noise is None or update_noise == 0:
        return update_noise
    return float((update_noise**-2 + (2.0 * bits_noise) ** -2) ** -0.5)


def sensitivity(sampling: str) -> float:
    """How far one site moves the clipped sum, in units of C, under the relation its sampling fixes.

    Poisson sampling: add-or-remove, C. Against an adversary who knows a site took part, removing it is the
    *zero-out* relation of Kairouz et al. 2021 (its update replaced by nothing), still C. Fixed-size sampling:
    replace-one, 2C. The per-site account uses the run's relation so that it compares with the amplified one.
    """
    return REPLACE_ONE_SENSITIVITY if sampling == "fixed" else 1.0


@functools.lru_cache(maxsize=4096)
def gaussian_epsilon(precision: float, delta: float, method: str) -> float:
    """Epsilon at ``delta`` of Gaussian mechanisms whose (sensitivity / z)^2 add up to ``precision``.

    Composing Gaussian mechanisms with mu_i = sensitivity / z_i is exactly one Gaussian mechanism with
    mu = sqrt(sum mu_i^2) (Dong, Roth & Su 2022, "Gaussian differential privacy", Corollary 3.3), so a site's
    whole history is one number and sites with the same history share one call. ``"pld"``: dp-accounting's
    exact epsilon of that Gaussian (Balle & Wang 2018), the limit its PLD accountant's discretization
    approaches from above. ``"rdp"``: dp-accounting's RDP accountant on it (RDP of Gaussians adds up exactly,
    so this is the RDP of the composition).
    """
    if precision <= 0:
        return 0.0
    if math.isinf(precision):
        return math.inf
    sigma = precision**-0.5
    if method == "pld":
        return float(get_epsilon_gaussian(sigma, delta))
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(sigma))
    return float(accountant.get_epsilon(delta))


def calibrate_site_noise(
    target_epsilon: float, delta: float, participations: int, sampling: str = "poisson", method: str = "rdp"
) -> float:
    """The least noise multiplier with which a site that takes part ``participations`` times, and whose
    participation the adversary knows, stays within ``target_epsilon`` at ``delta`` (no amplification)."""
    _check_choices(method, "poisson")
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ConfigError(f"privacy.target_epsilon must be a finite number > 0 (got {target_epsilon})")
    if isinstance(participations, bool) or not isinstance(participations, int) or participations < 1:
        raise ConfigError(f"participations must be a whole number >= 1 (got {participations!r})")
    if method == "pld":
        sigma = float(get_sigma_gaussian(target_epsilon, delta))
    else:
        sigma = float(
            dp_accounting.calibrate_dp_mechanism(
                rdp.RdpAccountant,
                dp_accounting.GaussianDpEvent,
                target_epsilon,
                delta,
                dp_accounting.LowerEndpointAndGuess(0.0, 1.0),
                tol=1e-6,
            )
        )
    return sigma * sensitivity(sampling) * math.sqrt(participations)


class SiteSpend(NamedTuple):
    """One site's account: who (None: a site that never took part), in how many rounds, at what epsilon."""

    site: str | None
    rounds: int
    epsilon: float


class SiteLedger:
    """Each site's own privacy account against an adversary who knows which sites took part in each round.

    Threat model: under distributed DP the server draws the sample and sees who sent a masked input, so
    amplification by sampling does not hold against it. Each round a site took part in is a Gaussian
    mechanism with that round's charged noise multiplier; rounds it sat out cost it nothing. Per site the
    ledger keeps the multipliers charged to it, counted per distinct value (a handful of numbers per site
    however long the run). Rounds whose participants are unknown (a ledger stored before participants were)
    are charged to every site, never in a site's favour.

    Stopping or excluding a site because of what it has spent is a privacy filter on public information,
    which adaptive composition of Gaussian mechanisms allows (Smith & Thakurta 2022, "Fully adaptive
    composition for Gaussian differential privacy"; Feldman & Zrnic 2021 for individual filters).
    """

    def __init__(self, method: str, sampling: str, population: int, delta: float) -> None:
        _check_choices(method, "poisson")
        if sampling not in SAMPLINGS:
            raise ConfigError(f"privacy.sampling must be one of 'poisson', 'fixed' (got {sampling!r})")
        self.method = method
        self.sensitivity = sensitivity(sampling)
        self.population = population
        self.delta = delta
        self._sites: dict[str, dict[float, int]] = {}
        self._everyone: dict[float, int] = {}

    def record(self, noise_multiplier: float, participants: Collection[str] | None, steps: int = 1) -> None:
        """Charge ``steps`` rounds at ``noise_multiplier`` to ``participants`` (None: to every site)."""
        z = float(noise_multiplier)
        if participants is None:
            self._everyone[z] = self._everyone.get(z, 0) + steps
            return
        if len(set(participants)) != len(participants):
            raise ConfigError("a round's participants must be distinct sites (one site is listed twice)")
        for site in participants:
            counts = self._sites.setdefault(site, {})
            counts[z] = counts.get(z, 0) + steps

    def histories(self) -> dict[str, dict[float, int]]:
        """Per site that took part: noise multiplier -> rounds charged at it (rounds of everyone left out)."""
        return {site: dict(counts) for site, counts in self._sites.items()}

    def _precision(self, counts: dict[float, int]) -> float:
        merged = dict(self._everyone)
        for z, k in counts.items():
            merged[z] = merged.get(z, 0) + k
        # Summed in a fixed order, so that sites with the same history get the same number (and cache entry).
        return sum(math.inf if z == 0 else k * (self.sensitivity / z) ** 2 for z, k in sorted(merged.items()))

    def _rounds(self, counts: dict[float, int]) -> int:
        return sum(counts.values()) + sum(self._everyone.values())

    def _epsilon(self, precision: float) -> float:
        return gaussian_epsilon(precision, self.delta, self.method)

    def _unseen(self, exclude: Collection[str] = ()) -> int:
        """How many sites of the population never took part (and are not excluded)."""
        known = set(self._sites) | set(exclude)
        return max(0, self.population - len(known))

    def site_epsilons(self) -> dict[str, float]:
        """Epsilon of each site that took part; any other site has spent :meth:`unseen_epsilon`."""
        return {site: self._epsilon(self._precision(c)) for site, c in self._sites.items()}

    def unseen_epsilon(self) -> float:
        """Epsilon of a site that never took part: 0 unless some rounds' participants are unknown."""
        return self._epsilon(self._precision({}))

    def worst(self, noise_multiplier: float | None = None, exclude: Collection[str] = ()) -> SiteSpend:
        """The site that has spent most, or would after one more round at ``noise_multiplier``.

        Epsilon of a Gaussian grows with its precision, so the site with the largest precision is the worst
        and one accountant call answers. Sites in ``exclude`` (not asked next round) are left out.
        """
        extra = 0.0
        if noise_multiplier is not None:
            extra = math.inf if noise_multiplier == 0 else (self.sensitivity / noise_multiplier) ** 2
        best: tuple[float, str | None, dict[float, int]] | None = None
        if self._unseen(exclude) > 0:
            best = (self._precision({}), None, {})
        skip = set(exclude)
        for site, counts in self._sites.items():
            precision = self._precision(counts)
            if site not in skip and (best is None or precision > best[0]):
                best = (precision, site, counts)
        if best is None:
            return SiteSpend(None, 0, 0.0)
        precision, worst, history = best
        more = int(noise_multiplier is not None)
        return SiteSpend(worst, self._rounds(history) + more, self._epsilon(precision + extra))

    def median(self) -> float:
        """Epsilon of the population's median site (the upper of the middle two), unsampled sites included."""
        values = [self._precision(c) for c in self._sites.values()] + [self._precision({})] * self._unseen()
        values.sort()
        return self._epsilon(values[len(values) // 2]) if values else 0.0

    def exhausted(self, noise_multiplier: float, target_epsilon: float) -> frozenset[str]:
        """Sites that took part and would pass ``target_epsilon`` after one more round at that z."""
        extra = math.inf if noise_multiplier == 0 else (self.sensitivity / noise_multiplier) ** 2
        return frozenset(
            site
            for site, counts in self._sites.items()
            if self._epsilon(self._precision(counts) + extra) > target_epsilon
        )
