"""The round as messages: the one federation logic that every backend drives.

The server side of a round is: select sites, let each layer begin the round (adjust the tasks, run the
exchanges that precede training), send each site a :class:`~confide.core.Task` with the global weights,
take their updates as they arrive through the layers in reverse stack order into the aggregator, let each
layer close the round (secure aggregation unmasks the sum there), charge the privacy ledger, and take one
server-optimizer step. A backend only carries tasks to sites and updates back; it never decides anything,
so the local simulation and a real deployment run exactly this code. The federation knows no layer by name
(:mod:`confide.pipeline`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from confide.core import (
    COMPUTE_SECONDS,
    EXAMPLES,
    LOSS_SUM,
    Plan,
    SiteEvaluation,
    Task,
    Traffic,
    Update,
    Vector,
    is_encrypted,
)
from confide.errors import UpdateError
from confide.pipeline import (
    Aggregator,
    EvaluationContext,
    Layer,
    RoundAbandoned,
    RoundContext,
    check_stack,
    evaluation_kind,
)
from confide.randomness import Randomness, SecretRandomness
from confide.server.strategy import Strategy
from confide.server.validate import ValidateLayer


class Backend(Protocol):
    """Who carries messages between the server and the sites."""

    def sites(self) -> Sequence[str]:
        """The sites that can take part."""
        ...

    def train(self, weights: Vector, tasks: Sequence[Task]) -> Iterator[Update]:
        """Send each task with ``weights``; yield each site's (encoded) update as it arrives."""
        ...

    def evaluate(
        self, weights: Vector, sites: Sequence[str], plan: Plan | None = None
    ) -> Iterator[SiteEvaluation]:
        """Ask ``sites`` to evaluate ``weights`` on their held-out data; with a ``plan`` whose
        personalization is not 'none', each site evaluates its personalized model instead."""
        ...

    def exchange(self, messages: Mapping[str, bytes]) -> Iterator[tuple[str, bytes]]:
        """Carry one protocol message to each named site; yield (site, answer) for each site that answers
        with something. Multi-step protocols (secure aggregation) run over this in every backend."""
        ...

    def traffic(self) -> Traffic:
        """Bytes moved so far each way, counted where the backend serializes its messages (cumulative)."""
        ...

    def now(self) -> float:
        """Seconds since the run began: virtual ones in a simulation (:mod:`confide.runtime.clock`), the
        wall clock's in a deployment."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Ready:
    """A site's answer to a ``hold`` task of an asynchronous run: its update is trained and kept (or, with
    ``failure``, it could not train)."""

    site: str
    model_version: int
    """The model version the site trained on."""
    failure: str | None = None


class AsyncBackend(Backend, Protocol):
    """A backend that can keep sites training between rounds (asynchronous rounds, FedBuff)."""

    def start(self, weights: Vector, task: Task) -> None:
        """Send ``task`` (a ``hold`` task) with ``weights`` to its site, and return at once."""
        ...

    def next_ready(self) -> Ready | None:
        """The next site to finish a started task (waiting for it); None when none is training."""
        ...


@dataclass
class ServerState:
    """Everything the server needs to continue: checkpointed after a round, restored on resume."""

    round: int
    weights: Vector
    optimizer_state: dict[str, Vector] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundResult:
    round: int
    sites: list[str]
    num_examples: int
    train_loss: float
    bytes_sent: int
    bytes_received: int
    seconds: float
    compute_seconds: float = 0.0
    """Time the sites spent in forward, backward and optimizer steps (their own report)."""
    rejected: list[tuple[str, str]] = field(default_factory=list)
    """Sites whose update was refused this round, and why; the round went on without them."""
    abandoned: str | None = None
    """Why the round was abandoned with the model unchanged (too few updates, a failed protocol)."""
    site_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    """What each site whose update the server could read reported (training loss, steps, clipping bit);
    empty under secure aggregation, which shows the server only sums."""
    participants: list[str] = field(default_factory=list)
    """The sites whose updates are in the aggregate."""
    sums: dict[str, float] = field(default_factory=dict)
    """The round's sums of what the sites reported (examples, steps, clipping bits, ...)."""
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    """Each screened site's defence scores (see :attr:`confide.pipeline.RoundContext.scores`)."""
    clock: float = 0.0
    """The backend's clock when the round ended (:meth:`Backend.now`: virtual seconds in a simulation)."""
    staleness: list[int] = field(default_factory=list)
    """Asynchronous rounds: how many model versions old each update of the buffer was."""


