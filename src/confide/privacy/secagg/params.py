"""The parameters of a secure aggregation round, checked and with their defaults resolved in one place, and
what a site expects them to be (it refuses a server that proposes anything else)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from confide.errors import ConfigError
from confide.privacy.secagg.fixedpoint import FixedPoint
from confide.privacy.secagg.graph import default_neighbours

MAX_SITES = 1 << 20


@dataclass(frozen=True)
class SecAggParams:
    """What the server and every site must agree on before a round of secure aggregation.

    ``neighbours`` and ``threshold`` left at 0 take their defaults; after construction they hold the values
    in force.
    """

    sites: int
    """n: how many sites the round starts with."""
    neighbours: int = 0
    """k: with how many other sites each site agrees masks and shares its secrets (SecAgg+, Bell et al. 2020).
    0: 2 * ceil(log2 n) + 6 (see graph.default_neighbours for why); k >= n - 1 gives the complete graph of
    Bonawitz et al. 2017. Must be even below n - 1."""
    threshold: int = 0
    """t: how many of the k + 1 holders of a site's shares (its neighbours and itself) must answer to unmask
    it. 0: two thirds, ceil(2 (k + 1) / 3) (see :func:`default_threshold`). Must be more than half of
    k + 1: a site never gives both shares of one site, so two disjoint groups of honest holders cannot each
    reach t and unmask a site between them.
    Up to k + 1 - t holders may drop; fewer than t colluding holders learn nothing. Against a server that
    lies about who dropped, while c holders collude with it, 2t > (k + 1) + c must hold: the default
    tolerates c < (k + 1) / 3."""
    clip_range: float = 1.0
    """R: every coordinate of an update is clipped to [-R, R] before encoding."""
    fractional_bits: int = 20
    """f: updates are rounded to multiples of 2^-f (about 1e-6 at the default)."""
    authenticated: bool = False
    """Sites sign their advertised keys with a registered Ed25519 identity and check each other's
    signatures, so a server cannot substitute keys (a man in the middle)."""
    quantize_bits: int = 0
    """q: 0 encodes with ``fractional_bits`` (the fixed point); 1 to 16 quantizes each coordinate
    stochastically to 2^(q-1) - 1 levels each side of zero (see :mod:`.fixedpoint`)."""
    rotated: bool = False
    """The sites rotate their updates (random signs, then a Hadamard transform, the same for every site of
    the round) before encoding, and the server rotates the sum back. The protocol only carries the flag, so
    that the server and every site agree on what the sum means (:mod:`confide.privacy.secure` rotates)."""

    def __post_init__(self) -> None:
        if not 2 <= self.sites <= MAX_SITES:
            raise ConfigError(f"secure aggregation needs between 2 and {MAX_SITES} sites (got {self.sites})")
        neighbours = self.neighbours or default_neighbours(self.sites)
        if neighbours < 0:
            raise ConfigError(f"neighbours must be >= 0 (got {self.neighbours})")
        neighbours = min(neighbours, self.sites - 1)
        if neighbours < self.sites - 1 and (neighbours < 2 or neighbours % 2):
            raise ConfigError(
                f"neighbours must be even (each site takes k/2 neighbours on either side of a ring) or at "
                f"least n - 1 = {self.sites - 1} for the complete graph (got {self.neighbours})"
            )
        holders = neighbours + 1
        threshold = self.threshold or default_threshold(neighbours)
        if not holders < 2 * threshold <= 2 * holders:
            raise ConfigError(
                f"threshold must be more than half of neighbours + 1 = {holders} and at most {holders} "
                f"(got {self.threshold}): with half or fewer, the server could unmask a site by asking two "
                "halves of its neighbours for different shares"
            )
        object.__setattr__(self, "neighbours", neighbours)
        object.__setattr__(self, "threshold", threshold)
        self.fixed_point  # noqa: B018 (checks R and f and that the sum of n updates fits in 64 bits)

    @property
    def complete(self) -> bool:
        """Whether every site is every other site's neighbour (the original protocol)."""
        return self.neighbours == self.sites - 1

    @property
    def fixed_point(self) -> FixedPoint:
        return FixedPoint(self.clip_range, self.fractional_bits, self.sites, self.quantize_bits)


