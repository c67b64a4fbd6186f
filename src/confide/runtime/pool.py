"""The local backend's worker processes: simulated sites trained in parallel, with the results of one process.

With ``backend.workers`` above 1 the local backend (:mod:`confide.runtime.local`) keeps what the server needs
(the virtual clock, the byte counts, the simulated dropouts) and hands the sites' work to a :class:`SitePool`
of worker processes on this machine. Each is a :class:`~confide.runtime.sites.SiteWorker`, the Ray backend's
worker too: built once from the run's :class:`~confide.runtime.sites.SiteRecipe` and the driver's data set,
it plays any site with the same :class:`~confide.client.site.Site` code, reusing its one model and layers.

- Start: ``forkserver`` (``spawn`` where there is none): torch's thread pools do not survive a fork of a
  process that has used them. The fork server imports torch and confide once; each worker forks from it and
  only builds its model (a few hundred milliseconds), so a restart costs little.
- Weights: written once per round into one shared-memory segment (:mod:`multiprocessing.shared_memory`),
  which each worker copies once into the array its sites read; never a copy per site. Nothing writes the
  segment while a worker may still read it (the pool waits for every call in flight first).
- Routing: a site is held by one worker from its first message (secure aggregation's key exchange, or its
  task) until the next training or evaluation begins without a message to it before: its protocol sessions
  live there, and every exchange, task and evaluation of the site goes there meanwhile. A site not held goes
  to the least loaded worker (a training task: the first worker free, taking tasks in order), and the worker
  that had it forgets it, as the local backend forgets lazily registered sites; a site holding an update for
  an asynchronous round stays.
- Order: updates are taken as they arrive and handed on in the order of the tasks, so the server adds them
  in the same order as in one process: a seeded run gives the same metrics and checkpoints, to the last bit,
  whatever the number of workers (with the same torch threads per process).
- State: a site's own state between rounds (SCAFFOLD, Ditto, FedRep, a DP-SGD ledger) is in the run store as
  in one process; each worker opens the run's SQLite file itself (the same machine, WAL mode, a long wait
  for a lock), so no message goes through the driver for it and a restarted worker finds it all.
- Failure: a worker that dies (killed, out of memory) costs the sites whose work it had their part in the
  round; to the server they have dropped out, as sites of a deployment do, and secure aggregation recovers
  as from any dropout. It is noticed by its closed connection (the process is gone), never by a timeout, and
  a new worker takes its place at once, before the next round. A worker whose build fails raises its error.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pickle
import queue
import signal
import sys
import threading
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing import get_all_start_methods, get_context
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import numpy as np

from confide.config import Config, in_process_only
from confide.core import Plan, SiteEvaluation, Task, Vector, round_size
from confide.data import FederatedDataset
from confide.errors import ConfideError, ConfigError
from confide.runtime.sites import Answered, SiteRecipe, SiteWorker, Trained

log = logging.getLogger(__name__)

WORKERS_ENV = "CONFIDE_WORKERS"
"""An environment variable that sets how many workers a local run uses when its config leaves
``backend.workers`` at 0 (a test suite of many tiny runs sets 1)."""

DEPTH = 2
"""Calls a worker is given ahead: one to work on, one waiting, so that it never waits for the driver."""

AHEAD = 4
"""A worker may train a task at most this many tasks a worker ahead of the update handed on last, so that the
updates waiting to be handed on in order are few (each is the size of the model)."""

STARTS = 3
"""Workers that die one after another before they are ready: then the pool gives up with an error."""


def cores() -> int:
    """The cores this process may run on (its affinity, which a container or `taskset` may narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_workers(config: Config, population: int) -> int:
    """How many worker processes a local run of ``config`` over ``population`` sites uses: ``backend.workers``
    when set; else ``$CONFIDE_WORKERS`` when set; else the machine's cores, no more than a round's sites. One
    means every site in this process (so do the configs of :func:`in_process_only`, unless they set it)."""
    asked = config.backend.workers
    if asked:
        return asked
    if in_process_only(config) is not None:
        return 1
    text = os.environ.get(WORKERS_ENV, "").strip()
    if text:
        try:
            value = int(text)
        except ValueError:
            value = -1
        if value < 0:
            raise ConfigError(
                f"{WORKERS_ENV} = {text!r} must be a whole number >= 0 (0: the machine's cores)"
            )
        if value:
            return value
    return max(1, min(cores(), round_size(config.server.sites_per_round, population)))


def worker_threads(threads: int, workers: int) -> int:
    """Torch threads of each of ``workers`` processes: ``backend.threads`` (0: one, as a simulation's one
    process runs), at most the cores shared out among the workers."""
    return max(1, min(threads or 1, cores() // max(workers, 1)))


@dataclass(frozen=True)
class WeightsRef:
    """Where a call's weights are: the shared-memory segment, the write they are from, their size and type."""

    name: str
    version: int
    size: int
    dtype: str


class Lost:
    """The result of a call whose worker died before it answered."""


LOST = Lost()


@dataclass(eq=False)
class _Worker:
    """The driver's view of one worker process."""

    index: int
    process: BaseProcess
    conn: Connection
    ready: bool = False
    calls: set[int] = field(default_factory=set)
    """Calls sent and not answered yet."""
    pid: int = 0


class SitePool:
    """Worker processes that play the simulated sites of one run (see the module)."""

    def __init__(self, recipe: SiteRecipe, dataset: FederatedDataset, workers: int) -> None:
        """``workers`` processes, started at the first call, each building its sites from ``recipe`` over
        ``dataset`` (the driver's, as the sites train on it: poisoned by the run's attack)."""
        self.recipe = recipe
        self.dataset = dataset
        self.size = workers
        self.started = False
        self._context = get_context("forkserver" if "forkserver" in get_all_start_methods() else "spawn")
        self._workers: list[_Worker] = []
        self._messages: queue.SimpleQueue[tuple[_Worker, str, int, Any]] = queue.SimpleQueue()
        self._ids = itertools.count(1)
        self._wanted: set[int] = set()
        self._done: dict[int, Any] = {}
        self._pins: dict[str, int] = {}
        """Which worker holds each site (see the module: routing)."""
        self._held: set[str] = set()
        """Sites that hold, or are training, an update for an asynchronous round: never let go."""
        self._talked: set[str] = set()
        """Sites sent a protocol message since the last training or evaluation began: their sessions (secure
        aggregation's) are for the work that comes next, so they stay where they are."""
        self._segment: list[SharedMemory] = []
        """The shared segment the weights are written to (none before the first write)."""
        self._version = 0
        self._written: tuple[int, int] | None = None
        self._ref: WeightsRef | None = None
        self._deaths = 0
        """Workers that died before they were ready, one after another."""
        self._tests = {s.name: max(1, s.num_test) for s in dataset.sites}
        self._recipe = b""
        self._closer = weakref.finalize(self, _shutdown, self._workers, self._segment)

    # -- workers ---------------------------------------------------------------------------------------------

    def _start(self) -> None:
        """Start the workers (once); they build while the driver goes on."""
        if self.started:
            return
        try:  # pickled once, for every worker and every restart
            self._recipe = pickle.dumps((self.recipe, self.dataset), protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            raise ConfigError(
                f"the run's data set cannot be sent to the site worker processes ({e}): a lazily registered "
                "site's loader must be a module-level function (with its arguments bound); or set "
                "backend.workers = 1 to train every site in this process"
            ) from e
        self.started = True
        if self._context.get_start_method() == "forkserver":
            # The fork server imports, once, the modules of confide this process has imported by now (it has
            # built the same model and layers as a worker builds), and what torch imports at its first seed;
            # every worker forked from it starts with them imported, and builds in milliseconds.
            loaded = sorted(name for name in sys.modules if name.split(".")[0] == "confide")
            self._context.set_forkserver_preload([*loaded, "confide.runtime.pool", "torch._dynamo"])
        self._workers[:] = [self._spawn(index) for index in range(self.size)]

    def _spawn(self, index: int) -> _Worker:
        ours, theirs = self._context.Pipe()
        process = self._context.Process(  # type: ignore[attr-defined]
            target=serve, args=(theirs,), name=f"confide-sites-{index}", daemon=True
        )
        with _main_hidden():
            process.start()
        theirs.close()
        with contextlib.suppress(OSError):  # it died already: its reader says so
            ours.send_bytes(self._recipe)
        worker = _Worker(index, process, ours)
        threading.Thread(target=_read, args=(worker, self._messages), daemon=True).start()
        return worker

    def pending(self, index: int) -> int:
        """Calls sent to worker ``index`` and not answered yet."""
        return len(self._workers[index].calls) if index < len(self._workers) else 0

    def pids(self) -> list[int]:
        """The workers' process ids (0 for one not started yet)."""
        self._start()
        return [w.process.pid or 0 for w in self._workers]

    def _handle(self, item: tuple[_Worker, str, int, Any]) -> None:
        worker, kind, ident, payload = item
        if kind == "ready":
            worker.ready, worker.pid = True, int(payload)
            self._deaths = 0
        elif kind == "failed":
            self.close()
            raise payload
        elif kind == "error":
            worker.calls.discard(ident)
            raise payload
        elif kind == "done":
            worker.calls.discard(ident)
            if ident in self._wanted:
                self._done[ident] = payload
        elif kind == "dead":
            self._lost(worker)

    def _lost(self, worker: _Worker) -> None:
        """Worker ``worker`` died: its calls are lost, its sites let go, and a new worker takes its place."""
        if worker.index >= len(self._workers) or self._workers[worker.index] is not worker:
            return  # replaced already, or the pool is closed
        worker.process.join()
        code = worker.process.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        for ident in worker.calls:
            if ident in self._wanted:
                self._done[ident] = LOST
        worker.calls.clear()
        mine = [name for name, index in self._pins.items() if index == worker.index]
        for name in mine:
            del self._pins[name]
            self._held.discard(name)
        if not worker.ready:
            self._deaths += 1
            if self._deaths >= STARTS:
                self.close()
                raise ConfideError(
                    f"{STARTS} site worker processes died before they were ready (the last: {how}); the "
                    "machine may lack the memory for backend.workers models: lower backend.workers (1: "
                    "every site in this process)"
                )
        log.warning(
            "site worker %d (pid %s) died (%s): its sites in progress are dropped from this step; a new "
            "worker takes its place, with the sites' state from the run store",
            worker.index,
            worker.process.pid,
            how,
        )
        self._workers[worker.index] = self._spawn(worker.index)

    def _poll(self) -> None:
        """Handle what the workers said so far, without waiting (a worker that died since the last call is
        replaced before the next work goes out)."""
        self._start()
        while True:
            try:
                item = self._messages.get_nowait()
            except queue.Empty:
                return
            self._handle(item)

    def _wait(self) -> None:
        """Handle the next thing a worker says (waiting for it, however long: a slow worker is not a dead
        one; a dead one's connection closes)."""
        self._handle(self._messages.get())

    def _call(self, index: int, kind: str, *args: Any) -> int:
        ident = next(self._ids)
        worker = self._workers[index]
        worker.calls.add(ident)
        self._wanted.add(ident)
        with contextlib.suppress(OSError):  # it died: its reader says so, and the call is lost with it
            worker.conn.send((kind, ident, args))
        return ident

    def _result(self, ident: int) -> Any:
        """The answer to call ``ident`` (LOST when its worker died), waiting for it."""
        while ident not in self._done:
            self._wait()
        self._wanted.discard(ident)
        return self._done.pop(ident)

    def _forget(self, idents: Iterator[int] | Sequence[int]) -> None:
        """Calls whose answers nobody will take (a generator left early)."""
        for ident in idents:
            self._wanted.discard(ident)
            self._done.pop(ident, None)

    def _drain(self) -> None:
        """Wait until no call is in flight (their answers are kept for whoever asked)."""
        while any(w.calls for w in self._workers):
            self._wait()

    def _weights(self, weights: Vector, key: tuple[int, int] | None = None) -> WeightsRef:
        """``weights`` in the shared segment, once: every call in flight is answered first, so that no
        worker still has the segment's earlier content to read. ``key``: which model they are, if known
        (asynchronous rounds start sites one by one on the same model)."""
        array = np.ascontiguousarray(weights)
        self._drain()
        if not self._segment or self._segment[0].size < array.nbytes:
            for old in self._segment:
                old.close()
                old.unlink()
            self._segment[:] = [SharedMemory(create=True, size=max(array.nbytes, 1))]
        memory = self._segment[0]
        np.ndarray(array.shape, array.dtype, buffer=memory.buf)[...] = array
        self._version += 1
        self._written = key
        self._ref = WeightsRef(memory.name, self._version, array.size, array.dtype.str)
        return self._ref

    # -- routing ---------------------------------------------------------------------------------------------

    def _assign(self, names: Sequence[str], weight: Callable[[str], float]) -> dict[int, list[str]]:
        """Each site's worker, by name in the order given: the one that holds it, else the least loaded
        (heaviest sites first), which holds it from now on."""
        load = [0.0] * self.size
        for name in names:
            if name in self._pins:
                load[self._pins[name]] += weight(name)
        for name in sorted((n for n in names if n not in self._pins), key=lambda n: -weight(n)):
            index = min(range(self.size), key=lambda i: (load[i], i))
            self._pins[name] = index
            load[index] += weight(name)
        groups: dict[int, list[str]] = {}
        for name in names:
            groups.setdefault(self._pins[name], []).append(name)
        return groups

    def _let_go(self) -> None:
        """As training or an evaluation begins: let go of every site but those just sent a protocol message
        (their sessions are for this work) and those holding an update; each goes to the first worker free
        when next asked, and the worker that had it forgets it (sessions, a lazily read site's windows)."""
        keep, self._talked = self._talked | self._held, set()
        groups: dict[int, list[str]] = {}
        for name, index in list(self._pins.items()):
            if name not in keep:
                del self._pins[name]
                groups.setdefault(index, []).append(name)
        for index, names in groups.items():
            with contextlib.suppress(OSError):
                self._workers[index].conn.send(("drop", 0, (names,)))

    # -- the backend's calls ---------------------------------------------------------------------------------

    def train(self, weights: Vector, tasks: Sequence[Task]) -> Iterator[Trained | Lost]:
        """Each task's result, in task order (LOST where the worker died); the tasks go out as workers are
        free, each to the worker that holds its site, or, not held, to the first worker free."""
        self._poll()
        self._let_go()
        ref = self._weights(weights) if tasks else None
        generations = list(self._workers)
        pinned: dict[int, deque[int]] = {i: deque() for i in range(self.size)}
        free: deque[int] = deque()
        for position, task in enumerate(tasks):
            if task.plan.release:
                self._held.discard(task.site)
            index = self._pins.get(task.site)
            (pinned[index] if index is not None else free).append(position)
        idents: list[int | None] = [None] * len(tasks)
        window = AHEAD * self.size

        def feed(handed: int) -> None:
            limit = handed + window
            for worker in self._workers:
                i = worker.index
                if worker is not generations[i]:  # died this round: the sites it held lost their sessions
                    while pinned[i]:
                        idents[pinned[i].popleft()] = -1
            ready = any(w.ready for w in self._workers)
            for worker in self._workers:
                i = worker.index
                while len(worker.calls) < DEPTH:
                    if pinned[i] and pinned[i][0] < limit:
                        position = pinned[i].popleft()
                    elif free and free[0] < limit and (worker.ready or not ready):
                        position = free.popleft()
                        self._pins[tasks[position].site] = i
                    else:
                        break
                    idents[position] = self._call(i, "train", ref, tasks[position])

        handed = 0
        try:
            for position in range(len(tasks)):
                while True:
                    feed(handed)
                    ident = idents[position]
                    if ident == -1 or (ident is not None and ident in self._done):
                        break
                    self._wait()
                handed = position + 1
                yield LOST if ident is None or ident == -1 else self._result(ident)
        finally:
            self._forget([i for i in idents if i is not None and i > 0])

    def start(self, weights: Vector, key: tuple[int, int], task: Task) -> int:
        """Asynchronous rounds: send ``task`` at once to its site's worker (or the least busy one); the
        result is :meth:`result` of the returned call. ``key`` says which model ``weights`` are (sites
        started on one share one write)."""
        self._poll()
        ref = self._ref if self._ref is not None and self._written == key else self._weights(weights, key)
        index = self._pins.get(task.site)
        if index is None:
            index = min(range(self.size), key=lambda i: (len(self._workers[i].calls), i))
            self._pins[task.site] = index
        self._held.add(task.site)
        return self._call(index, "train", ref, task)

    def result(self, ident: int, task: Task) -> Trained | Lost:
        """The result of a started task; a site that could not train holds nothing."""
        trained = self._result(ident)
        if not isinstance(trained, Trained) or trained.update is None:
            self._held.discard(task.site)
        return trained

    def exchange(self, messages: Mapping[str, bytes]) -> dict[str, Answered | Lost]:
        """Each site's answer to its protocol message, from the worker that holds it."""
        self._poll()
        self._talked.update(messages)
        groups = self._assign(list(messages), lambda name: 1.0)
        idents = {
            index: self._call(index, "answer", [(name, messages[name]) for name in names])
            for index, names in groups.items()
        }
        out: dict[str, Answered | Lost] = {}
        for index, ident in idents.items():
            answers = self._result(ident)
            for name in groups[index]:
                out[name] = LOST
            if not isinstance(answers, Lost):
                out.update((answer.site, answer) for answer in answers)
        return out

    def evaluate(self, weights: Vector, names: Sequence[str], plan: Plan | None) -> dict[str, SiteEvaluation]:
        """Each site's evaluation (none for a site whose worker died), each worker evaluating its sites in
        one call."""
        self._poll()
        self._let_go()
        ref = self._weights(weights)
        personal = plan is not None and plan.personalization != "none"
        groups = self._assign(list(names), (lambda name: 1.0) if personal else self._tests.__getitem__)
        idents = {index: self._call(index, "evaluate", ref, group, plan) for index, group in groups.items()}
        out: dict[str, SiteEvaluation] = {}
        for ident in idents.values():
            evaluations = self._result(ident)
            if not isinstance(evaluations, Lost):
                out.update((e.site, e) for e in evaluations)
        return out

    def close(self) -> None:
        """Stop the workers (those at work are killed: the run is over) and free the shared segment; done
        too when the pool is dropped unclosed, or at exit."""
        self._closer()


def _shutdown(workers: list[_Worker], segment: list[SharedMemory]) -> None:
    """Stop ``workers`` and free ``segment``'s shared memory (a pool's finalizer: it holds no pool)."""
    stopping = list(workers)
    workers.clear()
    for worker in stopping:
        with contextlib.suppress(OSError):
            worker.conn.send(("stop", 0, ()))
    for worker in stopping:
        if worker.calls:
            worker.process.kill()
        worker.process.join(10)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
        worker.conn.close()
    for memory in segment:
        memory.close()
        with contextlib.suppress(FileNotFoundError):
            memory.unlink()
    segment.clear()


@contextlib.contextmanager
def _main_hidden() -> Iterator[None]:
    """While a worker starts: the script that was run (``__main__``) hidden from multiprocessing, which would
    run it again in the worker, as the spawn and forkserver methods do, unless it guards itself with ``if
    __name__ == "__main__"``. A worker needs nothing of it (it is sent its recipe and data set), and a user's
    script that makes a run should not need that guard."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved: dict[str, Any] = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__dict__["__spec__"] = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


def _read(worker: _Worker, out: queue.SimpleQueue[tuple[_Worker, str, int, Any]]) -> None:
    """A worker's messages into the driver's queue, then "dead" once its connection closes."""
    while True:
        try:
            kind, ident, payload = worker.conn.recv()
        except (EOFError, OSError):
            out.put((worker, "dead", 0, None))
            return
        except Exception as e:  # a message that does not unpickle here: a bug, raised in the driver
            out.put((worker, "error", 0, e))
            return
        out.put((worker, kind, ident, payload))


# -- the worker process --------------------------------------------------------------------------------------


class _Weights:
    """A worker's copy of the round's weights, read from the shared segment once per write."""

    def __init__(self) -> None:
        self.memory: SharedMemory | None = None
        self.version = -1
        self.array: Vector = np.empty(0, np.float32)

    def get(self, ref: WeightsRef) -> Vector:
        if ref.version != self.version:
            if self.memory is None or self.memory.name != ref.name.lstrip("/"):
                if self.memory is not None:
                    self.memory.close()
                self.memory = SharedMemory(name=ref.name)
            buffer = self.memory.buf
            assert buffer is not None
            view = np.frombuffer(buffer, dtype=np.dtype(ref.dtype), count=ref.size)
            self.array = view.copy()
            del view, buffer
            self.version = ref.version
        return self.array

    def close(self) -> None:
        if self.memory is not None:
            self.memory.close()


def _site_state(run_dir: str) -> Any:
    """The run store's site state, through a connection of this process's own (SQLite in WAL mode: readers
    and one writer at a time across processes; a lock another holds is waited for, see store.LOCK_WAIT)."""
    from confide.runtime.store import Store, StoreSiteState

    return StoreSiteState(Store.attach(Path(run_dir)))


def _portable(error: BaseException) -> BaseException:
    """``error`` as the driver can raise it: with this process's traceback as a note, or, if it does not
    pickle, a RuntimeError that says what it was."""
    text = "".join(traceback.format_exception(error))
    try:
        error.add_note(f"in the site worker process {os.getpid()}:\n{text}")
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"a site worker process failed:\n{text}")


def serve(conn: Connection) -> None:
    """A worker process: build the sites' worker from the recipe and data set the driver sends first, then
    answer the driver's calls until it says stop or its connection closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle; it stops the workers
    try:
        data = conn.recv_bytes()
    except (EOFError, OSError):
        return
    try:
        try:
            recipe, dataset = pickle.loads(data)
        except (AttributeError, ImportError) as e:
            raise ConfigError(
                f"a site worker process cannot read the run's data set ({e}): it refers to something "
                "defined in the script that was run (its __main__), which worker processes do not run; "
                "define it in a module of its own, or set backend.workers = 1"
            ) from e
        del data
        worker = SiteWorker(recipe, _site_state(recipe.run_dir), dataset)
    except BaseException as e:
        conn.send(("failed", 0, _portable(e)))
        return
    conn.send(("ready", 0, os.getpid()))
    weights = _Weights()
    try:
        while True:
            try:
                kind, ident, args = conn.recv()
            except (EOFError, OSError):
                return  # the driver is gone
            if kind == "stop":
                return
            try:
                if kind == "drop":
                    worker.drop(args[0])
                    continue
                if kind == "train":
                    result: Any = worker.train(weights.get(args[0]), args[1])
                elif kind == "answer":
                    result = [worker.answer(name, data) for name, data in args[0]]
                elif kind == "evaluate":
                    result = worker.evaluate(weights.get(args[0]), args[1], args[2])
                else:
                    raise ValueError(f"a site worker got an unknown call {kind!r}")
                message = ("done", ident, result)
            except Exception as e:
                message = ("error", ident, _portable(e))
            try:
                conn.send(message)
            except OSError:
                return
    finally:
        weights.close()