class Observer(Protocol):
    """Callbacks for progress displays; the federation never prints."""

    def round_started(self, round: int, sites: Sequence[str]) -> None: ...

    def site_done(self, round: int, site: str) -> None: ...


Charge = Callable[[int, Sequence[str]], None]
"""Spends a round on the privacy ledger, given the sites whose updates reached the aggregate."""


class Federation:
    """Runs rounds of a :class:`Strategy` over any :class:`Backend`, through a stack of layers."""

    def __init__(
        self,
        strategy: Strategy,
        layers: Sequence[Layer] | None = None,
        aggregator: Aggregator | None = None,
        min_updates: int = 0,
        randomness: Callable[[int], Randomness] | None = None,
        secret_sample: bool = False,
    ) -> None:
        """``layers``: the stack (default: the strategy's algorithm layers and validation); ``aggregator``
        replaces the strategy's (central DP wraps it); ``randomness(round)`` is the server's secret
        randomness for a round (seeded only in an insecure simulation)."""
        self.strategy = strategy
        if layers is None:
            layers = [*strategy.layers(), ValidateLayer()]
        self.layers = tuple(layers)
        self.aggregator = aggregator or strategy.aggregator
        self.min_updates = min_updates
        """A round with fewer updates than this is abandoned before anything is spent (0: never)."""
        self.randomness = randomness or (lambda round: SecretRandomness())
        self.secret_sample = secret_sample
        """Draw each round's sites from the server's secret randomness, not the run's seed: the privacy
        accounting assumes the adversary cannot know the sample (central DP's amplification)."""
        check_stack(self.layers, self.aggregator)

    def init_state(self, size: int) -> dict[str, Vector]:
        """The server state of a fresh run: the optimizer's and every layer's."""
        state = self.strategy.init_state(size)
        for layer in self.layers:
            state.update(layer.init_state(size))
        return state

    def round(
        self,
        state: ServerState,
        backend: Backend,
        observer: Observer | None = None,
        charge: Charge | None = None,
        population: int | None = None,
        *,
        exclude: Collection[str] = (),
        min_updates: int | None = None,
        plans: Mapping[str, Plan] | None = None,
    ) -> RoundResult:
        """Run round ``state.round + 1`` and move ``state`` to its result, in place.

        ``plans``: the round's sites and their plans, chosen by the caller instead of the strategy (an
        asynchronous run's buffer: the sites whose updates are ready, each released with its discount).

        ``exclude``: sites not to ask this round (they have spent their privacy budget); ``min_updates``:
        this round's minimum of updates, if higher than the federation's (a round with fewer would be
        charged past the budget), decided before anything is unmasked.

        ``charge(round, participants)`` is called once every update is in and before the aggregate touches
        the model: the privacy accountant spends the round there, so a crash can never leave a used result
        unaccounted. If it raises, the round is abandoned and ``state`` is unchanged.
        """
        started = time.perf_counter()
        counted = backend.traffic()
        ctx = self._context(state, backend, observer, population, exclude, min_updates, plans)
        try:
            self._run(ctx, state, backend, observer)
            reported = len(ctx.participants)
            if reported < ctx.min_updates:
                raise RoundAbandoned(
                    f"only {reported} of {len(ctx.sites)} sites sent an update; a round needs at least "
                    f"{ctx.min_updates}"
                )
        except RoundAbandoned as e:
            if not (charge is not None and self.secret_sample and not ctx.sites):
                return _abandoned(state, ctx, started, str(e), backend.traffic() - counted, backend.now())
            # The secret sample came out empty. Amplification by sampling prices that outcome as part of the
            # round's release: the sum of nobody's updates plus the noise. So that is what is released and
            # charged; abandoning the round instead would tell everyone the sample was empty.
        empty = self.secret_sample and not ctx.sites
        if charge is not None:
            charge(ctx.round, ctx.participants)
        held = next((w for layer in self.layers if (w := layer.apply(ctx, state.weights)) is not None), None)
        if held is not None:
            state.weights = held  # the layer stepped the model in a form the server cannot read (CKKS)
            for layer in self.layers:
                layer.finish(ctx)
        elif ctx.participants or empty:
            try:
                delta = self.aggregator.result(ctx.aggregate, ctx.randomness)
            except UpdateError as e:  # an aggregator with no result of nothing: charged all the same
                return _abandoned(state, ctx, started, str(e), backend.traffic() - counted, backend.now())
            if ctx.shared is not None:
                full = np.zeros_like(state.weights)
                full[ctx.shared] = delta
                delta = full
            ctx.delta = delta
            self.strategy.optimizer.step(state.weights, delta, state.optimizer_state, ctx.round)
            for layer in self.layers:
                layer.finish(ctx)
        state.round = ctx.round
        return _result(ctx, started, backend.traffic() - counted, backend.now())

    def evaluate(
        self, round: int, weights: Vector, sites: Sequence[str], backend: Backend, plan: Plan | None = None
    ) -> EvaluationContext:
        """Have ``sites`` evaluate ``weights`` (their personalizations of them, with a personalizing
        ``plan``), through the layers: the result holds the evaluations the server may read one by one, and
        the total of those it may only read summed (secure aggregation). Raises :class:`RoundAbandoned` when
        a layer cannot complete it (too few sites for a secure sum)."""
        ctx = EvaluationContext(round, list(sites), backend.exchange, evaluation_kind(plan))
        for layer in self.layers:
            layer.begin_evaluation(ctx)
        seen: set[str] = set()
        for evaluation in backend.evaluate(weights, ctx.sites, plan):
            try:
                if evaluation.site not in ctx.sites or evaluation.site in seen:
                    raise UpdateError(f"an unasked or second evaluation came from site {evaluation.site!r}")
                seen.add(evaluation.site)
                decoded: SiteEvaluation | None = evaluation
                for layer in reversed(self.layers):
                    if decoded is None:
                        break
                    decoded = layer.decode_evaluation(decoded, ctx)
                if decoded is not None:
                    ctx.evaluations.append(decoded)
            except UpdateError as e:
                ctx.rejected.append((evaluation.site, str(e)))
        for layer in reversed(self.layers):
            layer.close_evaluation(ctx)
        return ctx

    def _context(
        self,
        state: ServerState,
        backend: Backend,
        observer: Observer | None,
        population: int | None,
        exclude: Collection[str],
        min_updates: int | None,
        plans: Mapping[str, Plan] | None = None,
    ) -> RoundContext:
        """The next round's sites, plans and empty aggregate."""
        r = state.round + 1
        everyone = backend.sites()
        randomness = self.randomness(r)
        if plans is None:
            available = [s for s in everyone if s not in exclude] if exclude else everyone
            sites = self.strategy.select(r, available, randomness if self.secret_sample else None)
            plans = self.strategy.plans(r, sites)
        else:
            sites = sorted(plans)
        if observer is not None:
            observer.round_started(r, sites)
        shared = self.strategy.shared
        return RoundContext(
            round=r,
            sites=sites,
            tasks={site: Task(site, plans[site], model_version=state.round) for site in sites},
            weights=state.weights,
            server_state=state.optimizer_state,
            exchange=backend.exchange,
            min_updates=max(self.min_updates, min_updates or 0),
            randomness=randomness,
            population=population if population is not None else len(everyone),
            aggregator=self.aggregator,
            aggregate=self.aggregator.init(_update_size(state.weights, shared)),
            shared=shared,
        )

    def _decode(self, update: Update, ctx: RoundContext) -> Update | None:
        """The update through the layers in reverse stack order; None when a layer keeps it (secure
        aggregation: it reaches the aggregate only summed, in close())."""
        decoded: Update | None = update
        for layer in reversed(self.layers):
            if decoded is None:
                break
            decoded = layer.decode(decoded, ctx)
        return decoded

    def _run(
        self,
        ctx: RoundContext,
        state: ServerState,
        backend: Backend,
        observer: Observer | None,
    ) -> None:
        """The round up to its aggregate: begin, every update through the layers, close."""
        for layer in self.layers:
            layer.begin(ctx)
        tasks = [ctx.tasks[site] for site in ctx.sites]
        seen: set[str] = set()
        weights = ctx.broadcast if ctx.broadcast is not None else state.weights
        for update in backend.train(weights, tasks):
            try:
                _check(update, ctx.round, ctx.tasks, seen)
                decoded = self._decode(update, ctx)
                if decoded is not None:
                    ctx.add(decoded)
                    for layer in self.layers:
                        layer.accept(decoded, ctx)
            except UpdateError as e:
                # A malformed or hostile update costs its site this round, never the run.
                ctx.rejected.append((update.site, str(e)))
                continue
            if observer is not None:
                observer.site_done(ctx.round, update.site)
        for layer in reversed(self.layers):
            layer.close(ctx)


