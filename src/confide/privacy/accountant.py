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
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import dp_accounting
from dp_accounting import pld, rdp

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
