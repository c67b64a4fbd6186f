"""How a round is planned and how its updates become the next global model.

A :class:`Strategy` answers three questions: which sites take part in round r (seeded, so a resumed run picks
the same ones), what each is asked to do (a :class:`~confide.core.Plan`), and how the updates are combined
(an aggregator, then a server optimizer step on the aggregate).

Aggregators follow FedJAX's shape: explicit state, ``init`` → ``add`` per update → ``result``. The weighted
mean keeps one running sum, updated in place as each update arrives, so the server holds one vector however
many sites report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from confide.core import Plan, Update, Vector
from confide.errors import ConfigError, UpdateError
from confide.server.optim import ServerOptimizer

# Independent random streams derived from (seed, round, stream): never one long stream, so that round r
# draws the same numbers whether or not rounds before it ran in this process.
SELECT_STREAM = 1
SITE_STREAM = 2
EVAL_STREAM = 3


def rng_for(seed: int, round: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, round, stream])


@dataclass
class MeanState:
    total: Vector
    weight: float = 0.0
    count: int = 0


class WeightedMean:
    """The example-weighted mean of the updates (FedAvg, McMahan et al. 2017, eq. for w_{t+1})."""

    name = "mean"
    needs_individual_updates = False

    def init(self, size: int) -> MeanState:
        return MeanState(total=np.zeros(size, dtype=np.float32))

    def add(self, state: MeanState, update: Update) -> None:
        if update.vector is None:
            raise UpdateError(f"the update of site {update.site!r} has no readable vector to aggregate")
        if update.num_examples <= 0:
            raise UpdateError(
                f"site {update.site!r} reported {update.num_examples} examples; an update needs at least one"
            )
        if update.vector.shape != state.total.shape:
            raise UpdateError(
                f"site {update.site!r} sent {update.vector.size} values; the model has {state.total.size}"
            )
        # One fused pass (axpy) over memory: total += n·Δ, with no temporary array.
        torch.from_numpy(state.total).add_(torch.from_numpy(update.vector), alpha=float(update.num_examples))
        state.weight += update.num_examples
        state.count += 1

    def result(self, state: MeanState) -> Vector:
        if state.count == 0:
            raise UpdateError("no update arrived this round; there is nothing to aggregate")
        state.total /= np.float32(state.weight)
        return state.total


@dataclass(frozen=True)
class Strategy:
    """Synchronous federated optimization: FedAvg and its adaptive-server variants (Reddi et al. 2021)."""

    sites_per_round: float = 10
    """A count (an integer, at least 1) or a fraction of all sites (a number in (0, 1))."""
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 10
    learning_rate: float = 0.1
    optimizer: ServerOptimizer = field(default_factory=ServerOptimizer)
    aggregator: WeightedMean = field(default_factory=WeightedMean)
    seed: int = 0

    def __post_init__(self) -> None:
        s = self.sites_per_round
        if not (s >= 1 and float(s).is_integer()) and not 0 < s < 1:
            raise ConfigError(
                f"server.sites_per_round must be a whole count >= 1 or a fraction in (0, 1) (got {s})"
            )

    def count(self, available: int) -> int:
        if self.sites_per_round < 1:
            return max(1, round(self.sites_per_round * available))
        return min(int(self.sites_per_round), available)

    def select(self, round: int, sites: Sequence[str]) -> list[str]:
        """The sites of round ``round``, drawn uniformly without replacement, in a stable order."""
        chosen = rng_for(self.seed, round, SELECT_STREAM).choice(
            len(sites), self.count(len(sites)), replace=False
        )
        return [sites[i] for i in np.sort(chosen)]

    def plans(self, round: int, sites: Sequence[str]) -> dict[str, Plan]:
        seeds = rng_for(self.seed, round, SITE_STREAM).integers(0, 2**31 - 1, size=len(sites))
        return {
            site: Plan(
                round=round,
                epochs=self.epochs,
                max_steps=self.max_steps,
                batch_size=self.batch_size,
                learning_rate=self.learning_rate,
                seed=int(s),
            )
            for site, s in zip(sites, seeds, strict=True)
        }
