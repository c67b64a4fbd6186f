"""The server side of a deployment: a gRPC service the sites dial, and a Backend the federation drives.

Only the server listens. A site joins, then pulls its work with a long poll and answers with a submit, so a
hospital needs no inbound port. The :class:`Hub` is the meeting point of the two sides: the federation (one
thread, through :class:`GrpcBackend`) posts at most one piece of work per site at a time and collects the
answers; the gRPC threads hand each site its work and file its answers. A piece of work stays posted until it
is answered or given up, so a site whose connection broke, or whose process was restarted, simply gets it
again at its next poll. A site waiting in an open poll is alive; otherwise it is given up for the current step
when it has not been heard from (a call or a heartbeat) for ``heartbeat_timeout`` seconds, or when the step's
deadline passes, and the federation goes on without it, as with a dropout in simulation.
"""

from __future__ import annotations

import itertools
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from confide.core import Plan, Update, Vector
from confide.errors import ConfideError, WireError
from confide.runtime.federation import SiteEvaluation, Task
from confide.runtime.grpc import confide_pb2 as pb
from confide.runtime.grpc import confide_pb2_grpc as pb_grpc
from confide.runtime.grpc import wire

log = logging.getLogger(__name__)

MAX_POLL_SECONDS = 30.0
"""The longest a poll is held open before the site is told to poll again (keeps proxies from cutting it)."""

MODEL_WORK = ("train", "evaluate")
"""The work that carries the model: a header-only poll announces it without its tensors, and a site group does
it on its shared model, one site at a time."""

SERVICE = pb.DESCRIPTOR.services_by_name["Federation"].full_name
"""confide.v1.Federation, as confide.proto names it."""

ANSWERS = {
    "train": ("update", "failure"),
    "evaluate": ("evaluation", "failure"),
    "exchange": ("answer", "failure"),
}
"""What a site may send back for each kind of work."""


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


class SessionGone(Exception):
    """The session is no longer the site's current one (the site joined again, or the server restarted)."""


