"""What the server lets through, and what it counts: the bytes it reads at once, streams that stop moving,
and the bytes every call moves.

Threat model: an enrolled site may be hostile (or broken). It holds valid credentials, so it gets past
authentication, and may then try to exhaust the server: declare the largest message and never send it,
trickle its data, or open many uploads at once. What it can hold is bounded here: memory by
:class:`ByteBudget` (whose waits give up when their call ends or their work is withdrawn), and time by
:class:`Watchdog`, which cancels a stream that delivers nothing for ``stall_seconds``, freeing its thread and
its share of the budget. (One upload at a time per site, and the check of the session and ticket before any
budget is taken, are in the service: :mod:`confide.runtime.grpc.server`.)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc

from confide.core import Traffic
from confide.runtime.grpc.wire import GRPC_FRAME


class Meter:
    """Cumulative bytes per site and direction, counted where the service (de)serializes each message: every
    call (joins, heartbeats, polls, fetches, uploads, and their replies), with gRPC's framing of each message.
    HTTP/2 and TLS framing and the calls' metadata are not messages and are not counted. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sites: dict[str, list[int]] = {}

    def sent(self, site: str, message_bytes: int) -> None:
        with self._lock:
            self._sites.setdefault(site, [0, 0])[0] += message_bytes + GRPC_FRAME

    def received(self, site: str, message_bytes: int) -> None:
        with self._lock:
            self._sites.setdefault(site, [0, 0])[1] += message_bytes + GRPC_FRAME

    def by_site(self) -> dict[str, Traffic]:
        with self._lock:
            return {site: Traffic(sent, received) for site, (sent, received) in self._sites.items()}

    def total(self) -> Traffic:
        return sum(self.by_site().values(), Traffic())


class Abandoned(Exception):
    """A wait was given up: its call ended, or what it waited for no longer matters (the text says which)."""


class ByteBudget:
    """Bytes of messages being read at once. A reader waits while its message would overrun the budget, and
    gRPC's flow control holds its sender back meanwhile; a message larger than the whole budget is read when
    nothing else is, so every message is read eventually.

    No wait is unbounded: a reader gives its place up as soon as ``abandoned`` (asked every ``tick`` seconds,
    and at once after :meth:`wake`) names a reason, such as its call having ended or its work having been
    withdrawn at its deadline."""

    def __init__(self, capacity: int, tick: float = 0.5) -> None:
        self.capacity = capacity
        self.used = 0
        self.tick = tick
        self._cond = threading.Condition()

    def take(self, n: int, abandoned: Callable[[], str | None] = lambda: None) -> int:
        """Reserve ``n`` bytes (at most the whole budget); returns what was reserved, to :meth:`give` back.
        Raises :class:`Abandoned` when ``abandoned`` names a reason first."""
        n = min(n, self.capacity)
        with self._cond:
            while self.used + n > self.capacity:
                reason = abandoned()
                if reason is not None:
                    raise Abandoned(reason)
                self._cond.wait(self.tick)
            self.used += n
        return n

    def give(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()

    def wake(self) -> None:
        """Make every waiting reader ask again whether it should give up (a call ended)."""
        with self._cond:
            self._cond.notify_all()


class Watch:
    """One stream under a :class:`Watchdog`: ``moved`` after each message, ``paused`` while the server itself
    holds the stream back (waiting for budget is not the sender's stall)."""

    def __init__(self, context: grpc.ServicerContext, clock: Callable[[], float]) -> None:
        self.context = context
        self.clock = clock
        self.last = clock()
        self.paused = False
        self.check: Callable[[], str | None] = lambda: None
        """Asked on every round of the watchdog: a reason to end the stream now (its work was withdrawn)."""
        self.cancelled: str | None = None
        self.finished = False
        self._lock = threading.Lock()

    def moved(self) -> None:
        self.last = self.clock()

    def finish(self) -> None:
        """The stream has done what it was watched for: from now on it is never cancelled."""
        with self._lock:
            self.finished = True

    @contextmanager
    def pause(self) -> Iterator[None]:
        self.paused = True
        try:
            yield
        finally:
            self.paused = False
            self.last = self.clock()


class Watchdog:
    """Cancels streams that deliver nothing for ``stall_seconds`` (or whose ``check`` says to): their handler
    sees the call end at once, so the thread and the bytes it held are released. One thread serves every
    stream, and runs only while some stream is watched."""

    def __init__(self, stall_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.stall_seconds = stall_seconds
        self.clock = clock
        self.tick = min(1.0, stall_seconds / 4)
        self._lock = threading.Lock()
        self._watches: set[Watch] = set()
        self._thread: threading.Thread | None = None

    @contextmanager
    def watch(self, context: grpc.ServicerContext) -> Iterator[Watch]:
        watch = Watch(context, self.clock)
        with self._lock:
            self._watches.add(watch)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="confide-watchdog", daemon=True)
                self._thread.start()
        try:
            yield watch
        finally:
            with self._lock:
                self._watches.discard(watch)

    def _run(self) -> None:
        while True:
            time.sleep(self.tick)
            with self._lock:
                if not self._watches:
                    self._thread = None
                    return
                watches = list(self._watches)
            for watch in watches:
                self._inspect(watch)

    def _inspect(self, watch: Watch) -> None:
        with watch._lock:
            if watch.finished or watch.cancelled is not None:
                return
            reason = watch.check()
            idle = self.clock() - watch.last
            if reason is None and not watch.paused and idle > self.stall_seconds:
                reason = f"nothing moved on it for {idle:.0f} s (the limit is {self.stall_seconds:g} s)"
            if reason is not None:
                watch.cancelled = reason
                watch.context.cancel()