def _update_size(weights: Vector, shared: np.ndarray | None) -> int:
    """How many values an update has; 0 when the model is held encrypted, whose layer sums the updates."""
    if is_encrypted(weights):
        return 0
    return weights.size if shared is None else shared.size


def _check(update: Update, round: int, tasks: Mapping[str, Task], seen: set[str]) -> None:
    if update.site not in tasks:
        raise UpdateError(f"an update came from site {update.site!r}, which was not asked in round {round}")
    if update.site in seen:
        raise UpdateError(f"site {update.site!r} sent a second update in round {round}")
    if update.round != round:
        raise UpdateError(f"site {update.site!r} sent an update for round {update.round}, not {round}")
    seen.add(update.site)


def _result(ctx: RoundContext, started: float, traffic: Traffic, clock: float) -> RoundResult:
    examples = ctx.sums.get(EXAMPLES, 0.0)
    return RoundResult(
        round=ctx.round,
        sites=ctx.sites,
        num_examples=round(examples),
        train_loss=ctx.sums.get(LOSS_SUM, float("nan")) / examples if examples else float("nan"),
        bytes_sent=traffic.sent,
        bytes_received=traffic.received,
        seconds=time.perf_counter() - started,
        compute_seconds=ctx.sums.get(COMPUTE_SECONDS, 0.0),
        rejected=ctx.rejected,
        site_metrics=ctx.accepted,
        participants=ctx.participants,
        sums=dict(ctx.sums),
        scores=dict(ctx.scores),
        clock=clock,
    )