def default_threshold(neighbours: int) -> int:
    """t = ceil(2 (k + 1) / 3), and at least a majority of the k + 1 holders.

    Why two thirds. A malicious server can tell some holders of site u's shares that u survived (they send
    their shares of u's self-mask seed b_u) and the others that u dropped (they send their shares of u's mask
    key s_u); with both secrets it unmasks u's input alone. An honest holder gives one of the two, never both,
    and signs one survivor set (the consistency step), so with c holders colluding the server gets both only
    if t <= h_1 + c and t <= h_2 + c with h_1 + h_2 <= k + 1 - c honest holders: that needs
    2t <= (k + 1) + c. With t = ceil(2 (k + 1) / 3) it needs c >= (k + 1) / 3: up to a third of every
    neighbourhood, less one, may collude with the server. A majority threshold tolerates only
    c < 2t - (k + 1), which is 1 when k + 1 is odd (every even k): not one colluder. The price: only
    k + 1 - t (a third) of a neighbourhood may drop.
    """
    holders = neighbours + 1
    return max(math.ceil(2 * holders / 3), holders // 2 + 1)


@dataclass(frozen=True)
class SecAggExpectation:
    """What a site expects of every round's setup, from its own copy of the run's configuration.

    A site checks the server's Setup against this and refuses any difference: otherwise a malicious server
    could propose a round of two sites (itself posing as the second, so the sum minus its own input is the
    victim's), a clipping range that wraps the sum, no fractional bits, a lower threshold, or the
    unauthenticated mode. ``neighbours`` and ``threshold`` are the configured values (0: the default rule),
    resolved for the size of each round exactly as the server resolves them (:meth:`params`).
    """

    clip_range: float
    """R, as the run's configuration resolves it."""
    fractional_bits: int
    """f."""
    vector_size: int
    """How many values the site's update has (the model's trainable parameters, or the shared part)."""
    authenticated: bool = False
    """Whether rounds must be authenticated (sites sign their keys with registered identities)."""
    neighbours: int = 0
    """k as configured; 0: :func:`~confide.privacy.secagg.graph.default_neighbours` of the round's size. A k
    at least the round's size is capped to n - 1 (the complete graph)."""
    threshold: int = 0
    """t as configured; 0: :func:`default_threshold`. A t above a small round's k + 1 is capped to k + 1."""
    min_sites: int = 2
    """The fewest sites a round may start with and the fewest inputs a sum may hold: a Setup with fewer
    sites, a key broadcast with fewer committed sites and a survivor set with fewer sites are refused. In a
    round of two, the other party learns the site's input (a server posing as the second site, too). Set it
    to the smallest round the run should ever unmask (sites per round less the dropouts allowed)."""
    run: str = ""
    """The run this site takes part in: with the round number, the key under which the site remembers the
    survivor set it answered for (see :class:`~confide.privacy.secagg.history.SurvivorStore`)."""
    quantize_bits: int = 0
    """q as the site's config gives it (0: the fixed point). A server that proposed a smaller q would make
    the site send a coarser encoding than its config allows; any other q would change what the sum means.
    The ring follows from q and the round's size (b = bit_length(n L) + 1), so it cannot be made to wrap."""
    rotated: bool = False
    """Whether the site's config rotates its update before encoding."""

    def __post_init__(self) -> None:
        if self.vector_size < 1:
            raise ConfigError(f"the expected vector size must be at least 1 (got {self.vector_size})")
        if not 2 <= self.min_sites <= MAX_SITES:
            raise ConfigError(f"min_sites must be between 2 and {MAX_SITES} (got {self.min_sites})")
        if self.neighbours < 0 or self.threshold < 0:
            raise ConfigError(
                f"neighbours and threshold must be >= 0 (got {self.neighbours} and {self.threshold})"
            )
        self.params(self.min_sites)  # checks R, f and the rules on a round of the smallest size

    def params(self, sites: int) -> SecAggParams:
        """The parameters a round of ``sites`` sites must have: what the server is expected to propose."""
        k = min(self.neighbours or default_neighbours(sites), sites - 1)
        threshold = min(self.threshold, k + 1) if self.threshold else 0
        return SecAggParams(
            sites,
            k,
            threshold,
            self.clip_range,
            self.fractional_bits,
            authenticated=self.authenticated,
            quantize_bits=self.quantize_bits,
            rotated=self.rotated,
        )

    @classmethod
    def of(
        cls, params: SecAggParams, vector_size: int, *, min_sites: int = 2, run: str = ""
    ) -> SecAggExpectation:
        """The expectation that exactly ``params`` meets (for simulations and tests, where the same process
        plays the server and the sites)."""
        return cls(
            params.clip_range,
            params.fractional_bits,
            vector_size,
            params.authenticated,
            params.neighbours,
            params.threshold,
            min_sites=min_sites,
            run=run,
            quantize_bits=params.quantize_bits,
            rotated=params.rotated,
        )
