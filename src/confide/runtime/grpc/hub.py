"""The meeting point of a deployment's two sides: the federation's work and the sites' calls.

The federation (one thread, through :class:`~confide.runtime.grpc.server.GrpcBackend`) posts at most one
piece of work per site at a time and collects the answers; the gRPC threads hand each site its work and file
its answers. A piece of work stays posted until it is answered or given up, so a site whose connection broke,
or whose process was restarted, simply gets it again at its next poll.

Who is alive. A site with a call open (a poll, a fetch, an upload) is connected: gRPC ends the call at once
when its connection breaks, so an open call is proof of life however long it lasts. Between calls a site that
serves sends heartbeats, and it is given up for the current step when it has not been heard from for
``heartbeat_timeout`` seconds. A site that has joined but not yet polled or beaten is still preparing (it
builds its model and trainer from the run config, which on a busy machine or with a large model takes far
longer than a heartbeat timeout, and it promises no heartbeats before it serves): it is held only to the
work's own deadline (``task_timeout``): its work waits for it as for a slow site's.
"""

from __future__ import annotations

import itertools
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from confide.runtime.grpc import confide_pb2 as pb
from confide.runtime.grpc.flow import Meter

log = logging.getLogger(__name__)


@dataclass
class Work:
    """One piece of work posted for one site: the header and tensors it travels as, and its deadline."""

    ticket: int
    site: str
    header: pb.Header
    tensors: list[tuple[str, np.ndarray]]
    posted: float
    deadline: float

    @property
    def kind(self) -> str:
        return self.header.WhichOneof("body") or ""


@dataclass
class Result:
    """A site's answer to a piece of work: the decoded value, or why the site could not do it."""

    work: Work
    value: Any = None
    failure: str | None = None


@dataclass
class Session:
    site: str
    id: bytes
    num_train: int
    num_test: int
    joined: float = field(default_factory=time.monotonic)
    serving: bool = False
    """Set at the session's first poll or heartbeat: from then on the site promises to be heard from."""


class SessionGone(Exception):
    """The session is no longer the site's current one (the site joined again, or the server restarted)."""