class Hub:
    """Where the federation's work meets the sites' polls. Thread-safe; every wait is bounded."""

    def __init__(
        self,
        heartbeat_timeout: float = 20.0,
        task_timeout: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.heartbeat_timeout = heartbeat_timeout
        self.task_timeout = task_timeout
        self.clock = clock
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._wake: dict[str, threading.Condition] = {}
        """Per site, on the same lock: a post wakes only the site it is for (not every waiting poll)."""
        self._sessions: dict[bytes, Session] = {}
        self._current: dict[str, Session] = {}
        self._seen: dict[str, float] = {}
        self._polling: dict[str, int] = {}
        """Open polls per site: a site waiting on one is alive, however long since it last called."""
        self._pending: dict[str, Work] = {}
        self._results: queue.SimpleQueue[Result] = queue.SimpleQueue()
        self._tickets = itertools.count(1)
        self.stopped: str | None = None
        self._told: set[str] = set()
        self.events: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        """(kind, message) of what the server should record: refusals, drops. Drained by the run's thread."""

    # -- the sites' side (gRPC threads) ------------------------------------------------------------------

    def join(self, site: str, num_train: int, num_test: int) -> Session:
        session = Session(site, secrets.token_bytes(16), num_train, num_test)
        with self._cond:
            old = self._current.get(site)
            if old is not None:
                self._sessions.pop(old.id, None)
            self._sessions[session.id] = session
            self._current[site] = session
            self._seen[site] = self.clock()
            self._wake_site(site)  # an older session's poll ends
        return session

    def _wake_site(self, site: str) -> None:
        """Wake the polls of ``site`` (the caller holds the lock)."""
        wake = self._wake.get(site)
        if wake is None:
            wake = self._wake[site] = threading.Condition(self._lock)
        wake.notify_all()

    def session(self, session_id: bytes, site: str) -> Session:
        """The live session ``session_id`` of ``site``; SessionGone when it is not (or not the site's)."""
        with self._cond:
            session = self._sessions.get(session_id)
            if session is None or session.site != site:
                raise SessionGone(site)
            self._seen[site] = self.clock()
            return session

    def beat(self, session_id: bytes, site: str) -> bool:
        try:
            self.session(session_id, site)
        except SessionGone:
            return False
        return True

    def next_work(self, session: Session, wait: float) -> Work | str | None:
        """The site's posted work, the reason the run stopped, or None when nothing came within ``wait``."""
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
                if remaining <= 0:
                    return None
                self._wake[session.site].wait(remaining)

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

    def poll_opened(self, site: str) -> None:
        with self._cond:
            self._polling[site] = self._polling.get(site, 0) + 1

    def poll_closed(self, site: str) -> None:
        """A poll ended: answered, timed out, or its connection broke (gRPC says so at once)."""
        with self._cond:
            self._polling[site] = max(self._polling.get(site, 0) - 1, 0)
            self._seen[site] = self.clock()

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
        with self._cond:
            return dict(self._current)

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

    def collect(self, works: Sequence[Work]) -> Iterator[Result]:
        """Each site's answer as it arrives; a site silent past the heartbeat timeout, or past the work's
        deadline, is given up and its work withdrawn."""
        open_ = {w.ticket: w for w in works}
        while open_:
            try:
                result = self._results.get(timeout=0.2)
            except queue.Empty:
                result = None
            if result is not None:
                if open_.pop(result.work.ticket, None) is not None:
                    yield result
                continue
            now = self.clock()
            with self._cond:
                for ticket, w in list(open_.items()):
                    seen = now if self._polling.get(w.site) else self._seen.get(w.site, 0.0)
                    # A connected site gets the full timeout from the posting; one without a session (given up
                    # earlier, or never joined) is measured from when it was last heard of, so a dead site
                    # costs the run one timeout, not one per step.
                    silent = now - (max(seen, w.posted) if w.site in self._current else seen)
                    if silent <= self.heartbeat_timeout and now <= w.deadline:
                        continue
                    del open_[ticket]
                    if self._pending.get(w.site) is w:
                        del self._pending[w.site]
                    if silent > self.heartbeat_timeout:
                        self._forget(w.site)
                    why = (
                        f"not heard from for {silent:.0f} s"
                        if silent > self.heartbeat_timeout
                        else f"past its {self.task_timeout:.0f} s deadline"
                    )
                    self.events.put(("dropped", f"site {w.site} dropped from a {w.kind} step: {why}"))
                    log.info("site %s dropped from a %s step: %s", w.site, w.kind, why)

    def _forget(self, site: str) -> None:
        """End a silent site's session: when it comes back it joins again (its client does so by itself)."""
        session = self._current.pop(site, None)
        if session is not None:
            self._sessions.pop(session.id, None)
            self._wake_site(site)

    def stop(self, reason: str) -> None:
        with self._cond:
            self.stopped = reason
            for wake in self._wake.values():
                wake.notify_all()


# -- the gRPC service ---------------------------------------------------------------------------------------


Identify = Callable[[grpc.ServicerContext], str]
"""Who is calling: the authenticated site, or a refusal (the context is aborted with UNAUTHENTICATED)."""


class ByteBudget:
    """Bytes of messages being read at once. A reader waits while its message would overrun the budget, and
    gRPC's flow control holds its sender back meanwhile; a message larger than the whole budget is read when
    nothing else is, so every message is read eventually."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._cond = threading.Condition()

    def take(self, n: int) -> int:
        n = min(n, self.capacity)
        with self._cond:
            self._cond.wait_for(lambda: self.used + n <= self.capacity)
            self.used += n
        return n

    def give(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


class Servicer(pb_grpc.FederationServicer):
    """The four RPCs. Every call is authenticated; a site can only join as itself and answer its own work."""

    def __init__(
        self,
        hub: Hub,
        identify: Identify,
        population: Iterable[str],
        reply: Callable[[], pb.JoinReply],
        limit: int,
        buffer: int = 2 << 30,
    ) -> None:
        self.hub = hub
        self.identify = identify
        self.population = frozenset(population)
        self.reply = reply
        self.limit = limit
        self.budget = ByteBudget(buffer)

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        site = self.identify(context)
        if request.version != wire.VERSION:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this server speaks wire version {wire.VERSION}, the site {request.version}; "
                "run the same confide version on both",
            )
        if request.site != site:
            self.hub.record("refused", f"a caller authenticated as {site} tried to join as {request.site}")
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"these credentials belong to site {site!r}, not {request.site!r}",
            )
        if site not in self.population:
            self.hub.record("refused", f"site {site} is enrolled but not part of this run")
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"site {site!r} is not part of this run (it was enrolled after the run started)",
            )
        session = self.hub.join(site, request.num_train, request.num_test)
        log.info("site %s joined (%d train windows, %s)", site, request.num_train, request.software)
        reply = self.reply()
        reply.session = session.id
        return reply

    def Heartbeat(self, request: pb.Beat, context: grpc.ServicerContext) -> pb.BeatReply:
        site = self.identify(context)
        return pb.BeatReply(known=self.hub.beat(request.session, site))

    def Poll(self, request: pb.PollRequest, context: grpc.ServicerContext) -> Iterator[wire.Part]:
        site = self.identify(context)
        self.hub.poll_opened(site)
        if not context.add_callback(lambda: self.hub.poll_closed(site)):
            self.hub.poll_closed(site)  # the call already ended
        try:
            session = self.hub.session(request.session, site)
            work = self.hub.next_work(session, min(max(request.wait_seconds, 0.0), MAX_POLL_SECONDS))
        except SessionGone:
            context.abort(grpc.StatusCode.NOT_FOUND, "this session is no longer known; join again")
        if work is None:
            yield from wire.chunks(pb.Header(idle=pb.Idle()))
        elif isinstance(work, str):
            yield from wire.chunks(pb.Header(stop=pb.Stop(reason=work)))
        else:
            header = pb.Header()
            header.CopyFrom(work.header)
            parts = wire.chunks(header, work.tensors)
            if request.header_only and work.kind in MODEL_WORK:
                yield next(parts)  # the header, describing the tensors a Fetch will bring
            else:
                yield from parts

    def Fetch(self, request: pb.FetchRequest, context: grpc.ServicerContext) -> Iterator[wire.Part]:
        site = self.identify(context)
        try:
            self.hub.session(request.session, site)
        except SessionGone:
            context.abort(grpc.StatusCode.NOT_FOUND, "this session is no longer known; join again")
        work = self.hub.open_work(site, request.ticket)
        if work is None:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"ticket {request.ticket} is not open for this site (answered or given up); poll again",
            )
            return
        header = pb.Header()
        header.CopyFrom(work.header)
        yield from wire.chunks(header, work.tensors)

    def Submit(self, request_iterator: Iterator[wire.Part], context: grpc.ServicerContext) -> pb.SubmitReply:
        site = self.identify(context)
        taken = 0

        def admit(header: pb.Header) -> None:
            nonlocal taken
            taken = self.budget.take(wire.declared_bytes(header))

        try:
            return self._submit(site, request_iterator, context, admit)
        finally:
            self.budget.give(taken)

    def _submit(
        self,
        site: str,
        request_iterator: Iterator[wire.Part],
        context: grpc.ServicerContext,
        admit: Callable[[pb.Header], None],
    ) -> pb.SubmitReply:
        try:
            message = wire.assemble(request_iterator, self.limit, admit)
        except WireError as e:
            self._fail(site, getattr(e, "header", None), f"a malformed message: {e}")
            code = (
                grpc.StatusCode.RESOURCE_EXHAUSTED if "limit" in str(e) else grpc.StatusCode.INVALID_ARGUMENT
            )
            context.abort(code, str(e))
        header = message.header
        try:
            self.hub.session(header.session, site)
        except SessionGone:
            context.abort(grpc.StatusCode.NOT_FOUND, "this session is no longer known; join again")
        try:
            value, failure = self._read(site, message)
        except WireError as e:
            self._fail(site, header, f"a malformed {message.kind}: {e}")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        refused = self.hub.submit(site, header.ticket, value, failure)
        if refused is not None:
            return pb.SubmitReply(accepted=False, reason=refused)
        return pb.SubmitReply(accepted=True)

    def _read(self, site: str, message: wire.Message) -> tuple[Any, str | None]:
        kind = message.kind
        if kind == "failure":
            return None, message.header.failure.reason or "no reason given"
        if kind == "update":
            update = wire.read_update(message)
            if update.site != site:
                self.hub.record("refused", f"site {site} sent an update in the name of {update.site}")
                raise WireError(f"site {site!r} can only send its own updates, not {update.site!r}'s")
            return update, None
        if kind == "evaluation":
            evaluation = wire.read_evaluation(message)
            if evaluation.site != site:
                raise WireError(f"site {site!r} can only send its own evaluation, not {evaluation.site!r}'s")
            return evaluation, None
        if kind == "answer":
            return wire.read_answer(message), None
        raise WireError(f"a site cannot send a {kind or 'message without a body'}")

    def _fail(self, site: str, header: pb.Header | None, reason: str) -> None:
        """A malformed answer to open work ends the site's part in that step at once (no waiting)."""
        self.hub.record("malformed", f"site {site} sent {reason}")
        if header is not None and header.ticket:
            self.hub.submit(site, header.ticket, failure=reason)


def _check_kind(work: Work, result: Result) -> Result:
    """The answer must be of the kind the work asks for (an update for training, ...)."""
    if result.failure is None:
        expected = {"train": Update, "evaluate": SiteEvaluation, "exchange": bytes}[work.kind]
        if not isinstance(result.value, expected):
            return Result(work, None, f"answered {work.kind} work with a {type(result.value).__name__}")
    return result


class GrpcBackend:
    """The :class:`~confide.runtime.federation.Backend` of a deployment: tasks go out through the hub."""

    def __init__(self, hub: Hub, population: Sequence[str]) -> None:
        self.hub = hub
        self.population = tuple(population)

    def sites(self) -> Sequence[str]:
        return self.population

    def _run(self, works: list[Work]) -> Iterator[Any]:
        for result in self.hub.collect(works):
            result = _check_kind(result.work, result)
            if result.failure is not None:
                log.info(
                    "site %s did not do its %s work: %s", result.work.site, result.work.kind, result.failure
                )
                self.hub.events.put(
                    (
                        "failed",
                        f"site {result.work.site} could not do its {result.work.kind}: {result.failure}",
                    )
                )
                continue
            yield result

    def train(self, weights: Vector, tasks: Sequence[Task]) -> Iterator[Update]:
        works = [self.hub.post(t.site, wire.train_message(0, t, weights)) for t in tasks]
        for result in self._run(works):
            yield result.value

    def evaluate(
        self, weights: Vector, sites: Sequence[str], plan: Plan | None = None
    ) -> Iterator[SiteEvaluation]:
        personal = plan if plan is not None and plan.personalization != "none" else None
        works = [self.hub.post(s, wire.evaluate_message(0, weights, personal)) for s in sites]
        for result in self._run(works):
            yield result.value

    def exchange(self, messages: Mapping[str, bytes]) -> Iterator[tuple[str, bytes]]:
        works = [self.hub.post(site, wire.exchange_message(0, data)) for site, data in messages.items()]
        for result in self._run(works):
            if result.value:
                yield result.work.site, result.value

    def close(self) -> None:
        pass


def channel_options(limit: int) -> list[tuple[str, Any]]:
    """gRPC options both sides use: message limits that fit a chunk (never the whole model) and keepalives
    that notice a dead peer behind a NAT."""
    return [
        ("grpc.max_receive_message_length", wire.GRPC_MESSAGE_LIMIT),
        ("grpc.max_send_message_length", wire.GRPC_MESSAGE_LIMIT),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def rpc_handlers(servicer: Servicer) -> grpc.GenericRpcHandler:
    """The service of confide.proto, with chunks (de)serialized by :mod:`wire`: tensor bytes are copied once
    into each outgoing chunk and not at all out of an incoming one."""
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Join": grpc.unary_unary_rpc_method_handler(
                servicer.Join, pb.JoinRequest.FromString, pb.JoinReply.SerializeToString
            ),
            "Heartbeat": grpc.unary_unary_rpc_method_handler(
                servicer.Heartbeat, pb.Beat.FromString, pb.BeatReply.SerializeToString
            ),
            "Poll": grpc.unary_stream_rpc_method_handler(
                servicer.Poll, pb.PollRequest.FromString, wire.encode_chunk
            ),
            "Fetch": grpc.unary_stream_rpc_method_handler(
                servicer.Fetch, pb.FetchRequest.FromString, wire.encode_chunk
            ),
            "Submit": grpc.stream_unary_rpc_method_handler(
                servicer.Submit, wire.decode_chunk, pb.SubmitReply.SerializeToString
            ),
        },
    )


