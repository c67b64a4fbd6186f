"""The ``local`` backend: every site runs in this process, one after another, on one reused model.

Simulating hundreds of sites does not need hundreds of models: a site's state between rounds is its data
and, for algorithms that keep it, its own :class:`~confide.client.state.SiteState` (kept in the run store),
so one :class:`~confide.client.site.SiteKit`, built once, serves every :class:`~confide.client.site.Site`,
with weights moved in and out through the Layout. The backend only hands each Site its task and carries its
answer back; the Site trains, masks and evaluates exactly as a deployed one does.

With lazily registered sites (``data.lazy``: many thousands), the backend keeps only the sites at work: when
a round's training begins it forgets every other site (its protocol sessions and its windows, read again if
it is drawn again), so memory grows with the sites per round, not with the sites registered.

With ``backend.workers`` above 1 the sites play in worker processes instead (a
:class:`~confide.runtime.pool.SitePool`, the same Site code in each), while this process keeps what the
server needs: the virtual clock, the byte counts and the simulated dropouts, drawn and counted exactly as
when every site runs here, and the updates handed on in the order of the tasks. So a seeded run gives the
same metrics and checkpoints whatever the number of workers; a worker that dies costs its sites their part in
the round, as a dropout.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator, Mapping, Sequence

from confide.client.site import Site, SiteKit, evaluate_many
from confide.core import Plan, SiteEvaluation, Task, Traffic, Update, Vector
from confide.data import FederatedDataset
from confide.models.hf import check_base
from confide.randomness import Stream, public_rng
from confide.runtime.clock import ReadyQueue, Speeds, VirtualClock
from confide.runtime.federation import Ready
from confide.runtime.grpc import wire
from confide.runtime.pool import Lost, SitePool
from confide.runtime.sites import Trained, answer_site, train_site

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
        pool: SitePool | None = None,
    ) -> None:
        """Sites of ``dataset`` trained with ``kit`` in this process, or, with a ``pool``, in its worker
        processes."""
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
        self.pool = pool
        """The worker processes that play the sites, or None: every site in this process."""
        self._pending: list[tuple[Task, int, float, int]] = []
        """Asynchronous rounds with a pool: started tasks not yet collected (task, bytes sent, clock then,
        the pool's call)."""

    @property
    def workers(self) -> int:
        """How many processes play the sites (1: this one)."""
        return self.pool.size if self.pool is not None else 1

    def describe(self) -> str:
        """Where the sites run, in a few words (``confide run`` prints it)."""
        if self.pool is None:
            return "every site in this process"
        threads = self.pool.recipe.threads
        return (
            f"{self.pool.size} worker processes of {threads} torch thread{'s' if threads > 1 else ''} each, "
            "each site's work in one of them per round (results as in one process)"
        )

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
        if self.pool is not None:
            # The worker trains it now; its answer is collected (in the order started) when one is wanted.
            call = self.pool.start(weights, (id(weights), task.model_version), task)
            self._pending.append((task, sent, self.clock.now, call))
            return
        self._push(task, sent, self.clock.now, train_site(self.site(task.site), weights, task))

    def _push(self, task: Task, sent: int, began: float, trained: Trained | Lost) -> None:
        """A started task's answer into the queue of answers, ready on the virtual clock when its site would
        have sent it."""
        if isinstance(trained, Lost):
            answer, size, steps = Ready(task.site, task.model_version, "its worker process died"), 0, 0
        elif trained.update is None:
            why = trained.failure
            log.warning("site %s could not train for version %d: %s", task.site, task.model_version, why)
            answer, size, steps = Ready(task.site, task.model_version, why), 0, trained.steps
        else:
            answer = Ready(task.site, task.model_version)
            size = wire.message_bytes(*wire.update_message(0, b"", trained.update))
            steps = trained.steps
        self._ready.push(task.site, answer, sent, steps, size, began=began)

    def next_ready(self) -> Ready | None:
        """The started site that is ready first on the virtual clock, which moves on to that moment."""
        if self.pool is not None:
            pending, self._pending = self._pending, []
            for task, sent, began, call in pending:
                self._push(task, sent, began, self.pool.result(call, task))
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
        live: list[tuple[Task, int]] = []
        for task in tasks:
            sent = wire.message_bytes(*wire.train_message(0, task, weights))
            self._count(sent=sent)
            if task.site not in dropped:
                live.append((task, sent))
        work = [task for task, _ in live]
        if self.pool is not None:
            results: Iterator[Trained | Lost] = self.pool.train(weights, work)
        else:
            results = (train_site(self.site(task.site), weights, task) for task in work)
        clock = self.clock
        for (task, sent), trained in zip(live, results, strict=True):
            if isinstance(trained, Lost):
                why = "its worker process died"
                log.warning("site %s sends no update in round %d: %s", task.site, task.plan.round, why)
                continue
            if trained.update is None:
                # The site cannot send an update (say, it diverged and secure aggregation cannot encode NaN,
                # or its lazily read data is unreadable): to the server it has dropped out, as a deployed
                # site that gives up would.
                log.warning(
                    "site %s sends no update in round %d: %s", task.site, task.plan.round, trained.failure
                )
                continue
            self.peak_memory[task.site] = trained.peak_memory
            size = wire.message_bytes(*wire.update_message(0, b"", trained.update))
            self._count(received=size)
            seconds = clock.transfer(task.site, sent) + clock.compute(task.site, trained.steps)
            yield trained.update, seconds + clock.transfer(task.site, size)

    def evaluate(
        self, weights: Vector, sites: Sequence[str], plan: Plan | None = None
    ) -> Iterator[SiteEvaluation]:
        personal = plan is not None and plan.personalization != "none"
        work = wire.message_bytes(*wire.evaluate_message(0, weights, plan if personal else None))
        self._count(sent=work * len(sites))
        if self.pool is not None:
            # Each worker evaluates its share of the sites; handed on in the order asked.
            done = self.pool.evaluate(weights, sites, plan)
            evaluations = [done[name] for name in sites if name in done]
        elif personal:
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
        answers = self.pool.exchange(messages) if self.pool is not None else None
        for name, data in messages.items():
            sent = wire.message_bytes(*wire.exchange_message(0, data))
            self._count(sent=sent)
            seconds = self.clock.transfer(name, sent)
            answered = answers[name] if answers is not None else answer_site(self.site(name), data)
            if isinstance(answered, Lost):
                log.info("site %s left the protocol step: its worker process died", name)
                continue
            if answered.failure is not None:  # the site gave up on this round; for the server it has dropped
                log.info("site %s left the protocol step: %s", name, answered.failure)
                continue
            answer = answered.answer
            if answer:
                size = wire.message_bytes(*wire.answer_message(0, b"", answer))
                self._count(received=size)
                seconds += self.clock.transfer(name, size)
                yield name, answer
            step = max(step, seconds)
        self.clock.advance(step)

    def close(self) -> None:
        self._sites.clear()
        if self.pool is not None:
            self.pool.close()
