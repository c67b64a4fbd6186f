"""The server side of a deployment: a gRPC service the sites dial, and a Backend the federation drives.

Only the server listens. A site joins, then pulls its work with a long poll and answers with a submit, so a
hospital needs no inbound port. The :class:`~confide.runtime.grpc.hub.Hub` is where the two sides meet (and
says who is alive); :mod:`confide.runtime.grpc.flow` bounds what a hostile enrolled site can hold (memory,
threads, time) and counts the bytes every call moves. This module is the service itself: authentication
before anything is decoded, and the checks on what each site may send.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message as ProtoMessage

from confide.core import Plan, Traffic, Update, Vector
from confide.errors import ConfideError, WireError
from confide.runtime.federation import Ready, SiteEvaluation, Task
from confide.runtime.grpc import confide_pb2 as pb
from confide.runtime.grpc import wire
from confide.runtime.grpc.flow import Abandoned, ByteBudget, Watch, Watchdog
from confide.runtime.grpc.hub import Hub, Result, Session, SessionGone, Work

__all__ = [
    "MODEL_WORK",
    "FederationClient",
    "GrpcBackend",
    "Hub",
    "Result",
    "Servicer",
    "Session",
    "SessionGone",
    "Traffic",
    "Work",
    "channel_options",
    "rpc_handlers",
    "start_server",
]

M = TypeVar("M", bound=ProtoMessage)

log = logging.getLogger(__name__)

MAX_POLL_SECONDS = 30.0
"""The longest a poll is held open before the site is told to poll again (keeps proxies from cutting it)."""

MODEL_WORK = ("train", "evaluate")
"""The work that carries the model: a header-only poll announces it without its tensors, and a site group does
it on its shared model, one site at a time."""

SERVICE = pb.DESCRIPTOR.services_by_name["Federation"].full_name
"""confide.v1.Federation, as confide.proto names it."""


# -- the gRPC service ---------------------------------------------------------------------------------------


Identify = Callable[[grpc.ServicerContext], str]
"""Who is calling: the authenticated site, or a refusal (the context is aborted with UNAUTHENTICATED)."""


UNARY_LIMIT = 64 << 10
"""The largest request of a unary call (join, heartbeat, poll, fetch) the service decodes: each is a few dozen
bytes. (gRPC itself receives up to GRPC_MESSAGE_LIMIT, the limit of an upload's chunks, before any handler
runs; nothing of it is decoded unless the caller is authenticated and it fits here.)"""

STALL_SECONDS = 120.0
POLLS_PER_SITE = 4
"""Polls one site may hold open at once: it needs one; a few more let a client that reconnects overlap its
old poll, and the limit keeps one site from holding many of the server's threads."""
"""A stream that moves no message for this long is cancelled (a chunk is 4 MiB: this allows an uplink of
about 0.3 Mbit/s)."""