def _abandoned(
    state: ServerState, ctx: RoundContext, started: float, reason: str, traffic: Traffic, clock: float
) -> RoundResult:
    """The round ends without a result: the model stays as it was, and what was sent is still counted."""
    state.round = ctx.round
    return RoundResult(
        round=ctx.round,
        sites=ctx.sites,
        num_examples=0,
        train_loss=float("nan"),
        bytes_sent=traffic.sent,
        bytes_received=traffic.received,
        seconds=time.perf_counter() - started,
        rejected=ctx.rejected,
        abandoned=f"{reason}; the model is unchanged",
        scores=dict(ctx.scores),
        clock=clock,
    )


def summarize(
    evaluations: Sequence[SiteEvaluation], total: SiteEvaluation | None = None, summed: int = 0
) -> tuple[dict[str, float], list[tuple[str, float, float, int]]]:
    """Pooled and per-site metrics from the sites' sums.

    The pooled numbers weight every predicted character equally; the per-site spread (mean, and the worst
    decile: 10th percentile of accuracy, 90th of loss and perplexity) shows how the worst-served sites fare.
    ``total`` is the sum of ``summed`` more sites' evaluations that the server may read only summed (secure
    aggregation): they count in the pooled numbers, and the spread, which no sum shows, is NaN without any
    evaluation read one by one.
    """
    pooled = [*evaluations, *([total] if total is not None else [])]
    all_targets = sum(e.targets for e in pooled)
    loss = float(sum(e.loss_sum for e in pooled) / max(all_targets, 1)) if pooled else float("nan")
    metrics: dict[str, float] = {
        "loss": loss,
        "accuracy": float(sum(e.correct for e in pooled) / max(all_targets, 1)) if pooled else float("nan"),
        "perplexity": float(np.exp(loss)),
        "eval_sites": float(len(evaluations) + summed),
    }
    targets = np.array([e.targets for e in evaluations], dtype=np.float64)
    losses = np.array([e.loss_sum for e in evaluations]) / np.maximum(targets, 1)
    accuracies = np.array([e.correct for e in evaluations]) / np.maximum(targets, 1)
    site_perplexity = np.exp(losses)
    spread = {
        "site_accuracy_mean": (accuracies, None),
        "site_accuracy_p10": (accuracies, 10),
        "site_loss_mean": (losses, None),
        "site_loss_p90": (losses, 90),
        "site_perplexity_mean": (site_perplexity, None),
        "site_perplexity_p90": (site_perplexity, 90),
    }
    for key, (values, percentile) in spread.items():
        if not len(values):
            metrics[key] = float("nan")
        elif percentile is None:
            metrics[key] = float(values.mean())
        else:
            metrics[key] = float(np.percentile(values, percentile))
    per_site = [
        (e.site, float(lo), float(a), int(n))
        for e, lo, a, n in zip(evaluations, losses, accuracies, targets, strict=True)
    ]
    return metrics, per_site
