"""The round as messages: the one federation logic that every backend drives.

The server side of a round is: select sites, send each a :class:`Task` with the global weights, take their
updates as they arrive, undo the layers (in reverse stack order), fold each into the aggregator, and take
one server-optimizer step. A backend only carries tasks to sites and updates back; it never decides
anything, so the local simulation and a real deployment run exactly this code.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from confide.client.secure import MASKED
from confide.core import Layer, Plan, Update, Vector
from confide.errors import ConfigError, UpdateError
from confide.privacy.policy import CLIP_KEY
from confide.privacy.secagg import (
    MessageError,
    SecAggAbort,
    SecAggParams,
    SecAggServer,
    decode,
    default_neighbours,
)
from confide.privacy.secagg.messages import Message
from confide.server.strategy import CONTROL_KEY, Strategy, rng_for

NOISE_STREAM = 6
SECAGG_STREAM = 10
"""The public session value of a round's secure aggregation (it fixes the neighbour graph)."""
"""The random stream of noise the server adds (central DP), derived from (seed, round) like every other."""

PLAN_HEADER_BYTES = 64
"""What a task costs on the wire besides the weights: round, seed, epochs, batch size, learning rate."""


@dataclass(frozen=True)
class Task:
    """What the server sends one site for one round: the plan, and with the global weights (carried by the
    backend, shared by all tasks of the round) any extra vectors the algorithm needs (SCAFFOLD's c)."""

    site: str
    plan: Plan
    model_version: int
    extras: Mapping[str, Vector] = field(default_factory=dict)

    def nbytes(self, weights: Vector, shared: np.ndarray | None = None) -> int:
        sent = weights.nbytes if shared is None else shared.size * weights.itemsize
        return sent + sum(v.nbytes for v in self.extras.values()) + PLAN_HEADER_BYTES


@dataclass(frozen=True)
class SiteEvaluation:
    """A site's evaluation of a model on its held-out windows, as sums that add up across sites."""

    site: str
    loss_sum: float
    correct: int
    targets: int

    nbytes: int = 48


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

    def close(self) -> None: ...


@dataclass(frozen=True)
class SecureAggregation:
    """Secure aggregation's settings for every round (see :class:`~confide.privacy.secagg.SecAggParams`)."""

    neighbours: int = 0
    threshold: int = 0
    clip_range: float = 1.0
    fractional_bits: int = 20
    authenticated: bool = False
    registry: Mapping[str, bytes] | None = None
    """The sites' registered Ed25519 public keys (authenticated mode)."""

    def params(self, sites: int) -> SecAggParams:
        # A threshold set for more holders than a small round has is capped to that round's holders.
        k = min(self.neighbours or default_neighbours(sites), sites - 1)
        threshold = min(self.threshold, k + 1) if self.threshold else 0
        return SecAggParams(sites, k, threshold, self.clip_range, self.fractional_bits, self.authenticated)


@dataclass
class _Traffic:
    """Bytes that crossed between the server and the sites in one round, each way."""

    sent: int = 0
    received: int = 0


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
    """Why the round was abandoned with the model unchanged (secure aggregation could not unmask the sum)."""
    site_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    """What each accepted site reported (training loss, steps, clipping bit, record-level epsilon, ...)."""


class Observer(Protocol):
    """Callbacks for progress displays; the federation never prints."""

    def round_started(self, round: int, sites: Sequence[str]) -> None: ...

    def site_done(self, round: int, site: str) -> None: ...


