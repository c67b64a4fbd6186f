"""Correlated noise across rounds: DP-FTRL by a banded matrix factorization, with no sampling assumption.

DP-FedAvg adds fresh noise to every round's sum and leans on amplification by sampling for a usable epsilon,
which holds only against someone who does not know who took part. A server that draws the sample knows it.
The matrix-factorization mechanisms behind Gboard's production models (Kairouz et al. 2021, "Practical and
Private (Deep) Learning without Sampling or Shuffling"; Denisov et al. 2022; Choquette-Choo et al. 2023,
"(Amplified) Banded Matrix Factorization") need no sampling: the noise of round t is correlated with that of
the rounds before, so most of it cancels in the model, which is the *sum* of the rounds' updates.

The mechanism. Stack the rounds' sums of clipped updates as the rows of x and write the model's trajectory
as the prefix sums A x (A: lower-triangular ones). Factor A = B C with C lower-triangular and release
C x + z, z Gaussian; the server uses x̂ = C^-1 (C x + z) = x + C^-1 z as the noised sums, so the model sees
A x + B z. Only C decides the privacy: one site's participations move C x by the columns of C at its rounds.

The factorization. C here is b-banded, lower-triangular and Toeplitz, c_0 .. c_(b-1) the first b coefficients
of the square root of the optimizer's workload (Kalinin & Lampert 2024, "Banded Square Root Matrix
Factorization for Differentially Private Model Training": close to the optimized banded factorizations of
Choquette-Choo et al. 2023 at none of their cost). For plain SGD the workload is A, whose square root has
the coefficients binom(2k, k) / 4^k; with server momentum beta it is the series of
((1 - x)(1 - beta x))^(-1/2). The factorization only moves utility; the accounting below holds for any C.

Privacy (the zero-out or add-or-remove relation per site, as :mod:`confide.privacy.accountant`). C has
non-negative entries, so the worst direction of a site's clipped updates is all of them aligned and the
sensitivity of C x for a site that took part in rounds pi is C_norm sqrt(sum over i, j in pi of G(|i - j|)),
G the Gram sequence of the coefficients, G(d) = sum_k c_k c_(k+d), zero from d = b on (Choquette-Choo et al.
2023, Theorem 2). Releasing C x + z is one Gaussian mechanism per site, composed adaptively at no extra cost
(Denisov et al. 2022, Theorem 2.1), so a site's epsilon is that of a Gaussian with mu = sensitivity / sigma,
whoever knows the sample. Sites that took part in the last b - 1 rounds are not asked again
(:meth:`BandedLedger.recent`): their columns do not overlap, and a site in k rounds costs
sqrt(k G(0)) clip norms, against sqrt(k) with fresh noise.

Where the noise comes from. The recursion w_t = (z_t - sum_(j >= 1) c_j w_(t-j)) / c_0 needs the last b - 1
noise vectors: the party that adds the noise must keep them. A trusted aggregator (central DP) does; sites
that each add a share of fresh noise under secure aggregation cannot, since the correlated part would have
to be subtracted by someone who knows the earlier shares, which is exactly what secure aggregation hides. So
correlated noise runs with ``privacy.dp = "central"`` only, and distributed DP keeps fresh noise (with the
per-site account, no amplification). The history is never written to disk (it is the noise): a resumed run
starts a new stream, which can only lower the sensitivity the ledger already charged.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Collection, Iterable

import numpy as np

from confide.core import Vector
from confide.errors import ConfigError
from confide.privacy.accountant import SiteSpend, gaussian_epsilon, sensitivity
from confide.randomness import Randomness

MAX_BANDS = 256
"""The most bands a run may ask for: the aggregator keeps b - 1 noise vectors of the model's size."""


def square_root_coefficients(terms: int, momentum: float = 0.0) -> np.ndarray:
    """The first ``terms`` coefficients of the square root of the workload of SGD (``momentum`` 0) or of
    SGD with heavy-ball momentum: the power series of ((1 - x)(1 - momentum x))^(-1/2), in float64."""
    if isinstance(terms, bool) or not isinstance(terms, int) or terms < 1:
        raise ConfigError(f"the number of bands must be a whole number >= 1 (got {terms!r})")
    if not 0 <= momentum < 1:
        raise ConfigError(f"the momentum of the workload must lie in [0, 1) (got {momentum})")
    k = np.arange(1, terms, dtype=np.float64)
    root = np.concatenate([[1.0], np.cumprod((2 * k - 1) / (2 * k))])  # binom(2k, k) / 4^k
    if momentum == 0:
        return root
    return np.convolve(root, root * momentum ** np.arange(terms))[:terms]


