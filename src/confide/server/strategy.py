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
from typing import Any, Protocol

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
STRAGGLER_STREAM = 5

ALGORITHMS = ("fedavg", "fedprox", "scaffold", "fednova")
PERSONALIZATIONS = ("none", "ditto", "fedrep", "finetune")
CONTROL_KEY = "scaffold.control"
"""SCAFFOLD's server control variate c, kept in the server state beside the optimizer's (and checkpointed)."""


def rng_for(seed: int, round: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, round, stream])


class Aggregator(Protocol):
    """Folds updates into a running state as they arrive, then gives the round's aggregate delta.

    ``rng`` serves aggregators that add noise (DP-FedAvg's central noise); the others ignore it.
    ``needs_individual_updates`` is True for aggregators that must see each site's vector (robust ones),
    which secure aggregation and encryption forbid.
    """

    name: str
    needs_individual_updates: bool

    def init(self, size: int) -> Any: ...

    def add(self, state: Any, update: Update) -> None: ...

    def add_sum(self, state: Any, total: Vector, count: int) -> None:
        """Fold in the sum of ``count`` updates that only arrived summed (secure aggregation): each of those
        sites weighs one, whatever its number of examples."""
        ...

    def result(self, state: Any, rng: np.random.Generator | None = None) -> Vector: ...


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

    def result(self, state: MeanState, rng: np.random.Generator | None = None) -> Vector:
        if state.count == 0:
            raise UpdateError("no update arrived this round; there is nothing to aggregate")
        state.total /= np.float32(state.weight)
        return state.total


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

    def result(self, state: MeanState, rng: np.random.Generator | None = None) -> Vector:
        assert isinstance(state, NovaState)
        mean = super().result(state)
        mean *= np.float32(state.tau / state.weight)
        return mean


@dataclass
class ControlSum:
    """The running sum of SCAFFOLD's control-variate changes in one round."""

    total: Vector
    count: int = 0


class Scaffold:
    """The server side of SCAFFOLD (Karimireddy et al. 2020, Algorithm 1).

    The server keeps c, the mean of all N sites' control variates, sends it with every task, and after the
    round moves it by the sampled sites' changes: c <- c + (1/N) * sum_{i in S} (c_i+ - c_i), which keeps c
    equal to the mean of every site's c_i (sites not sampled keep theirs).
    """

    def init(self, size: int) -> ControlSum:
        return ControlSum(total=np.zeros(size, dtype=np.float32))

    def check(self, update: Update, size: int) -> Vector | None:
        change = update.payload.get("control_delta")
        if change is None:
            if update.metrics.get("steps", 0.0) == 0:
                return None  # a site with nothing to train on leaves its control variate as it was
            raise UpdateError(f"site {update.site!r} trained but sent no SCAFFOLD control-variate change")
        if not (isinstance(change, np.ndarray) and change.dtype == np.float32 and change.shape == (size,)):
            raise UpdateError(
                f"site {update.site!r} sent a SCAFFOLD control change that is not {size} float32 values"
            )
        if not np.isfinite(change).all():
            raise UpdateError(f"site {update.site!r} sent a SCAFFOLD control change with NaN or infinity")
        return change

    def add(self, state: ControlSum, change: Vector | None) -> None:
        if change is not None:
            torch.from_numpy(state.total).add_(torch.from_numpy(change))
            state.count += 1

    def finish(self, control: Vector, state: ControlSum, population: int) -> None:
        control += state.total / np.float32(population)


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

    @property
    def scaffold(self) -> Scaffold | None:
        return Scaffold() if self.algorithm == "scaffold" else None

    def init_state(self, size: int) -> dict[str, Vector]:
        """Fresh server state: the optimizer's, and SCAFFOLD's control variate (zero, as in the paper)."""
        state = self.optimizer.init(size)
        if self.algorithm == "scaffold":
            state[CONTROL_KEY] = np.zeros(size, dtype=np.float32)
        return state

    def extras(self, state: dict[str, Vector]) -> dict[str, Vector]:
        """Vectors sent to every site with its task, besides the global weights."""
        if self.algorithm == "scaffold":
            return {"control": state[CONTROL_KEY]}
        return {}

    def count(self, available: int) -> int:
        if self.sites_per_round < 1:
            return max(1, round(self.sites_per_round * available))
        return min(int(self.sites_per_round), available)

    def select(self, round: int, sites: Sequence[str]) -> list[str]:
        """The sites of round ``round`` in a stable order: ``count`` drawn uniformly without replacement, or
        under Poisson sampling each site independently with probability count / sites (so the number varies,
        and may be zero)."""
        rng = rng_for(self.seed, round, SELECT_STREAM)
        if self.sampling == "poisson":
            rate = self.count(len(sites)) / len(sites)
            return [sites[int(i)] for i in np.flatnonzero(rng.random(len(sites)) < rate)]
        chosen = rng.choice(len(sites), self.count(len(sites)), replace=False)
        return [sites[i] for i in np.sort(chosen)]

    def plans(self, round: int, sites: Sequence[str]) -> dict[str, Plan]:
        seeds = rng_for(self.seed, round, SITE_STREAM).integers(0, 2**31 - 1, size=len(sites))
        work = np.ones(len(sites))
        if self.stragglers > 0:
            rng = rng_for(self.seed, round, STRAGGLER_STREAM)
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
