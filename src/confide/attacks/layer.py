"""The attack as a pipeline layer: the first layer of the stack, so it acts on the update as it leaves an
attacking site's training, before any site-side layer.

An attacking site controls its own code. So, unless ``attack.honest_layers``, it then leaves out the
site-side layers honest sites apply for the federation's sake (:data:`SKIPPED`: DP clipping and its share of
distributed noise) and its malicious update leaves the site as it made it, still through the protocol layers
it needs for the server to accept it (secure aggregation masks it). The server's half of every layer runs
as always: where the server reads updates, its own clipping, validation and robust aggregation see the
attacker's update. Honest sites pass through this layer unchanged, and the server's half does nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from confide.attacks.model import ModelAttack, Pool, Settings, little_is_enough_z
from confide.attacks.sites import attacker_count, attackers_of, expected_per_round
from confide.core import Update, Vector
from confide.errors import UpdateError
from confide.pipeline import Layer, SiteContext, StackContext
from confide.registry import ATTACKS

SKIPPED = ("clip", "distributed_noise")
"""Site-side layers an attacking site leaves out unless ``attack.honest_layers``: steps a site takes in good
faith, which the server cannot check under secure aggregation."""


@dataclass
class Coalition:
    """What a group of attackers pools within a round (one attacker alone without collusion): running sums
    of their honest updates, and the round's one shared noise draw. The local backend plays every site in
    one process, so the group shares this object; it is simulation state, never sent anywhere.

    The first colluder of a round has no one's spread but its own; it takes the spread the coalition saw in
    the last round it had two members (little_is_enough's sigma), an estimate of the same quantity."""

    round: int = -1
    count: int = 0
    total: np.ndarray | None = None
    squares: np.ndarray | None = None
    noise: Vector | None = None
    last_std: np.ndarray | None = field(default=None)

    def join(self, round: int, update: Vector) -> Pool:
        if round != self.round:
            if self.count >= 2:
                self.last_std = self._std()
            self.round, self.count, self.noise = round, 0, None
            self.total = np.zeros(update.shape, dtype=np.float64)
            self.squares = np.zeros(update.shape, dtype=np.float64)
        assert self.total is not None and self.squares is not None
        values = update.astype(np.float64)
        self.total += values
        self.squares += values * values
        self.count += 1
        mean = (self.total / self.count).astype(np.float32)
        if self.count >= 2:
            std = self._std()
        elif self.last_std is not None and self.last_std.shape == update.shape:
            std = self.last_std
        else:
            std = np.zeros(update.shape)
        return Pool(mean, std.astype(np.float32), self.count)

    def _std(self) -> np.ndarray:
        assert self.total is not None and self.squares is not None
        mean = self.total / self.count
        return np.sqrt(np.maximum(self.squares / self.count - mean * mean, 0.0))


class AttackLayer(Layer):
    """Replaces each attacking site's update by its attack's :meth:`~ModelAttack.malicious` one."""

    name = "attack"

    @classmethod
    def from_config(cls, stack: StackContext) -> Layer | None:
        a = stack.config.attack
        if a.kind == "none":
            return None
        names = tuple(stack.sites)
        if not names:
            raise UpdateError(
                "attack: the layer stack was built without the federation's site names, so no attacker "
                "can be chosen (build_layers needs sites= in a simulation with [attack])"
            )
        attackers = attackers_of(stack.config.run.seed, names, a.sites)
        attack = ATTACKS.load(a.kind)(settings_for(stack.config, len(names)))
        return cls(attack, attackers, collude=a.collude, honest_layers=a.honest_layers)

    def __init__(
        self,
        attack: ModelAttack,
        attackers: frozenset[str],
        *,
        collude: bool = False,
        honest_layers: bool = False,
    ) -> None:
        self.attack = attack
        self.attackers = attackers
        self.collude = collude
        self.honest_layers = honest_layers
        self._coalitions: dict[str, Coalition] = {}

    def coalition(self, site: str) -> Coalition:
        return self._coalitions.setdefault("*" if self.collude else site, Coalition())

    def encode(self, update: Update, site: SiteContext) -> Update:
        if site.site not in self.attackers:
            return update
        if update.vector is None:
            raise UpdateError(
                f"attack: site {site.site!r}'s update has no vector to replace; the attack layer must come "
                "first in the stack"
            )
        coalition = self.coalition(site.site)
        pool = coalition.join(site.plan.round, update.vector)
        noise = None
        if self.collude and self.attack.shared_noise:
            if coalition.noise is None:
                coalition.noise = self.attack.draw(update.vector.size, site.randomness)
            noise = coalition.noise
        else:
            noise = self.attack.draw(update.vector.size, site.randomness)
        update.vector = self.attack.malicious(update.vector, pool, noise)
        if not self.honest_layers:
            site.skip.update(SKIPPED)
        return update

    def __repr__(self) -> str:
        return (
            f"AttackLayer({self.attack.name}, {len(self.attackers)} attackers, collude={self.collude}, "
            f"honest_layers={self.honest_layers})"
        )


def settings_for(config: object, population: int) -> Settings:
    """The attack's options resolved for a federation of ``population`` sites (boost and z by default)."""
    from confide.config import Config

    assert isinstance(config, Config)
    a, s = config.attack, config.server.sites_per_round
    per_round = max(1, round(s * population)) if s < 1 else min(int(s), population)
    attackers = attacker_count(a.sites, population)
    boost = a.boost
    if boost == 0:
        in_round = expected_per_round(attackers, population, per_round)
        boost = per_round / in_round if a.kind == "model_replacement" else 1.0
    return Settings(
        boost=boost,
        scale=a.scale,
        noise_std=a.noise_std,
        norm_bound=a.norm_bound,
        z=little_is_enough_z(population, attackers),
    )