class Federation:
    """Runs rounds of a :class:`Strategy` over any :class:`Backend`, with a stack of layers."""

    def __init__(
        self,
        strategy: Strategy,
        layers: Sequence[Layer] = (),
        secure: SecureAggregation | None = None,
        min_updates: int = 0,
    ) -> None:
        self.strategy = strategy
        self.layers = tuple(layers)
        self.secure = secure
        self.min_updates = min_updates
        """A round with fewer updates than this is abandoned before anything is spent (0: never)."""
        hidden = secure is not None or any(not layer.reveals_individual_updates for layer in self.layers)
        if hidden and getattr(strategy.aggregator, "needs_individual_updates", False):
            raise ConfigError(
                f"the aggregator {strategy.aggregator.name!r} must see each site's update, but secure "
                "aggregation (or encryption) shows the server only their sum: use the mean, or an attested "
                "aggregator that can run it inside an enclave"
            )

    def round(
        self,
        state: ServerState,
        backend: Backend,
        observer: Observer | None = None,
        charge: Callable[[int, int], None] | None = None,
    ) -> RoundResult:
        """Run round ``state.round + 1`` and move ``state`` to its result, in place.

        ``charge(round, reported)`` is called once every update is in and before the aggregate touches the
        model, with the number of updates that reached it: the privacy accountant spends the round there, so
        a crash can never leave a used result unaccounted. If it raises, the round is abandoned and ``state``
        is unchanged.
        """
        started = time.perf_counter()
        r = state.round + 1
        sites = self.strategy.select(r, backend.sites())
        plans = self.strategy.plans(r, sites)
        clip = state.optimizer_state.get(CLIP_KEY)
        if clip is not None:  # adaptive clipping: this round's clip norm travels in the plan
            plans = {site: replace(plan, clip_norm=float(clip[0])) for site, plan in plans.items()}
        if observer is not None:
            observer.round_started(r, sites)
        extras = self.strategy.extras(state.optimizer_state)
        tasks = [Task(site, plans[site], model_version=state.round, extras=extras) for site in sites]
        expected = {t.site for t in tasks}
        shared = self.strategy.shared
        size = state.weights.size if shared is None else shared.size

        aggregator = self.strategy.aggregator
        aggregate = aggregator.init(size)
        scaffold = self.strategy.scaffold
        controls = scaffold.init(state.weights.size) if scaffold is not None else None
        seen: set[str] = set()
        rejected: list[tuple[str, str]] = []
        traffic = _Traffic()
        # Each site whose update counts: its number of examples and the metrics it reported.
        accepted: dict[str, tuple[int, dict[str, float]]] = {}
        secure: SecAggServer | None = None
        if self.secure is not None:
            if len(sites) < 2:
                reason = f"secure aggregation needs at least 2 sites and the round drew {len(sites)}"
                return self._abandon(state, r, sites, started, reason, rejected, traffic)
            session = rng_for(self.strategy.seed, r, SECAGG_STREAM).bytes(32)
            params = self.secure.params(len(sites))
            secure = SecAggServer(params, sites, r, size, session=session, registry=self.secure.registry)
            # Keys and encrypted shares go round before the sites train (they do not depend on the update);
            # if too few sites take part in them, the round ends here, before anyone trains for nothing.
            try:
                self._exchange(
                    backend, secure, dict.fromkeys(sites, secure.setup().to_bytes()), rejected, traffic
                )
                self._exchange(backend, secure, _bytes(secure.broadcast_keys()), rejected, traffic)
                self._exchange(backend, secure, _bytes(secure.forward_shares()), rejected, traffic)
            except SecAggAbort as e:
                return self._abandon(state, r, sites, started, str(e), rejected, traffic)
        traffic.sent += sum(t.nbytes(state.weights, shared) for t in tasks)
        for update in backend.train(state.weights, tasks):
            traffic.received += update.nbytes
            try:
                self._check(update, r, expected, seen)
                for layer in reversed(self.layers):
                    update = layer.decode(update)
                if secure is not None:
                    # The masked input joins the secure sum; only survivors' inputs will be in it.
                    masked = update.payload.get(MASKED)
                    if not isinstance(masked, np.ndarray):
                        raise UpdateError(
                            f"site {update.site!r} sent no masked input under secure aggregation"
                        )
                    secure.receive(update.site, decode(masked.tobytes()))
                else:
                    if update.vector is not None and not np.isfinite(update.vector).all():
                        raise UpdateError(
                            f"the update of site {update.site!r} holds NaN or infinite values "
                            "(its local training diverged, or it is hostile)"
                        )
                    # Check everything before folding anything in, so a refused update leaves no trace.
                    change = scaffold.check(update, state.weights.size) if scaffold is not None else None
                    aggregator.add(aggregate, update)
                    if scaffold is not None and controls is not None:
                        scaffold.add(controls, change)
            except UpdateError as e:
                # A malformed or hostile update costs its site this round, never the run.
                rejected.append((update.site, str(e)))
                continue
            except SecAggAbort as e:
                return self._abandon(state, r, sites, started, str(e), rejected, traffic)
            accepted[update.site] = (update.num_examples, dict(update.metrics))
            if observer is not None:
                observer.site_done(r, update.site)
        if secure is not None:
            try:
                self._exchange(backend, secure, _bytes(secure.request_unmasking()), rejected, traffic)
                total = secure.finish()
            except SecAggAbort as e:
                return self._abandon(state, r, sites, started, str(e), rejected, traffic)
            accepted = {site: accepted[site] for site in total.survivors if site in accepted}
            aggregator.add_sum(aggregate, total.vector, len(total.survivors))
        if len(accepted) < self.min_updates:
            reason = (
                f"only {len(accepted)} of {len(sites)} sites sent an update; a round needs at least "
                f"{self.min_updates}"
            )
            return self._abandon(state, r, sites, started, reason, rejected, traffic)
        if charge is not None:
            charge(r, len(accepted))
        if accepted:
            delta = aggregator.result(aggregate, rng_for(self.strategy.seed, r, NOISE_STREAM))
            if shared is not None:
                full = np.zeros_like(state.weights)
                full[shared] = delta
                delta = full
            self.strategy.optimizer.step(state.weights, delta, state.optimizer_state)
            if scaffold is not None and controls is not None:
                scaffold.finish(state.optimizer_state[CONTROL_KEY], controls, len(backend.sites()))
        state.round = r
        examples = sum(n for n, _ in accepted.values())
        loss_sum = sum(n * m.get("train_loss", float("nan")) for n, m in accepted.values())
        return RoundResult(
            round=r,
            sites=sites,
            num_examples=examples,
            train_loss=loss_sum / examples if examples else float("nan"),
            bytes_sent=traffic.sent,
            bytes_received=traffic.received,
            seconds=time.perf_counter() - started,
            compute_seconds=sum(m.get("compute_seconds", 0.0) for _, m in accepted.values()),
            rejected=rejected,
            site_metrics={site: m for site, (_, m) in accepted.items()},
        )

    @staticmethod
    def _exchange(
        backend: Backend,
        secure: SecAggServer,
        messages: Mapping[str, bytes],
        rejected: list[tuple[str, str]],
        traffic: _Traffic,
    ) -> None:
        """One step of secure aggregation over the backend. A site whose answer is refused counts as dropped
        from that step on; the protocol decides if the round survives."""
        traffic.sent += sum(len(m) for m in messages.values())
        for site, answer in backend.exchange(messages):
            traffic.received += len(answer)
            try:
                secure.receive(site, decode(answer))
            except MessageError as e:
                rejected.append((site, str(e)))

    @staticmethod
    def _abandon(
        state: ServerState,
        round: int,
        sites: list[str],
        started: float,
        reason: str,
        rejected: list[tuple[str, str]],
        traffic: _Traffic,
    ) -> RoundResult:
        """The round ends without a result: the model stays as it was, and what was sent is still counted."""
        state.round = round
        return RoundResult(
            round=round,
            sites=sites,
            num_examples=0,
            train_loss=float("nan"),
            bytes_sent=traffic.sent,
            bytes_received=traffic.received,
            seconds=time.perf_counter() - started,
            rejected=rejected,
            abandoned=f"{reason}; the model is unchanged",
        )

    @staticmethod
    def _check(update: Update, round: int, expected: set[str], seen: set[str]) -> None:
        if update.site not in expected:
            raise UpdateError(
                f"an update came from site {update.site!r}, which was not asked in round {round}"
            )
        if update.site in seen:
            raise UpdateError(f"site {update.site!r} sent a second update in round {round}")
        if update.round != round:
            raise UpdateError(f"site {update.site!r} sent an update for round {update.round}, not {round}")
        seen.add(update.site)


