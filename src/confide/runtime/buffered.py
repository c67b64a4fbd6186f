"""Asynchronous buffered aggregation (FedBuff; Nguyen et al. 2022, "Federated Learning with Buffered
Asynchronous Aggregation"): sites train all along, and the model steps each time a buffer of updates is full.

``server.concurrency`` sites train at once, each on the newest model it was sent. When a site is done, the
server starts another idle site on the newest model at once, and counts the finished update into the buffer.
When ``server.sites_per_round`` (K) updates are in, the server applies the buffer: one round of the ordinary
round pipeline (:class:`~confide.runtime.federation.Federation`) among the K sites, each of which releases its
update scaled by FedBuff's staleness discount w(s) = (1 + s)^-a, s being how many versions the model moved
since the site's copy (:mod:`confide.algorithms.fedbuff`). An update older than ``server.max_staleness``
versions is dropped, and its site is idle again.

Why two steps (a site holds its trained update, answering only that it is ready, and sends it when the buffer
releases it). Each buffer is one round of the pipeline, so everything a synchronous round has, a buffer has:

* secure aggregation: each buffer is one SecAgg+ instance among the K sites whose updates fill it, so the
  server learns only the buffer's sum (no asynchronous scheme with secure aggregation needs more);
* sites that are gone by then (a crash, a lost connection after they trained) are dropouts of that instance:
  SecAgg+ unmasks the sum of those that answered, as long as they reach its threshold; with fewer the buffer
  is abandoned, the model stays as it was and nothing is charged; the sites that trained for it are idle again
  and start over on the newest model;
* DP: each site clips, scales by its discount (at most 1, so its influence stays within C) and, under
  distributed DP, adds its noise share; under central DP the server adds the noise once per buffer. Each
  application of a buffer is charged to the privacy ledger as one round with its participants. Which sites
  fill a buffer depends on their speed, not on a random draw, so no amplification by sampling is claimed: the
  budget is held per site against a server that knows who took part (trust = 'knows_sample').

Which idle site starts next is drawn from the run's seed (public: this draw protects nothing). In a simulation
every site trains at once when it is started and is ready on the virtual clock (:mod:`confide.runtime.clock`),
so a run is exactly reproducible; in a deployment the sites really train side by side. Evaluations take the
model as it is; in a deployment the sites in training finish first, because a site does one thing at a time
(their updates go into the next buffers). Sites' training in progress is not checkpointed: a resumed run
starts every site afresh on the checkpointed model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, field, replace

import numpy as np

from confide.algorithms.fedbuff import staleness_weight
from confide.core import Task
from confide.randomness import Stream
from confide.runtime.federation import (
    AsyncBackend,
    Charge,
    Federation,
    Observer,
    Ready,
    RoundResult,
    ServerState,
)

log = logging.getLogger(__name__)


@dataclass
class Buffered:
    """Runs FedBuff's buffers as rounds of a :class:`Federation`, over a backend that keeps sites training."""

    federation: Federation
    buffer_size: int
    """K: the updates a buffer holds (``server.sites_per_round``)."""
    concurrency: int
    """How many sites train at once."""
    max_staleness: int
    """Updates more model versions old than this are dropped."""
    exponent: float = 0.5
    """The staleness discount's a in (1 + s)^-a."""
    seed: int = 0
    training: dict[str, int] = field(default_factory=dict)
    """Sites training now, and the model version each trains on."""
    ready: dict[str, int] = field(default_factory=dict)
    """Sites holding a trained update not yet released, and its version, in the order they finished."""
    started: int = 0
    dropped: list[tuple[str, str]] = field(default_factory=list)
    """Updates dropped since the last buffer (too stale, or the site could not train), and why."""

    def __post_init__(self) -> None:
        if self.buffer_size < 1 or self.concurrency < 1:
            raise ValueError("FedBuff needs a buffer of at least one update and at least one site training")

    def round(
        self,
        state: ServerState,
        backend: AsyncBackend,
        observer: Observer | None = None,
        charge: Charge | None = None,
        population: int | None = None,
        *,
        exclude: Collection[str] = (),
        min_updates: int | None = None,
    ) -> RoundResult:
        """Fill the next buffer (starting idle sites as others finish), then apply it as round
        ``state.round + 1``.

        ``exclude``: sites that may not take part any more (their privacy budget is spent, or they are
        quarantined): none is started, and any that is ready is not released. The result counts the bytes
        and seconds of the whole buffer: the models sent to the sites that started while it filled, and the
        round that applied it."""
        began, counted = time.perf_counter(), backend.traffic()
        while len([s for s in self.ready if s not in exclude]) < self.buffer_size:
            self._start(state, backend, exclude)
            if not self._take(state, backend.next_ready()):
                break  # no site can train: apply what there is (the round's minimum still holds)
        batch = [site for site in self.ready if site not in exclude][: self.buffer_size]
        r = state.round + 1
        staleness = {site: state.round - self.ready.pop(site) for site in batch}
        plans = {
            site: replace(plan, release=True, staleness_weight=self._discount(staleness[site]))
            for site, plan in self.federation.strategy.plans(r, sorted(batch)).items()
        }
        result = self.federation.round(
            state,
            backend,
            observer,
            charge,
            population,
            exclude=exclude,
            min_updates=min_updates,
            plans=plans,
        )
        dropped, self.dropped = self.dropped, []
        moved = backend.traffic() - counted
        return replace(
            result,
            rejected=[*dropped, *result.rejected],
            staleness=[staleness[s] for s in sorted(batch)],
            bytes_sent=moved.sent,
            bytes_received=moved.received,
            seconds=time.perf_counter() - began,
        )

    def _discount(self, staleness: int) -> float:
        return staleness_weight(staleness, self.exponent)

    def settle(self, state: ServerState, backend: AsyncBackend) -> None:
        """Wait until no site is training (their updates join the next buffers): before an evaluation in a
        deployment, where a site does one piece of work at a time."""
        while self.training:
            if not self._take(state, backend.next_ready()):
                self.training.clear()

    def _take(self, state: ServerState, answer: Ready | None) -> bool:
        """File a site's answer (ready, failed or too stale); False when no site was training."""
        if answer is None:
            return False
        site, version, failure = answer.site, answer.model_version, answer.failure
        if self.training.pop(site, None) is None:
            return True  # not started by this run (an answer from before a restart): ignored
        stale = state.round - version
        if failure is not None:
            self.dropped.append((site, f"it could not train on model version {version}: {failure}"))
        elif stale > self.max_staleness:
            limit = self.max_staleness
            self.dropped.append(
                (site, f"its update was {stale} versions old, more than server.max_staleness = {limit}")
            )
        else:
            self.ready[site] = version
        return True

    def _start(self, state: ServerState, backend: AsyncBackend, exclude: Collection[str]) -> None:
        """Start idle sites on the newest model until ``concurrency`` train."""
        wanted = self.concurrency - len(self.training)
        if wanted <= 0:
            return
        busy = self.training.keys() | self.ready.keys()
        idle = [s for s in backend.sites() if s not in busy and s not in exclude]
        if not idle:
            return
        rng = np.random.default_rng([self.seed, int(Stream.ASYNC), self.started])
        chosen = sorted(rng.choice(len(idle), min(wanted, len(idle)), replace=False))
        seeds = rng.integers(0, 2**31 - 1, size=len(chosen))
        strategy = self.federation.strategy
        for i, seed in zip(chosen, seeds, strict=True):
            site = idle[int(i)]
            plan = replace(strategy.plan(state.round + 1, int(seed)), hold=True)
            backend.start(state.weights, Task(site, plan, model_version=state.round))
            self.training[site] = state.round
            self.started += 1
