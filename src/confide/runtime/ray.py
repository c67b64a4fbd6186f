"""The ``ray`` backend: simulated sites spread over Ray workers, on this machine or on a cluster.

The driver (this module, in the process that runs the federation) keeps what the local backend keeps for the
server: the virtual clock, the byte counts, the simulated dropouts and the asynchronous runs' queue. The
sites themselves run in Ray actors (:class:`~confide.runtime.raysites.RaySiteWorker`), each with one model and
kit built once, playing its share of the sites with the same :class:`~confide.client.site.Site` code as the
local backend. So a seeded run gives the local backend's metrics.

- Sticky sites: a site always goes to the same worker (a hash of its name), which keeps its Site object: the
  protocol sessions of secure aggregation's multi-step exchanges, and an asynchronous run's held update.
- The round's weights go into Ray's object store once per round (``ray.put``), not once per site.
- Answers are taken in the order of the tasks, as the local backend yields them, so the server's running
  sums add in the same order and the result is the same to the last bit of the aggregation.
- A worker that dies (``ray.kill``, a crashed or killed process, a lost node) costs its sites their part in
  the round: to the server they have dropped out, as sites of a deployment do, and the round goes on (secure
  aggregation recovers as from any dropout). The worker is replaced at once for the rounds after, with its
  sites' state intact in the run store (:class:`~confide.runtime.raysites.SiteStateKeeper`).

Ray is imported only here and in :mod:`.raysites`, and only when a run asks for this backend.
"""

from __future__ import annotations

import logging
import os
import tomllib
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from confide.core import Plan, SiteEvaluation, Task, Traffic, Update, Vector
from confide.errors import ConfigError
from confide.randomness import Stream, public_rng
from confide.runtime.clock import ReadyQueue, Speeds, VirtualClock
from confide.runtime.federation import Ready
from confide.runtime.grpc import wire
from confide.runtime.raysites import Answered, SiteRecipe, Trained

log = logging.getLogger(__name__)

INSTALL = "backend.kind = 'ray' needs Ray, which is not installed: pip install 'confide[ray]'"