class Hub:
    """Where the federation's work meets the sites' calls. Thread-safe; every wait is bounded."""

    def __init__(
        self,
        heartbeat_timeout: float = 20.0,
        task_timeout: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.heartbeat_timeout = heartbeat_timeout
        self.task_timeout = task_timeout
        self.clock = clock
        self.traffic = Meter()
        """Bytes moved per site and direction, counted by the service where it (de)serializes them."""
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._wake: dict[str, threading.Condition] = {}
        """Per site, on the same lock: a post wakes only the site it is for (not every waiting poll)."""
        self._sessions: dict[bytes, Session] = {}
        self._current: dict[str, Session] = {}
        self._seen: dict[str, float] = {}
        self._calls: dict[str, dict[str, int]] = {}
        """Open calls per site and kind: a site with a call open is connected, however long ago it called."""
        self._pending: dict[str, Work] = {}
        self._results: queue.SimpleQueue[Result] = queue.SimpleQueue()
        self._early: dict[int, Result] = {}
        """Answers that came in while the federation waited for other work (an asynchronous run's training
        answers while a buffer's round runs), kept until it collects them."""
        self._tickets = itertools.count(1)
        self.stopped: str | None = None
        self._told: set[str] = set()
        self.events: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        """(kind, message) of what the server should record: refusals, drops. Drained by the run's thread."""

    # -- the sites' side (gRPC threads) ------------------------------------------------------------------

    def join(self, site: str, num_train: int, num_test: int) -> Session:
        session = Session(site, secrets.token_bytes(16), num_train, num_test, self.clock())
        with self._cond:
            old = self._current.get(site)
            if old is not None:
                self._sessions.pop(old.id, None)
            self._sessions[session.id] = session
            self._current[site] = session
            self._seen[site] = self.clock()
            self._wake_site(site)  # an older session's poll ends
        return session

    def _condition(self, site: str) -> threading.Condition:
        """What the polls of ``site`` wait on (the caller holds the lock)."""
        wake = self._wake.get(site)
        if wake is None:
            wake = self._wake[site] = threading.Condition(self._lock)
        return wake

    def _wake_site(self, site: str) -> None:
        """Wake the polls of ``site`` (the caller holds the lock)."""
        self._condition(site).notify_all()

    def session(self, session_id: bytes, site: str) -> Session:
        """The live session ``session_id`` of ``site`` (now serving); SessionGone when it is not."""
        with self._cond:
            session = self._sessions.get(session_id)
            if session is None or session.site != site:
                raise SessionGone(site)
            self._seen[site] = self.clock()
            session.serving = True
            return session

    def beat(self, session_id: bytes, site: str) -> bool:
        try:
            self.session(session_id, site)
        except SessionGone:
            return False
        return True

    def next_work(
        self, session: Session, wait: float, active: Callable[[], bool] = lambda: True
    ) -> Work | str | None:
        """The site's posted work, the reason the run stopped, or None when nothing came within ``wait`` (or
        the poll's call ended: ``active`` is asked whenever one of the site's calls closes)."""
        end = self.clock() + wait
        with self._cond:
            while True:
                if self._sessions.get(session.id) is not session:
                    raise SessionGone(session.site)
                self._seen[session.site] = self.clock()
                if self.stopped is not None:
                    self._told.add(session.site)
                    return self.stopped
                work = self._pending.get(session.site)
                if work is not None:
                    return work
                remaining = end - self.clock()
                if remaining <= 0 or not active():
                    return None
                self._condition(session.site).wait(remaining)

    def submit(self, site: str, ticket: int, value: Any = None, failure: str | None = None) -> str | None:
        """File ``site``'s answer to ``ticket``; the reason it is refused, or None."""
        with self._cond:
            self._seen[site] = self.clock()
            work = self._pending.get(site)
            if work is None or work.ticket != ticket:
                return (
                    f"ticket {ticket} is not open for site {site!r} (it was answered, given up after a "
                    "timeout, or never posted to this site)"
                )
            del self._pending[site]
        self._results.put(Result(work, value, failure))
        return None

    def call_opened(self, site: str, kind: str, limit: int | None = None) -> bool:
        """Count a call of ``site`` as open; False (and nothing counted) when ``limit`` calls of the same
        kind are open already."""
        with self._cond:
            calls = self._calls.setdefault(site, {})
            if limit is not None and calls.get(kind, 0) >= limit:
                return False
            calls[kind] = calls.get(kind, 0) + 1
            self._seen[site] = self.clock()
            return True

    def call_closed(self, site: str, kind: str) -> None:
        """A call ended: answered, timed out, or its connection broke (gRPC says so at once)."""
        with self._cond:
            calls = self._calls.setdefault(site, {})
            calls[kind] = max(calls.get(kind, 0) - 1, 0)
            self._seen[site] = self.clock()
            self._wake_site(site)  # a poll whose call ended stops waiting

    def connected(self, site: str) -> bool:
        """Whether ``site`` has a call open."""
        with self._cond:
            return any(self._calls.get(site, {}).values())

    def open_work(self, site: str, ticket: int) -> Work | None:
        """``site``'s posted work if its ticket is ``ticket``."""
        with self._cond:
            work = self._pending.get(site)
            return work if work is not None and work.ticket == ticket else None

    def told_to_stop(self) -> set[str]:
        """The sites that have heard that the run is over."""
        with self._cond:
            return set(self._told)

    def sessions(self) -> dict[str, Session]:
        """The sites with a live session (serving, or still preparing: their work waits for them)."""
        with self._cond:
            return dict(self._current)

    def last_heard(self) -> dict[str, float]:
        """When each site that ever joined was last heard from (a call, a poll, a heartbeat), on ``clock``."""
        with self._cond:
            return dict(self._seen)

    def record(self, kind: str, message: str) -> None:
        log.warning("%s", message)
        self.events.put((kind, message))

    # -- the federation's side (one thread) --------------------------------------------------------------

    def post(self, site: str, message: tuple[pb.Header, list[tuple[str, np.ndarray]]]) -> Work:
        """Post ``message`` (its header gets a fresh ticket) as ``site``'s work, replacing any older work."""
        header, tensors = message
        header.ticket = next(self._tickets)
        now = self.clock()
        work = Work(header.ticket, site, header, tensors, now, now + self.task_timeout)
        with self._cond:
            self._pending[site] = work
            self._wake_site(site)
        return work

    def collect(self, works: Sequence[Work], tick: float = 0.2, given_up: bool = False) -> Iterator[Result]:
        """Each site's answer as it arrives; a site silent past the heartbeat timeout (the module docstring
        says who counts as silent), or past the work's deadline, is given up and its work withdrawn (and,
        with ``given_up``, yielded as a failure). Answers to other work that is still open are kept for the
        collection that waits for them."""
        open_ = {w.ticket: w for w in works}
        for ticket in list(open_):
            early = self._early.pop(ticket, None)
            if early is not None:
                del open_[ticket]
                yield early
        while open_:
            try:
                result = self._results.get(timeout=tick)
            except queue.Empty:
                result = None
            if result is not None:
                if open_.pop(result.work.ticket, None) is not None:
                    yield result
                else:
                    self._early[result.work.ticket] = result
                continue
            dropped: list[Result] = []
            with self._cond:
                for ticket, w in list(open_.items()):
                    why = self._given_up(w)
                    if why is None:
                        continue
                    del open_[ticket]
                    if self._pending.get(w.site) is w:
                        del self._pending[w.site]
                    self.events.put(("dropped", f"site {w.site} dropped from a {w.kind} step: {why}"))
                    log.info("site %s dropped from a %s step: %s", w.site, w.kind, why)
                    dropped.append(Result(w, failure=f"given up: {why}"))
            if given_up:
                yield from dropped  # outside the lock: the caller may stop at any answer

    def _given_up(self, work: Work) -> str | None:
        """Why ``work`` is given up now, or None while its site may still answer (the caller holds the lock).
        A site given up for silence loses its session, so that it costs the run one timeout, not one per
        step: further work is measured from when it was last heard of, and the site joins again (its client
        does so by itself) when it comes back."""
        now = self.clock()
        if now > work.deadline:
            return f"past its {self.task_timeout:.0f} s deadline"
        site = work.site
        if self.connected(site):
            return None
        session = self._current.get(site)
        if session is not None and not session.serving:
            return None  # still preparing since it joined: only the deadline applies
        seen = self._seen.get(site, 0.0)
        # A serving site gets the full timeout from the posting; one without a session (given up earlier,
        # or never joined) is measured from when it was last heard of.
        silent = now - (max(seen, work.posted) if session is not None else seen)
        if silent <= self.heartbeat_timeout:
            return None
        self._forget(site)
        return f"not heard from for {silent:.0f} s"

    def _forget(self, site: str) -> None:
        session = self._current.pop(site, None)
        if session is not None:
            self._sessions.pop(session.id, None)
            self._wake_site(site)

    def stop(self, reason: str) -> None:
        with self._cond:
            self.stopped = reason
            for wake in self._wake.values():
                wake.notify_all()