class FederationClient:
    """The site's side of the service (as the generated stub, with :mod:`wire`'s chunk (de)serializers)."""

    def __init__(self, channel: grpc.Channel) -> None:
        path = f"/{SERVICE}/"
        self.Join = channel.unary_unary(
            path + "Join", pb.JoinRequest.SerializeToString, pb.JoinReply.FromString
        )
        self.Heartbeat = channel.unary_unary(
            path + "Heartbeat", pb.Beat.SerializeToString, pb.BeatReply.FromString
        )
        self.Poll = channel.unary_stream(path + "Poll", pb.PollRequest.SerializeToString, wire.decode_chunk)
        self.Fetch = channel.unary_stream(
            path + "Fetch", pb.FetchRequest.SerializeToString, wire.decode_chunk
        )
        self.Submit = channel.stream_unary(path + "Submit", wire.encode_chunk, pb.SubmitReply.FromString)


def start_server(
    servicer: Servicer, listen: str, credentials: grpc.ServerCredentials, max_sites: int
) -> tuple[grpc.Server, int]:
    """A gRPC server with TLS on ``listen`` (HOST:PORT; port 0 picks a free one); returns it and its port.

    Each site holds one long poll open and sends heartbeats, so the thread pool is sized to the sites."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2 * max_sites + 16, thread_name_prefix="confide-rpc"),
        options=[
            *channel_options(servicer.limit),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.so_reuseport", 0),
        ],
    )
    server.add_generic_rpc_handlers((rpc_handlers(servicer),))
    try:
        port = server.add_secure_port(listen, credentials)
    except RuntimeError as e:
        raise ConfideError(f"cannot listen on {listen}: {e}") from e
    if port == 0:
        raise ConfideError(f"cannot listen on {listen}: the address is in use or not this machine's")
    server.start()
    return server, port
