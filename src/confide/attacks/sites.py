"""Which sites attack: drawn once per run from its seed, so they are the same in every round (and after a
resume)."""

from __future__ import annotations

from collections.abc import Sequence

from confide.errors import ConfigError
from confide.randomness import Stream, public_rng


def attacker_count(sites: float, population: int) -> int:
    """``attack.sites`` as a count: a whole count as it is, a fraction of ``population`` rounded (at least
    one)."""
    if sites < 1:
        return max(1, round(sites * population))
    count = int(sites)
    if count > population:
        raise ConfigError(
            f"attack.sites = {count} asks for more attackers than the federation has sites ({population}): "
            "lower it, or give a fraction such as 0.1"
        )
    return count


def attackers_of(seed: int, names: Sequence[str], sites: float) -> frozenset[str]:
    """The attacking sites among ``names`` (``attack.sites`` of them), drawn once from the run's seed on the
    public stream :attr:`~confide.randomness.Stream.ATTACK`: the same for every round and every process."""
    if not names:
        return frozenset()
    count = attacker_count(sites, len(names))
    chosen = public_rng(seed, 0, Stream.ATTACK).choice(len(names), count, replace=False)
    ordered = sorted(names)  # independent of the order a backend lists its sites in
    return frozenset(ordered[i] for i in chosen)


def expected_per_round(attackers: int, population: int, per_round: int) -> float:
    """How many attackers a round of ``per_round`` sites drawn uniformly from ``population`` holds on
    average (at least one: an attacker that acts is in its round)."""
    return max(1.0, per_round * attackers / max(population, 1))