def gram(coefficients: np.ndarray) -> np.ndarray:
    """G(d) = sum_k c_k c_(k+d) for d = 0 .. b - 1: the inner product of two columns of C d rounds apart."""
    c = np.asarray(coefficients, dtype=np.float64)
    return np.array([float(c[: c.size - d] @ c[d:]) for d in range(c.size)])


def inverse_coefficients(coefficients: np.ndarray, terms: int) -> np.ndarray:
    """The first ``terms`` coefficients of 1 / C(x): the Toeplitz inverse of C, which is not banded."""
    c = np.asarray(coefficients, dtype=np.float64)
    inverse = np.zeros(terms)
    for t in range(terms):
        tail = sum(c[j] * inverse[t - j] for j in range(1, min(c.size, t + 1)))
        inverse[t] = ((1.0 if t == 0 else 0.0) - tail) / c[0]
    return inverse


def model_noise(coefficients: np.ndarray | None, rounds: int, momentum: float = 0.0) -> np.ndarray:
    """The standard deviation of the noise in the model after each of ``rounds`` rounds, per coordinate, in
    units of one round's fresh noise: sqrt(t) for fresh noise (``coefficients`` None) under SGD.

    The model after t rounds carries sum_s a_(t-s) w_s, with a the workload's coefficients (1, or
    (1 - momentum^(k+1)) / (1 - momentum) with momentum) and w = C^-1 z; its variance is the sum of the
    squared coefficients of the series a(x) / C(x) up to t.
    """
    k = np.arange(rounds, dtype=np.float64)
    workload = np.ones(rounds) if momentum == 0 else (1 - momentum ** (k + 1)) / (1 - momentum)
    if coefficients is None:
        series = workload
    else:
        series = np.convolve(workload, inverse_coefficients(coefficients, rounds))[:rounds]
    return np.sqrt(np.cumsum(series**2))


class BandedNoise:
    """The aggregator's correlated noise: w_t = C^-1 z in unit standard deviation, one round at a time.

    Holds the last b - 1 draws (float32 vectors of the model's size): this is secret state of whoever adds
    the noise, never written anywhere. :meth:`next` draws z_t from ``randomness`` (secret) and returns w_t.
    """

    def __init__(self, coefficients: np.ndarray) -> None:
        c = np.asarray(coefficients, dtype=np.float64)
        if c.ndim != 1 or c.size < 1 or not c[0] > 0:
            raise ConfigError("a banded factorization needs coefficients with c_0 > 0")
        self.coefficients = c
        self._history: deque[Vector] = deque(maxlen=max(c.size - 1, 0))
        self.released = 0

    @property
    def bands(self) -> int:
        return int(self.coefficients.size)

    def next(self, size: int, randomness: Randomness) -> Vector:
        """w_t for the next round, a float32 vector of ``size`` values with unit-scale noise."""
        w = randomness.normal(size, 1.0)
        if self._history and self._history[0].size != size:
            raise ConfigError(
                f"the correlated noise was drawn for {self._history[0].size} values and is now asked for "
                f"{size}: the model changed size mid-run"
            )
        for j, earlier in enumerate(self._history, start=1):  # newest first
            w -= np.float32(self.coefficients[j]) * earlier
        if self.coefficients[0] != 1.0:
            w /= np.float32(self.coefficients[0])
        if self._history.maxlen:
            self._history.appendleft(w.copy())
        self.released += 1
        return w

    def __repr__(self) -> str:
        return f"BandedNoise(bands={self.bands}, released={self.released})"


