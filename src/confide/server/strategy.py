"""How a round is planned and how its updates become the next global model.

A :class:`Strategy` answers three questions: which sites take part in round r (seeded, so a resumed run picks
the same ones), what each is asked to do (a :class:`~confide.core.Plan`), and how the updates are combined
(an aggregator, then a server optimizer step on the aggregate). The local algorithm (FedAvg, FedProx,
SCAFFOLD, FedNova) is a plug-in of :mod:`confide.algorithms`: the strategy asks it for the layers and the
aggregator it adds to a round.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import numpy as np

from confide.algorithms import algorithm
from confide.core import Plan, Vector, round_size
from confide.errors import ConfigError
from confide.pipeline import Aggregator, Layer
from confide.randomness import Randomness, Stream, public_rng
from confide.registry import PERSONALIZATIONS
from confide.server.aggregators import MeanState, WeightedMean
from confide.server.optim import ServerOptimizer

__all__ = ["PLAN_SETTINGS", "MeanState", "Strategy", "WeightedMean"]


@dataclass(frozen=True, eq=False)
class Strategy:
    """Synchronous federated optimization: FedAvg and its adaptive-server variants (Reddi et al. 2021),
    FedProx, SCAFFOLD and FedNova, with optional personalization (Ditto, FedRep, fine-tuning)."""

    sites_per_round: float = 10
    """A count (an integer, at least 1) or a fraction of all sites (a number in (0, 1))."""
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 10
    learning_rate: float = 0.1
    optimizer: ServerOptimizer = field(default_factory=ServerOptimizer)
    aggregator: Aggregator = field(default_factory=WeightedMean)
    seed: int = 0
    sampling: str = "fixed"
    """'fixed': exactly ``count`` sites without replacement; 'poisson': each site with rate count / sites."""
    algorithm: str = "fedavg"
    mu: float = 0.0
    personalization: str = "none"
    personal_steps: int = 0
    personal_lambda: float = 0.0
    personal_learning_rate: float = 0.0
    stragglers: float = 0.0
    """Fraction of each round's sites that do only part of the local work (systems heterogeneity)."""
    min_work: float = 0.1
    """A straggler does a fraction of the work drawn uniformly from [min_work, 1)."""
    record_clip: float = 0.0
    """Record-level DP-SGD at the sites: per-window gradient clip norm; 0 turns it off."""
    record_noise: float = 0.0
    shared: np.ndarray | None = None
    """Positions of the parameters the federation shares (FedRep: the body); None: all of them."""

    def __post_init__(self) -> None:
        s = self.sites_per_round
        if not (s >= 1 and float(s).is_integer()) and not 0 < s < 1:
            raise ConfigError(
                f"server.sites_per_round must be a whole count >= 1 or a fraction in (0, 1) (got {s})"
            )
        PERSONALIZATIONS.check(self.personalization)
        object.__setattr__(self, "aggregator", algorithm(self.algorithm).aggregator(self.aggregator))

    def init_state(self, size: int) -> dict[str, Vector]:
        """Fresh server state of the optimizer (layers add their own: see Layer.init_state)."""
        return self.optimizer.init(size)

    def layers(self) -> list[Layer]:
        """The server's half of the local algorithm, as layers of the round (SCAFFOLD's control variates)."""
        return algorithm(self.algorithm).layers()

    def count(self, available: int) -> int:
        return round_size(self.sites_per_round, available)

    def select(self, round: int, sites: Sequence[str], secret: Randomness | None = None) -> list[str]:
        """The sites of round ``round`` in a stable order: ``count`` drawn uniformly without replacement, or
        under Poisson sampling each site independently with probability count / sites (so the number varies,
        and may be zero).

        The draw is public (from the run's seed, so a resumed run asks the same sites) unless ``secret`` is
        given: amplification by sampling holds only against someone who cannot know the sample, and anyone
        with the config knows the seed."""
        if secret is not None:
            uniforms = secret.uniform(len(sites))
        else:
            uniforms = public_rng(self.seed, round, Stream.SELECT).random(len(sites))
        if self.sampling == "poisson":
            rate = self.count(len(sites)) / len(sites)
            return [sites[int(i)] for i in np.flatnonzero(uniforms < rate)]
        if secret is None:  # the draw every seeded run has made so far
            chosen = public_rng(self.seed, round, Stream.SELECT).choice(
                len(sites), self.count(len(sites)), replace=False
            )
        else:
            chosen = np.argsort(uniforms)[: self.count(len(sites))]
        return [sites[i] for i in np.sort(chosen)]

    def plans(self, round: int, sites: Sequence[str]) -> dict[str, Plan]:
        seeds = public_rng(self.seed, round, Stream.SITE_PLAN).integers(0, 2**31 - 1, size=len(sites))
        work = np.ones(len(sites))
        if self.stragglers > 0:
            rng = public_rng(self.seed, round, Stream.STRAGGLER)
            slow = rng.random(len(sites)) < self.stragglers
            work[slow] = rng.uniform(self.min_work, 1.0, size=int(slow.sum()))
        return {
            site: self.plan(round, int(s), float(w)) for site, s, w in zip(sites, seeds, work, strict=True)
        }

    def plan(self, round: int, seed: int, work: float = 1.0) -> Plan:
        """Site plan of round ``round``: every setting the strategy and the plan share, copied across."""
        return Plan(
            round=round, seed=seed, work=work, **{name: getattr(self, name) for name in PLAN_SETTINGS}
        )


PLAN_SETTINGS = tuple(
    sorted({f.name for f in fields(Plan)} & {f.name for f in fields(Strategy)} - {"round", "seed", "work"})
)
"""The per-round settings a Strategy hands every site in its Plan (the strategy's ``seed`` is the run's)."""