def summarize(
    evaluations: Sequence[SiteEvaluation],
) -> tuple[dict[str, float], list[tuple[str, float, float, int]]]:
    """Pooled and per-site metrics from the sites' sums.

    The pooled numbers weight every predicted character equally; the per-site spread (mean, and the worst
    decile: 10th percentile of accuracy, 90th of loss and perplexity) shows how the worst-served sites fare.
    """
    targets = np.array([e.targets for e in evaluations], dtype=np.float64)
    losses = np.array([e.loss_sum for e in evaluations]) / np.maximum(targets, 1)
    accuracies = np.array([e.correct for e in evaluations]) / np.maximum(targets, 1)
    loss = float(sum(e.loss_sum for e in evaluations) / targets.sum())
    site_perplexity = np.exp(losses)
    metrics: Mapping[str, float] = {
        "loss": loss,
        "accuracy": float(sum(e.correct for e in evaluations) / targets.sum()),
        "perplexity": float(np.exp(loss)),
        "site_accuracy_mean": float(accuracies.mean()),
        "site_accuracy_p10": float(np.percentile(accuracies, 10)),
        "site_loss_mean": float(losses.mean()),
        "site_loss_p90": float(np.percentile(losses, 90)),
        "site_perplexity_mean": float(site_perplexity.mean()),
        "site_perplexity_p90": float(np.percentile(site_perplexity, 90)),
        "eval_sites": float(len(evaluations)),
    }
    per_site = [
        (e.site, float(lo), float(a), int(n))
        for e, lo, a, n in zip(evaluations, losses, accuracies, targets, strict=True)
    ]
    return dict(metrics), per_site


def _bytes(messages: Mapping[str, Message]) -> dict[str, bytes]:
    return {site: m.to_bytes() for site, m in messages.items()}