class _Turned(Exception):
    """An upload turned away from its header, before any of its data is read: aborted with ``code``, or (no
    code) answered with a SubmitReply that says why it was not accepted."""

    def __init__(self, reason: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(reason)
        self.code = code


class Servicer:
    """The five RPCs. Every call is authenticated before any of its request is decoded; a site can only join
    as itself, answer its own open work, and upload one answer at a time.

    Requests arrive as the raw bytes gRPC received (the service's deserializers are the identity) and replies
    leave as bytes this class encoded: so a refused caller's request is never parsed, and every message is
    counted, per site and direction, in ``hub.traffic`` where it is decoded or encoded."""

    def __init__(
        self,
        hub: Hub,
        identify: Identify,
        population: Iterable[str],
        reply: Callable[[], pb.JoinReply],
        limit: int,
        buffer: int = 2 << 30,
        *,
        stall_seconds: float = STALL_SECONDS,
    ) -> None:
        self.hub = hub
        self.identify = identify
        self.population = frozenset(population)
        self.reply = reply
        self.limit = limit
        self.budget = ByteBudget(buffer)
        self.watchdog = Watchdog(stall_seconds)
        self.parsed: Counter[str] = Counter()
        """Requests decoded, per method: what the service spent parsing (a refused caller's is never)."""
        self._parsed_lock = threading.Lock()

    # -- requests and replies as bytes -------------------------------------------------------------------

    def _parse(self, site: str, message: type[M], raw: bytes, context: grpc.ServicerContext) -> M:
        """The request of an authenticated unary call, decoded (and counted)."""
        self.hub.traffic.received(site, len(raw))
        if len(raw) > UNARY_LIMIT:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"a {message.__name__} of {len(raw):,} bytes; the limit is {UNARY_LIMIT:,}",
            )
        with self._parsed_lock:
            self.parsed[message.__name__] += 1
        try:
            return message.FromString(raw)
        except Exception:  # protobuf's DecodeError
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid {message.__name__} message"
            )
            raise  # abort raises; this line is for type checkers

    def _encode(self, site: str, message: pb.JoinReply | pb.BeatReply | pb.SubmitReply) -> bytes:
        data = message.SerializeToString()
        self.hub.traffic.sent(site, len(data))
        return data

    def _stream(self, site: str, parts: Iterable[wire.Part], watch: Watch) -> Iterator[bytes]:
        """``parts`` encoded, counted, and each one's sending noted by ``watch`` (a reader that stops reading
        is cancelled by the watchdog)."""
        for part in parts:
            data = wire.encode_chunk(part)
            self.hub.traffic.sent(site, len(data))
            yield data
            watch.moved()

    @contextmanager
    def _open(self, site: str, kind: str, context: grpc.ServicerContext, limit: int = 1) -> Iterator[None]:
        """The call counts as open (its site is connected) until it ends; gRPC says at once when it does.
        A site may have at most ``limit`` calls of a kind open: each holds one of the server's threads."""
        if not self.hub.call_opened(site, kind, limit):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"site {site!r} has {limit} {kind} call{'s' if limit > 1 else ''} in progress already, the "
                "most a site may have at once",
            )
        closed = threading.Event()

        def close() -> None:
            if not closed.is_set():
                closed.set()
                self.hub.call_closed(site, kind)
                self.budget.wake()

        if not context.add_callback(close):
            close()  # the call already ended
        try:
            yield
        finally:
            close()

    # -- the RPCs --------------------------------------------------------------------------------------------

    def Join(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        site = self.identify(context)
        request = self._parse(site, pb.JoinRequest, raw, context)
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
        return self._encode(site, reply)

    def Heartbeat(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        site = self.identify(context)
        request = self._parse(site, pb.Beat, raw, context)
        return self._encode(site, pb.BeatReply(known=self.hub.beat(request.session, site)))

    def Poll(self, raw: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        site = self.identify(context)
        request = self._parse(site, pb.PollRequest, raw, context)
        with self._open(site, "poll", context, limit=POLLS_PER_SITE):
            try:
                session = self.hub.session(request.session, site)
                wait = min(max(request.wait_seconds, 0.0), MAX_POLL_SECONDS)
                work = self.hub.next_work(session, wait, context.is_active)
            except SessionGone:
                context.abort(grpc.StatusCode.NOT_FOUND, "this session is no longer known; join again")
            with self.watchdog.watch(context) as watch:
                if work is None:
                    yield from self._stream(site, wire.chunks(pb.Header(idle=pb.Idle())), watch)
                elif isinstance(work, str):
                    yield from self._stream(site, wire.chunks(pb.Header(stop=pb.Stop(reason=work))), watch)
                else:
                    header = pb.Header()
                    header.CopyFrom(work.header)
                    parts = wire.chunks(header, work.tensors)
                    if request.header_only and work.kind in MODEL_WORK:
                        parts = itertools.islice(parts, 1)  # the header, describing what a Fetch brings
                    yield from self._stream(site, parts, watch)

    def Fetch(self, raw: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        site = self.identify(context)
        request = self._parse(site, pb.FetchRequest, raw, context)
        with self._open(site, "fetch", context):
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
            with self.watchdog.watch(context) as watch:
                yield from self._stream(site, wire.chunks(header, work.tensors), watch)

    def Submit(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        """One answer, read only once its session and ticket are known to be open, within the byte budget,
        and while it keeps moving; one upload per site at a time."""
        site = self.identify(context)
        with self._open(site, "submit", context), self.watchdog.watch(context) as watch:
            upload = _Upload(site, context, watch)
            try:
                reply = self._receive(upload, requests)
            except grpc.RpcError:  # the call ended while it was read: the site went, or the watchdog ended it
                reply = pb.SubmitReply(accepted=False, reason="the upload ended before it was complete")
            finally:
                self.budget.give(upload.taken)
            if watch.cancelled is not None and upload.ticket:
                self._fail(site, upload.ticket, f"an upload that was cancelled: {watch.cancelled}", "stalled")
            return self._encode(site, reply)

    def _receive(self, upload: _Upload, requests: Iterator[bytes]) -> pb.SubmitReply:
        site, context = upload.site, upload.context

        def parts() -> Iterator[wire.Part]:
            for raw in requests:
                self.hub.traffic.received(site, len(raw))
                upload.watch.moved()
                yield wire.decode_chunk(raw)

        try:
            message = wire.assemble(parts(), self.limit, lambda header: self._admit(upload, header))
        except _Turned as e:
            if e.code is not None:
                context.abort(e.code, str(e))
            return pb.SubmitReply(accepted=False, reason=str(e))
        except WireError as e:
            if upload.watch.cancelled is not None:
                # The server ended the call itself: gRPC may show that as the stream ending early rather than
                # as an error, and it is the stall, not a malformed message, that the caller records.
                return pb.SubmitReply(accepted=False, reason="the upload ended before it was complete")
            header = getattr(e, "header", None)
            self._fail(site, header.ticket if header is not None else 0, f"a malformed message: {e}")
            code = (
                grpc.StatusCode.RESOURCE_EXHAUSTED if "limit" in str(e) else grpc.StatusCode.INVALID_ARGUMENT
            )
            context.abort(code, str(e))
        finally:
            upload.watch.finish()  # read (or refused): the work's answer may now close its ticket
        try:
            value, failure = self._read(site, message)
        except WireError as e:
            self._fail(site, message.header.ticket, f"a malformed {message.kind}: {e}")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        refused = self.hub.submit(site, message.header.ticket, value, failure)
        if refused is not None:
            return pb.SubmitReply(accepted=False, reason=refused)
        return pb.SubmitReply(accepted=True)

    def _admit(self, upload: _Upload, header: pb.Header) -> None:
        """Let an answer's data in: only for the sender's live session and open ticket (checked before a byte
        of budget is taken), and only once its declared bytes fit in the budget."""
        site, ticket = upload.site, header.ticket
        try:
            self.hub.session(header.session, site)
        except SessionGone:
            raise _Turned("this session is no longer known; join again", grpc.StatusCode.NOT_FOUND) from None
        if self.hub.open_work(site, ticket) is None:
            raise _Turned(
                f"ticket {ticket} is not open for site {site!r} (it was answered, given up after a timeout, "
                "or never posted to this site)"
            )
        upload.ticket = ticket

        def withdrawn() -> str | None:
            return None if self.hub.open_work(site, ticket) is not None else "its work was withdrawn"

        def abandoned() -> str | None:
            return withdrawn() if upload.context.is_active() else "its call ended"

        upload.watch.check = withdrawn
        with upload.watch.pause():
            try:
                upload.taken = self.budget.take(wire.declared_bytes(header), abandoned)
            except Abandoned as e:
                raise _Turned(f"the upload waited for memory to read it until {e}") from None

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

    def _fail(self, site: str, ticket: int, reason: str, kind: str = "malformed") -> None:
        """A malformed or stalled answer to open work ends the site's part in that step at once (no waiting,
        and no second try at holding the server's memory in the same step)."""
        self.hub.record(kind, f"site {site} sent {reason}")
        if ticket:
            self.hub.submit(site, ticket, failure=reason)


@dataclass
class _Upload:
    """One Submit call as it is read."""

    site: str
    context: grpc.ServicerContext
    watch: Watch
    ticket: int = 0
    taken: int = 0


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
        self.began = time.monotonic()
        self._training: dict[str, tuple[Work, int]] = {}
        """Asynchronous rounds: each training site's work and the model version it trains on."""

    def sites(self) -> Sequence[str]:
        return self.population

    def now(self) -> float:
        """Wall-clock seconds since the deployment's backend was made."""
        return time.monotonic() - self.began

    def start(self, weights: Vector, task: Task) -> None:
        """Asynchronous rounds: post the site's ``hold`` task and return; its answer comes in next_ready."""
        work = self.hub.post(task.site, wire.train_message(0, task, weights))
        self._training[task.site] = (work, task.model_version)

    def next_ready(self) -> Ready | None:
        """The next training site to answer (ready, failed, or given up after the hub's timeouts)."""
        while self._training:
            works = [work for work, _ in self._training.values()]
            result = next(self.hub.collect(works, given_up=True), None)
            if result is None:  # cannot happen: every open work is answered or given up
                break
            _, version = self._training.pop(result.work.site)
            if result.failure is None:
                result = _check_kind(result.work, result)
            if result.failure is not None:
                return Ready(result.work.site, version, result.failure)
            update = result.value
            if not isinstance(update, Update) or update.site != result.work.site or update.vector is not None:
                return Ready(result.work.site, version, "it sent an update instead of a ready notice")
            return Ready(result.work.site, version)
        return None

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

    def traffic(self) -> Traffic:
        """Bytes moved with every site so far, each way (cumulative: a round's are the difference of this
        before and after it), counted where each message is encoded or decoded."""
        return self.hub.traffic.total()

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
    """The service of confide.proto. Requests reach the servicer as the bytes gRPC received and replies leave
    as the bytes it encoded (no (de)serializer here): it authenticates a call before it decodes anything, and
    counts each message, and tensor bytes are copied once into each outgoing chunk and not at all out of an
    incoming one."""
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Join": grpc.unary_unary_rpc_method_handler(servicer.Join),
            "Heartbeat": grpc.unary_unary_rpc_method_handler(servicer.Heartbeat),
            "Poll": grpc.unary_stream_rpc_method_handler(servicer.Poll),
            "Fetch": grpc.unary_stream_rpc_method_handler(servicer.Fetch),
            "Submit": grpc.stream_unary_rpc_method_handler(servicer.Submit),
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
