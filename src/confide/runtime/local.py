"""The ``local`` backend: every site runs in this process, one after another, on one reused model.

Simulating hundreds of sites does not need hundreds of models: a site's state between rounds is its data
and, for algorithms that keep it, its own :class:`~confide.client.state.SiteState` (kept in the run store),
so one :class:`~confide.client.site.SiteKit`, built once, serves every :class:`~confide.client.site.Site`,
with weights moved in and out through the Layout. The backend only hands each Site its task and carries its
answer back; the Site trains, masks and evaluates exactly as a deployed one does.

With lazily registered sites (``data.lazy``: many thousands), the backend keeps only the sites at work: when
a round's training begins it forgets every other site (its protocol sessions and its windows, read again if
it is drawn again), so memory grows with the sites per round, not with the sites registered.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator, Mapping, Sequence

from confide.client.site import Site, SiteKit, evaluate_many
from confide.core import Plan, SiteEvaluation, Task, Traffic, Update, Vector
from confide.data import FederatedDataset
from confide.errors import ConfideError, DataError, UpdateError
from confide.models.hf import check_base
from confide.randomness import Stream, public_rng
from confide.runtime.clock import ReadyQueue, Speeds, VirtualClock
from confide.runtime.federation import Ready
from confide.runtime.grpc import wire

log = logging.getLogger(__name__)


class LocalBackend:
    def __init__(
        self,
        dataset: FederatedDataset,
        kit: SiteKit,
        dropout: float = 0.0,
        seed: int = 0,
        base_sha256: str = "",
        speeds: Speeds | None = None,
    ) -> None:
        self.dataset = dataset
        self.base_sha256 = base_sha256
        """A language model's base: each site's frozen weights must hash to this (empty: not checked)."""
        self.peak_memory: dict[str, int] = {}
        """Each site's peak memory while it trained last (bytes)."""
        self.kit = kit
        self.dropout = dropout
        """Simulated dropouts: the probability that a site vanishes after the key exchange (simulation)."""
        self.seed = seed
        self._by_name = {s.name: s for s in dataset.sites}
        self.lazy = dataset.lazy
        """Sites registered lazily: only the sites at work are kept (see the module)."""
        self._sites: dict[str, Site] = {}
        self._traffic = Traffic()
        self.clock = VirtualClock(speeds or Speeds(), dataset.site_names, seed)
        """Virtual seconds: what the rounds would take on sites of the configured speeds."""
        self._ready: ReadyQueue[Ready] = ReadyQueue(self.clock)
        """Asynchronous rounds: the started sites' answers, by when they are ready."""

    def traffic(self) -> Traffic:
        """The bytes of every message carried so far, each way, as the deployment's wire encodes them
        (:func:`~confide.runtime.grpc.wire.message_bytes`): the work with its weights, the updates, the
        evaluations and the protocol messages. A deployment adds its polls, heartbeats and
        acknowledgements."""
        return self._traffic

    def _count(self, sent: int = 0, received: int = 0) -> None:
        self._traffic = self._traffic + Traffic(sent, received)

    def site(self, name: str) -> Site:
        """The simulated site ``name`` (made on first use; it keeps its protocol sessions)."""
        site = self._sites.get(name)
        if site is None:
            if not self._sites:
                # Every simulated site trains the kit's one model: its base is hashed once, not per site
                # (a 7B base is gigabytes), when the first site is made.
                check_base(name, self.kit.trainer.model, self.base_sha256)
            site = self._sites[name] = Site(name, self._by_name[name], self.kit)
        return site

    def sites(self) -> Sequence[str]:
        return self.dataset.site_names

    def _forget(self, keep: Collection[str]) -> None:
        """With lazily registered sites: forget every site but ``keep`` and those holding an update for an
        asynchronous round (their sessions and their windows, which are read again if the site is drawn
        again)."""
        if not self.lazy:
            return
        for name in [n for n, site in self._sites.items() if n not in keep and site.held is None]:
            self._sites.pop(name).data.release()

    def now(self) -> float:
        """Virtual seconds since the run began (:mod:`confide.runtime.clock`)."""
        return self.clock.now

    def start(self, weights: Vector, task: Task) -> None:
        """Asynchronous rounds: the site trains at once (the result is the same whenever it does), and its
        answer is ready on the virtual clock after the download, its local steps and the answer's upload."""
        sent = wire.message_bytes(*wire.train_message(0, task, weights))
        self._count(sent=sent)
        site = self.site(task.site)
        site.steps = 0
        try:
            ready = site.train(weights, task)
            answer = Ready(task.site, task.model_version)
            size = wire.message_bytes(*wire.update_message(0, b"", ready))
        except (UpdateError, DataError) as e:
            log.warning("site %s could not train for version %d: %s", task.site, task.model_version, e)
            answer, size = Ready(task.site, task.model_version, str(e)), 0
        self._ready.push(task.site, answer, sent, site.steps, size, began=self.clock.now)

    def next_ready(self) -> Ready | None:
        """The started site that is ready first on the virtual clock, which moves on to that moment."""
        ready = self._ready.pop()
        if ready is None:
            return None
        self._count(received=ready[1])
        return ready[0]

    def train(self, weights: Vector, tasks: Sequence[Task]) -> Iterator[Update]:
        """Each task's update; the virtual clock moves on to when the slowest site's upload has arrived."""
        self._forget({task.site for task in tasks})
        clock, began, finished = self.clock, self.clock.now, self.clock.now
        for update, seconds in self._train(weights, tasks):
            finished = max(finished, began + seconds)
            yield update
        clock.reach(finished)

    def _train(self, weights: Vector, tasks: Sequence[Task]) -> Iterator[tuple[Update, float]]:
        """Each task's update and the virtual seconds its site took for it (download, steps, upload)."""
        dropped: set[str] = set()
        if self.dropout > 0 and tasks:
            # Simulated dropouts: a site vanishes after the key exchange, before it sends its update (the
            # hardest point for secure aggregation). It is asked nothing more this round: the server asks
            # only the sites whose input arrived to help unmask.
            rng = public_rng(self.seed, tasks[0].plan.round, Stream.DROPOUT)
            dropped = {t.site for t in tasks if rng.random() < self.dropout}
        for task in tasks:
            sent = wire.message_bytes(*wire.train_message(0, task, weights))
            self._count(sent=sent)
            if task.site in dropped:
                continue
            try:
                site = self.site(task.site)
                update = site.train(weights, task)
                self.peak_memory[task.site] = site.peak_memory
            except (UpdateError, DataError) as e:
                # The site cannot send an update (say, it diverged and secure aggregation cannot encode NaN,
                # or its lazily read data is unreadable): to the server it has dropped out, as a deployed
                # site that gives up would.
                log.warning("site %s sends no update in round %d: %s", task.site, task.plan.round, e)
                continue
            size = wire.message_bytes(*wire.update_message(0, b"", update))
            self._count(received=size)
            steps = 0 if task.plan.release else site.steps
            clock = self.clock
            seconds = clock.transfer(task.site, sent) + clock.compute(task.site, steps)
            yield update, seconds + clock.transfer(task.site, size)

    def evaluate(
        self, weights: Vector, sites: Sequence[str], plan: Plan | None = None
    ) -> Iterator[SiteEvaluation]:
        personal = plan is not None and plan.personalization != "none"
        work = wire.message_bytes(*wire.evaluate_message(0, weights, plan if personal else None))
        self._count(sent=work * len(sites))
        if personal:
            # Each site has its own model here, so each evaluates on its own.
            evaluations = [self.site(name).evaluate(weights, plan) for name in sites]
        else:
            # Every site evaluates the same model: in large batches across sites, split back by site.
            evaluations = evaluate_many(self.kit, [self.site(name) for name in sites], weights)
        for evaluation in evaluations:
            self._count(received=wire.message_bytes(*wire.evaluation_message(0, b"", evaluation)))
            yield evaluation

    def exchange(self, messages: Mapping[str, bytes]) -> Iterator[tuple[str, bytes]]:
        """Each site's answer; the virtual clock moves on by the step's slowest round trip."""
        step = 0.0
        for name, data in messages.items():
            sent = wire.message_bytes(*wire.exchange_message(0, data))
            self._count(sent=sent)
            seconds = self.clock.transfer(name, sent)
            try:
                answer = self.site(name).answer(data)
            except ConfideError as e:  # the site gives up on this round; for the server it has dropped
                log.info("site %s left the protocol step: %s", name, e)
                continue
            if answer:
                size = wire.message_bytes(*wire.answer_message(0, b"", answer))
                self._count(received=size)
                seconds += self.clock.transfer(name, size)
                yield name, answer
            step = max(step, seconds)
        self.clock.advance(step)

    def close(self) -> None:
        self._sites.clear()