class BandedLedger:
    """Each site's privacy account under correlated noise: the sensitivity of its rounds, exactly.

    The same questions as :class:`~confide.privacy.accountant.SiteLedger` (each site's epsilon, the worst and
    the median site, who would pass the budget), answered for the banded mechanism: a site's precision is
    sensitivity^2 sum over its rounds i, j of G(|i - j|) / z^2. Rounds are counted in releases (a round that
    was charged), so an abandoned round never narrows the gap the Gram sequence sees; a real gap is never
    smaller than the counted one and G decreases with the gap, so that never under-counts. The epsilon holds
    against anyone, whether or not they know who took part: nothing here assumes the sample is secret.
    """

    def __init__(
        self, coefficients: np.ndarray, method: str, sampling: str, population: int, delta: float
    ) -> None:
        self.gram = gram(coefficients)
        self.bands = int(self.gram.size)
        self.method = method
        self.sensitivity = sensitivity(sampling)
        self.population = population
        self.delta = delta
        self.noise_multiplier: float | None = None
        self.releases = 0
        self._sum: dict[str, float] = {}
        """Per site: sum over its rounds i, j of G(|i - j|)."""
        self._recent: dict[str, deque[int]] = {}
        """Per site: its rounds among the last b - 1 releases (the only ones the Gram sequence still sees)."""

    def _check_noise(self, noise_multiplier: float) -> None:
        if self.noise_multiplier is None:
            self.noise_multiplier = float(noise_multiplier)
        elif float(noise_multiplier) != self.noise_multiplier:
            raise ConfigError(
                f"correlated noise is accounted for one noise multiplier a run (was {self.noise_multiplier}, "
                f"now {noise_multiplier}); resume a run with the noise it started with"
            )

    def _extra(self, site: str, at: int) -> float:
        """What taking part in release ``at`` adds to a site's Gram sum: G(0) and twice its overlaps."""
        overlap = sum(self.gram[at - p] for p in self._recent.get(site, ()) if at - p < self.bands)
        return float(self.gram[0] + 2.0 * overlap)

    def record(self, noise_multiplier: float, participants: Collection[str] | None, steps: int = 1) -> None:
        """Charge one release at ``noise_multiplier`` to ``participants``."""
        if participants is None:
            raise ConfigError(
                "correlated noise is accounted from each round's participants, and this round's are unknown"
            )
        if steps != 1:
            raise ConfigError(f"correlated noise charges one release at a time (got {steps} steps)")
        if len(set(participants)) != len(participants):
            raise ConfigError("a round's participants must be distinct sites (one site is listed twice)")
        self._check_noise(noise_multiplier)
        at = self.releases
        for site in participants:
            self._sum[site] = self._sum.get(site, 0.0) + self._extra(site, at)
            recent = self._recent.setdefault(site, deque())
            recent.append(at)
        self.releases += 1
        for recent in self._recent.values():
            while recent and self.releases - recent[0] >= self.bands:
                recent.popleft()

    def recent(self) -> frozenset[str]:
        """Sites whose columns would overlap the next release's: they took part in the last b - 1."""
        return frozenset(site for site, rounds in self._recent.items() if rounds)

    def _precision(self, gram_sum: float, noise_multiplier: float | None = None) -> float:
        z = noise_multiplier if noise_multiplier is not None else self.noise_multiplier
        if gram_sum == 0:
            return 0.0
        if z is None or z == 0:
            return math.inf
        return gram_sum * (self.sensitivity / z) ** 2

    def _epsilon(self, precision: float) -> float:
        return gaussian_epsilon(precision, self.delta, self.method)

    def participations(self) -> dict[str, float]:
        """Per site that took part: its Gram sum (k G(0) for k well separated rounds)."""
        return dict(self._sum)

    def site_epsilons(self) -> dict[str, float]:
        return {site: self._epsilon(self._precision(s)) for site, s in self._sum.items()}

    def unseen_epsilon(self) -> float:
        return 0.0

    def worst(self, noise_multiplier: float | None = None, exclude: Collection[str] = ()) -> SiteSpend:
        """The site that has spent most, or would after taking part in the next release (``noise_multiplier``
        given); sites in ``exclude`` left out."""
        skip = set(exclude)
        more = noise_multiplier is not None
        best: tuple[float, str | None] | None = None
        if len(set(self._sum) | skip) < self.population:
            best = (self.gram[0] if more else 0.0, None)
        for site, s in self._sum.items():
            if site in skip:
                continue
            total = s + (self._extra(site, self.releases) if more else 0.0)
            if best is None or total > best[0]:
                best = (total, site)
        if best is None:
            return SiteSpend(None, 0, 0.0)
        total, worst = best
        rounds = round(total / self.gram[0])
        return SiteSpend(worst, rounds, self._epsilon(self._precision(total, noise_multiplier)))

    def median(self) -> float:
        values = sorted([*self._sum.values(), *[0.0] * max(0, self.population - len(self._sum))])
        return self._epsilon(self._precision(values[len(values) // 2])) if values else 0.0

    def exhausted(self, noise_multiplier: float, target_epsilon: float) -> frozenset[str]:
        """Sites that would pass ``target_epsilon`` by taking part in the next release."""
        return frozenset(
            site
            for site, s in self._sum.items()
            if self._epsilon(self._precision(s + self._extra(site, self.releases), noise_multiplier))
            > target_epsilon
        )

    def replay(self, entries: Iterable[tuple[float, Collection[str] | None]]) -> None:
        for noise_multiplier, participants in entries:
            self.record(noise_multiplier, participants)


def default_bands(population: int, sites_per_round: int, rounds: int) -> int:
    """b such that every site can sit out b - 1 rounds between two of its own: population // per round,
    at most the run's rounds and :data:`MAX_BANDS`, at least 1."""
    return max(1, min(population // max(sites_per_round, 1), rounds, MAX_BANDS))


def max_participations(rounds: int, bands: int) -> int:
    """The most rounds a site can take part in when two of its rounds are at least ``bands`` apart."""
    return math.ceil(rounds / bands)