def import_ray() -> Any:
    """The ``ray`` module, or a ConfigError that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(INSTALL) from None
    return ray


WORKER_NICENESS = "RAY_worker_niceness"
"""Ray's setting of its workers' niceness, read by the raylet when Ray starts."""


class RayBackend:
    """Sites played by Ray actors; the federation's Backend and AsyncBackend."""

    def __init__(
        self,
        recipe: SiteRecipe,
        *,
        address: str = "",
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        workers: int = 0,
        dropout: float = 0.0,
        seed: int = 0,
        speeds: Speeds | None = None,
    ) -> None:
        """Join the Ray cluster at ``address`` (empty: start one on this machine; a Ray already started in
        this process is used as it is), and start ``workers`` site workers of ``num_cpus`` CPUs and
        ``num_gpus`` GPUs each (0 workers: as many as the cluster's CPUs allow)."""
        ray = import_ray()
        self._ray = ray
        self.lazy = bool(tomllib.loads(recipe.config_toml).get("data", {}).get("lazy", False))
        """Sites registered lazily (``data.lazy``): workers keep only the sites at work."""
        self.recipe = recipe
        self.names = list(recipe.sites)
        self.dropout = dropout
        """Simulated dropouts: the probability that a site vanishes after the key exchange (simulation)."""
        self.seed = seed
        self.peak_memory: dict[str, int] = {}
        """Each site's peak memory while it trained last (bytes; the peak of its worker's process)."""
        self.clock = VirtualClock(speeds or Speeds(), self.names, seed)
        """Virtual seconds: what the rounds would take on sites of the configured speeds."""
        self.started_ray = False
        """Whether this backend started Ray (and so shuts it down on close)."""
        self._traffic = Traffic()
        self._ready: ReadyQueue[Ready] = ReadyQueue(self.clock)
        self._pending: list[tuple[Task, int, float, int, Any, Any]] = []
        """Asynchronous rounds: started tasks not yet collected (task, bytes sent, clock then, worker, the
        worker's handle, the call)."""
        self._weights: tuple[int, int, Any] | None = None
        self._closed = False
        if not ray.is_initialized():
            if not address:
                # Ray runs its workers at niceness 15, below every other program: on a machine that is busy
                # with anything else they starve, and the run crawls. Here they are the work, so they run at
                # the priority of the process that asked for them (unless the user set it).
                os.environ.setdefault(WORKER_NICENESS, "0")
            try:
                ray.init(
                    address=address or None,
                    include_dashboard=False,
                    logging_level=logging.WARNING,
                    log_to_driver=False,
                )
            except (ConnectionError, ValueError, RuntimeError) as e:
                where = f"join the Ray cluster at backend.address = {address!r}" if address else "start Ray"
                raise ConfigError(
                    f"cannot {where}: {e}; check that `ray start --head` runs there and that this machine "
                    "reaches it (or leave backend.address empty to start Ray on this machine)"
                ) from e
            self.started_ray = True
        elif address:
            log.info("Ray is already running in this process; backend.address = %r is not used", address)
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from confide.runtime.raysites import RaySiteWorker, SiteStateKeeper

        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        if num_cpus > cpus:
            self.close()
            raise ConfigError(
                f"backend.num_cpus = {num_cpus:g} is more than the Ray cluster's {cpus:g} CPUs: no worker "
                "could start; lower backend.num_cpus"
            )
        count = workers or max(1, int(cpus // num_cpus))
        here = ray.get_runtime_context().get_node_id()
        keeper = ray.remote(SiteStateKeeper).options(
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)
        )
        self.keeper = keeper.remote(recipe.run_dir)
        self._actor = ray.remote(RaySiteWorker).options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0)
        self.workers: list[Any] = [self._actor.remote(recipe, self.keeper) for _ in range(count)]
        """The site workers (Ray actor handles); site s is played by ``workers[worker_of(s)]``."""
        # A worker that cannot build (a data path another node lacks, a model that does not fit) says so here,
        # with its own error, before the first round.
        try:
            ray.get([w.ready.remote() for w in self.workers])
        except BaseException:
            self.close()
            raise
        log.info("%d Ray workers play %d sites (%g CPUs each)", count, len(self.names), num_cpus)

    # -- what every backend has -----------------------------------------------------------------------------

    def sites(self) -> Sequence[str]:
        return self.names

    def traffic(self) -> Traffic:
        """The bytes of every message carried so far, each way, as the deployment's wire encodes them (the
        same count as the local backend's)."""
        return self._traffic

    def now(self) -> float:
        """Virtual seconds since the run began (:mod:`confide.runtime.clock`)."""
        return self.clock.now

    def worker_of(self, site: str) -> int:
        """The index of the worker that plays ``site`` (always the same one)."""
        return zlib.crc32(site.encode()) % len(self.workers)

    def train(self, weights: Vector, tasks: Sequence[Task]) -> Iterator[Update]:
        """Each task's update, in task order; the virtual clock moves on to when the slowest site's upload
        has arrived."""
        clock, began = self.clock, self.clock.now
        finished = began
        dropped: set[str] = set()
        if self.dropout > 0 and tasks:
            # Simulated dropouts, drawn as the local backend draws them (after the key exchange).
            rng = public_rng(self.seed, tasks[0].plan.round, Stream.DROPOUT)
            dropped = {t.site for t in tasks if rng.random() < self.dropout}
        ref = self._ray.put(weights) if any(t.site not in dropped for t in tasks) else None
        if self.lazy:  # lazily registered sites: the workers forget those not at work
            keep = {t.site for t in tasks}
            for worker in self.workers:  # a worker runs one caller's calls in order: this one comes first
                worker.forget.remote(keep)
        calls = []
        for task in tasks:
            sent = wire.message_bytes(*wire.train_message(0, task, weights))
            self._count(sent=sent)
            if task.site in dropped:
                continue
            index = self.worker_of(task.site)
            worker = self.workers[index]
            calls.append((task, sent, index, worker, worker.train.remote(ref, task)))
        for task, sent, index, worker, call in calls:
            trained = self._get(call, index, worker, task.site, f"round {task.plan.round}")
            if trained is None:
                continue
            if trained.update is None:
                round, why = task.plan.round, trained.failure
                log.warning("site %s sends no update in round %d: %s", task.site, round, why)
                continue
            self.peak_memory[task.site] = trained.peak_memory
            size = wire.message_bytes(*wire.update_message(0, b"", trained.update))
            self._count(received=size)
            seconds = clock.transfer(task.site, sent) + clock.compute(task.site, trained.steps)
            finished = max(finished, began + (seconds + clock.transfer(task.site, size)))
            yield _owned(trained.update)
        clock.reach(finished)

    def evaluate(
        self, weights: Vector, sites: Sequence[str], plan: Plan | None = None
    ) -> Iterator[SiteEvaluation]:
        """Each site's evaluation, in the order of ``sites``: each worker evaluates its sites in one call
        (in large batches across them, unless each evaluates its own personalized model)."""
        personal = plan is not None and plan.personalization != "none"
        work = wire.message_bytes(*wire.evaluate_message(0, weights, plan if personal else None))
        self._count(sent=work * len(sites))
        groups: dict[int, list[str]] = {}
        for name in sites:
            groups.setdefault(self.worker_of(name), []).append(name)
        ref = self._ray.put(weights) if sites else None
        calls = {
            index: (self.workers[index], self.workers[index].evaluate.remote(ref, names, plan))
            for index, names in groups.items()
        }
        results: dict[str, SiteEvaluation] = {}
        for index, (worker, call) in calls.items():
            evaluations = self._get(call, index, worker, ", ".join(groups[index]), "an evaluation")
            for evaluation in evaluations or []:
                results[evaluation.site] = evaluation
        for name in sites:
            evaluation = results.get(name)
            if evaluation is None:
                continue
            self._count(received=wire.message_bytes(*wire.evaluation_message(0, b"", evaluation)))
            yield evaluation

    def exchange(self, messages: Mapping[str, bytes]) -> Iterator[tuple[str, bytes]]:
        """Each site's answer, from the worker that holds its protocol session; the virtual clock moves on by
        the step's slowest round trip."""
        step = 0.0
        calls = []
        for name, data in messages.items():
            index = self.worker_of(name)
            worker = self.workers[index]
            calls.append((name, data, index, worker, worker.answer.remote(name, data)))
        for name, data, index, worker, call in calls:
            sent = wire.message_bytes(*wire.exchange_message(0, data))
            self._count(sent=sent)
            seconds = self.clock.transfer(name, sent)
            answered: Answered | None = self._get(call, index, worker, name, "a protocol step")
            if answered is None:
                continue
            if answered.failure is not None:
                log.info("site %s left the protocol step: %s", name, answered.failure)
                continue
            if answered.answer:
                size = wire.message_bytes(*wire.answer_message(0, b"", answered.answer))
                self._count(received=size)
                seconds += self.clock.transfer(name, size)
                yield name, answered.answer
            step = max(step, seconds)
        self.clock.advance(step)

    # -- asynchronous rounds --------------------------------------------------------------------------------

    def start(self, weights: Vector, task: Task) -> None:
        """Asynchronous rounds: the site's worker starts training at once; its answer is ready on the virtual
        clock after the download, its local steps and the answer's upload (as in the local backend)."""
        sent = wire.message_bytes(*wire.train_message(0, task, weights))
        self._count(sent=sent)
        if self._weights is None or self._weights[:2] != (id(weights), task.model_version):
            # The sites started on one model version share one copy (the server steps its weights in place,
            # so the version, not the array, says whether it is the same model).
            self._weights = (id(weights), task.model_version, self._ray.put(weights))
        index = self.worker_of(task.site)
        worker = self.workers[index]
        call = worker.train.remote(self._weights[2], task)
        self._pending.append((task, sent, self.clock.now, index, worker, call))

    def next_ready(self) -> Ready | None:
        """The started site that is ready first on the virtual clock, which moves on to that moment. Every
        started site's answer is collected first: the order depends on their steps, as in the local
        backend."""
        pending, self._pending = self._pending, []
        for task, sent, now, index, worker, call in pending:
            what = f"model version {task.model_version}"
            trained: Trained | None = self._get(call, index, worker, task.site, what)
            if trained is None:
                answer, size, steps = Ready(task.site, task.model_version, "its Ray worker died"), 0, 0
            elif trained.update is None:
                log.warning("site %s could not train for %s: %s", task.site, what, trained.failure)
                answer, size, steps = Ready(task.site, task.model_version, trained.failure), 0, trained.steps
            else:
                answer = Ready(task.site, task.model_version)
                size = wire.message_bytes(*wire.update_message(0, b"", trained.update))
                steps = trained.steps
            self._ready.push(task.site, answer, sent, steps, size, began=now)
        ready = self._ready.pop()
        if ready is None:
            return None
        self._count(received=ready[1])
        return ready[0]

    # -- workers --------------------------------------------------------------------------------------------

    def _get(self, call: Any, index: int, worker: Any, sites: str, what: str) -> Any:
        """The call's result, or None when its worker died (which is then replaced)."""
        from ray import exceptions

        try:
            return self._ray.get(call)
        except (exceptions.RayActorError, exceptions.WorkerCrashedError, exceptions.ObjectLostError) as e:
            self._lost(index, worker, e)
            log.warning("site %s is dropped from %s: its Ray worker %d died", sites, what, index)
            return None

    def _lost(self, index: int, worker: Any, error: Exception) -> None:
        """Replace worker ``index`` when ``worker`` (its handle at the time of the call) died."""
        if self.workers[index] is not worker:
            return  # replaced already, at its first failed call
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        log.warning(
            "Ray worker %d died (%s): its sites in this round are dropped; a new worker takes its sites "
            "from now on, with their state from the run store",
            index,
            reason,
        )
        self._ray.kill(worker, no_restart=True)
        self.workers[index] = self._actor.remote(self.recipe, self.keeper)

    def _count(self, sent: int = 0, received: int = 0) -> None:
        self._traffic = self._traffic + Traffic(sent, received)

    def worker_memory(self) -> list[int]:
        """Each worker's peak resident bytes so far (its own process's ru_maxrss)."""
        return list(self._ray.get([w.peak_memory.remote() for w in self.workers]))

    def close(self) -> None:
        """Stop the workers and the state keeper, and Ray itself if this backend started it."""
        ray = self._ray
        if self._closed or not ray.is_initialized():
            return
        self._closed = True
        for worker in getattr(self, "workers", []):
            ray.kill(worker, no_restart=True)
        self.workers = []
        keeper = getattr(self, "keeper", None)
        if keeper is not None:
            ray.get(keeper.close.remote())
            ray.kill(keeper, no_restart=True)
        if self.started_ray:
            ray.shutdown()


def _owned(update: Update) -> Update:
    """``update`` with arrays the server may write to: Ray hands them out of its object store read-only, and
    the server's layers work in place (clipping, the running sums)."""

    def own(value: Any) -> Any:
        return value.copy() if isinstance(value, np.ndarray) and not value.flags.writeable else value

    payload = {key: own(value) for key, value in update.payload.items()}
    return replace(update, vector=own(update.vector), payload=payload)
