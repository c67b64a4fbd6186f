"""The parameters of a secure aggregation round, checked and with their defaults resolved in one place."""

from __future__ import annotations

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
    it. 0: a majority, floor((k + 1) / 2) + 1. Must be more than half of k + 1: a site never gives both
    shares of one site, so two disjoint groups of honest holders cannot each reach t and unmask a site between
    them.
    Up to k + 1 - t holders may drop; fewer than t colluding holders learn nothing. Against a server that
    lies about who dropped, while c holders collude with it, t must exceed (k + 1 + c) / 2: a threshold of
    two thirds tolerates c < (k + 1) / 3."""
    clip_range: float = 1.0
    """R: every coordinate of an update is clipped to [-R, R] before encoding."""
    fractional_bits: int = 20
    """f: updates are rounded to multiples of 2^-f (about 1e-6 at the default)."""
    authenticated: bool = False
    """Sites sign their advertised keys with a registered Ed25519 identity and check each other's
    signatures, so a server cannot substitute keys (a man in the middle)."""

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
        threshold = self.threshold or holders // 2 + 1
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
        return FixedPoint(self.clip_range, self.fractional_bits, self.sites)
