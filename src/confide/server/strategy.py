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
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from confide.core import Plan, Update, Vector
from confide.errors import ConfigError, UpdateError
from confide.pipeline import Aggregator, Layer, Traits
from confide.randomness import Randomness, Stream, public_rng
from confide.server.optim import ServerOptimizer
from confide.server.scaffold import ScaffoldLayer

ALGORITHMS = ("fedavg", "fedprox", "scaffold", "fednova")
PERSONALIZATIONS = ("none", "ditto", "fedrep", "finetune")

@dataclass
class MeanState:
    total: Vector
    weight: float = 0.0
    count: int = 0


class WeightedMean:
    """The example-weighted mean of the updates (FedAvg, McMahan et al. 2017, eq. for w_{t+1})."""

    name = "mean"
    traits = Traits()

    def init(self, size: int) -> MeanState:
        return MeanState(total=np.zeros(size, dtype=np.float32))

    def add(self, state: MeanState, update: Update) -> None:
        vector = update.readable(state.total.size)
        if update.num_examples <= 0:
            raise UpdateError(
                f"site {update.site!r} reported {update.num_examples} examples; an update needs at least one"
            )
        # One fused pass (axpy) over memory: total += n·Δ, with no temporary array.
        torch.from_numpy(state.total).add_(torch.from_numpy(vector), alpha=float(update.num_examples))
        state.weight += update.num_examples
        state.count += 1

    def add_sum(self, state: MeanState, total: Vector, count: int) -> None:
        if total.shape != state.total.shape:
            raise UpdateError(f"a sum of {total.size} values arrived; the model has {state.total.size}")
        state.total += total
        state.weight += count
        state.count += count

    def result(self, state: MeanState, randomness: Randomness) -> Vector:
        if state.count == 0:
            raise UpdateError("no update arrived this round; there is nothing to aggregate")
        state.total /= np.float32(state.weight)
        return state.total

    def sensitivity(self, clip_norm: float) -> float | None:
        return None  # one site with many examples can move an example-weighted mean arbitrarily far


@dataclass
class NovaState(MeanState):
    tau: float = 0.0
    """Sum of p_i * a_i: the effective number of local steps of the round."""


class NormalizedMean(WeightedMean):
    """FedNova's normalized averaging (Wang et al. 2020, "Tackling the Objective Inconsistency Problem").

    A site that takes more local steps moves further; plain averaging then pulls the model towards the sites
    that did more work, not towards the average site's optimum. FedNova divides each delta by the site's
    normalizer a_i (its number of SGD steps, adjusted for momentum) and rescales the mean by the effective
    step count: delta = (sum_i p_i a_i) * sum_i p_i delta_i / a_i, with p_i the example weights.
    """

    name = "fednova"
    traits = Traits(needs_individual_updates=True)
    """It divides each update by that site's own normalizer."""

    def init(self, size: int) -> NovaState:
        return NovaState(total=np.zeros(size, dtype=np.float32))

    def add(self, state: MeanState, update: Update) -> None:
        assert isinstance(state, NovaState)
        a = update.metrics.get("normalizer", float("nan"))
        if not (np.isfinite(a) and a > 0):
            raise UpdateError(
                f"site {update.site!r} sent no valid FedNova normalizer (got {a}); it must report the "
                "positive number of local steps it took"
            )
        vector = update.readable(state.total.size)
        scaled = Update(
            update.site,
            update.round,
            update.num_examples,
            vector / np.float32(a),
            update.model_version,
        )
        super().add(state, scaled)
        state.tau += update.num_examples * a

    def add_sum(self, state: MeanState, total: Vector, count: int) -> None:
        raise UpdateError("FedNova needs each site's step count beside its update; it cannot use a bare sum")

    def result(self, state: MeanState, randomness: Randomness) -> Vector:
        assert isinstance(state, NovaState)
        mean = super().result(state, randomness)
        mean *= np.float32(state.tau / state.weight)
        return mean


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
        if self.algorithm not in ALGORITHMS:
            accepted = ", ".join(map(repr, ALGORITHMS))
            raise ConfigError(f"server.strategy must be one of {accepted} (got {self.algorithm!r})")
        if self.personalization not in PERSONALIZATIONS:
            accepted = ", ".join(map(repr, PERSONALIZATIONS))
            raise ConfigError(
                f"client.personalization must be one of {accepted} (got {self.personalization!r})"
            )
        if self.algorithm == "fednova" and not isinstance(self.aggregator, NormalizedMean):
            object.__setattr__(self, "aggregator", NormalizedMean())

    def init_state(self, size: int) -> dict[str, Vector]:
        """Fresh server state of the optimizer (layers add their own: see Layer.init_state)."""
        return self.optimizer.init(size)

    def layers(self) -> list[Layer]:
        """The server's half of the local algorithm, as layers of the round (SCAFFOLD's control variates)."""
        return algorithm_layers(self.algorithm)

    def count(self, available: int) -> int:
        if self.sites_per_round < 1:
            return max(1, round(self.sites_per_round * available))
        return min(int(self.sites_per_round), available)

    def select(self, round: int, sites: Sequence[str]) -> list[str]:
        """The sites of round ``round`` in a stable order: ``count`` drawn uniformly without replacement, or
        under Poisson sampling each site independently with probability count / sites (so the number varies,
        and may be zero)."""
        rng = public_rng(self.seed, round, Stream.SELECT)
        if self.sampling == "poisson":
            rate = self.count(len(sites)) / len(sites)
            return [sites[int(i)] for i in np.flatnonzero(rng.random(len(sites)) < rate)]
        chosen = rng.choice(len(sites), self.count(len(sites)), replace=False)
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


def algorithm_layers(algorithm: str) -> list[Layer]:
    """The layers an algorithm adds to every round: what its sites send besides the update, and what the
    server keeps of it between rounds."""
    return [ScaffoldLayer()] if algorithm == "scaffold" else []


PLAN_SETTINGS = tuple(
    sorted({f.name for f in fields(Plan)} & {f.name for f in fields(Strategy)} - {"round", "seed", "work"})
)
"""The per-round settings a Strategy hands every site in its Plan (the strategy's ``seed`` is the run's)."""
