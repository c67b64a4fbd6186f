"""The deployment's meeting point and flow control, as real objects driven by threads: :class:`Hub` (who gets
work, who is alive), :class:`ByteBudget`, :class:`Meter` and :class:`GrpcBackend`. Deadlines run on a clock
the test moves, so no assertion depends on how fast the machine is."""

from __future__ import annotations

import contextlib
import socket
import threading

import grpc
import numpy as np
import pytest

from confide.core import Plan, Update
from confide.runtime.federation import SiteEvaluation, Task
from confide.runtime.grpc import confide_pb2 as pb
from confide.runtime.grpc import wire
from confide.runtime.grpc.flow import GRPC_FRAME, Abandoned, ByteBudget, Meter, Traffic
from confide.runtime.grpc.hub import Hub, SessionGone, Work
from confide.runtime.grpc.security import (
    Authenticator,
    Enrollment,
    create_certificates,
    issue_site_credentials,
    server_credentials,
)
from confide.runtime.grpc.server import (
    FederationClient,
    GrpcBackend,
    Servicer,
    channel_options,
    start_server,
)

PLAN = Plan(round=1, epochs=1, max_steps=1, batch_size=2, learning_rate=0.1)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def hub(heartbeat_timeout: float = 20.0, task_timeout: float = 600.0) -> tuple[Hub, Clock]:
    clock = Clock()
    return Hub(heartbeat_timeout, task_timeout, clock), clock


def train(site: str) -> tuple:
    return wire.train_message(0, Task(site, PLAN, 0), np.arange(4, dtype=np.float32))


def events(h: Hub) -> list[tuple[str, str]]:
    found = []
    while not h.events.empty():
        found.append(h.events.get())
    return found


# -- the Hub ------------------------------------------------------------------------------------------------


def test_posted_work_is_polled_answered_once_and_collected() -> None:
    h, _ = hub()
    session = h.join("a", 10, 2)
    work = h.post("a", train("a"))
    assert h.next_work(session, 0.0) is work
    assert h.open_work("a", work.ticket) is work and h.open_work("a", work.ticket + 1) is None
    assert h.submit("a", work.ticket, value="answer") is None
    refused = h.submit("a", work.ticket, value="again")
    assert refused is not None and f"ticket {work.ticket} is not open" in refused
    [result] = list(h.collect([work], tick=0.01))
    assert (result.work, result.value, result.failure) == (work, "answer", None)
    assert h.open_work("a", work.ticket) is None


def test_a_newer_post_replaces_the_open_work_and_its_ticket() -> None:
    h, _ = hub()
    h.join("a", 1, 1)
    first = h.post("a", train("a"))
    second = h.post("a", train("a"))
    assert second.ticket != first.ticket
    assert h.submit("a", first.ticket) is not None
    assert h.submit("a", second.ticket) is None


def test_a_session_serves_from_its_first_poll_or_heartbeat() -> None:
    h, _ = hub()
    preparing = h.join("a", 1, 1)
    serving = h.join("b", 1, 1)
    assert h.beat(serving.id, "b")
    assert set(h.sessions()) == {"a", "b"}  # both joined: a preparing site's work waits for it
    assert [s.serving for s in (preparing, serving)] == [False, True]
    h.session(preparing.id, "a")  # its first poll looks the session up
    assert preparing.serving


def test_joining_again_ends_the_older_session() -> None:
    h, _ = hub()
    old = h.join("a", 1, 1)
    new = h.join("a", 1, 1)
    assert not h.beat(old.id, "a") and h.beat(new.id, "a")
    with pytest.raises(SessionGone):
        h.next_work(old, 0.0)
    with pytest.raises(SessionGone):
        h.session(new.id, "b")  # a session is only its own site's


def test_a_silent_serving_site_is_dropped_and_a_preparing_one_only_at_the_deadline() -> None:
    h, clock = hub(heartbeat_timeout=20, task_timeout=600)
    preparing = h.join("a", 1, 1)  # building its model: no heartbeats promised yet
    serving = h.join("b", 1, 1)
    h.beat(serving.id, "b")
    works = [h.post("a", train("a")), h.post("b", train("b"))]
    clock.now = 100.0
    assert list(h.collect(works[1:], tick=0.01)) == []
    assert events(h) == [("dropped", "site b dropped from a train step: not heard from for 100 s")]
    assert not h.beat(serving.id, "b")  # its session ended: it joins again when it comes back
    # The preparing site still has its work and its session, until the work's deadline.
    assert h.open_work("a", works[0].ticket) is works[0]
    clock.now = 601.0
    assert list(h.collect(works[:1], tick=0.01)) == []
    assert events(h) == [("dropped", "site a dropped from a train step: past its 600 s deadline")]
    assert h.session(preparing.id, "a").site == "a"  # a deadline does not end the session


def test_an_open_call_is_proof_of_life_and_its_end_starts_the_silence() -> None:
    h, clock = hub(heartbeat_timeout=20, task_timeout=10_000)
    session = h.join("a", 1, 1)
    h.session(session.id, "a")
    assert h.call_opened("a", "upload", limit=1)
    assert not h.call_opened("a", "upload", limit=1)  # one upload at a time
    work = h.post("a", train("a"))
    clock.now = 5_000.0
    answered = threading.Timer(0.3, lambda: h.submit("a", work.ticket, value="late"))
    answered.start()
    [result] = list(h.collect([work], tick=0.01))  # not dropped: its upload is open
    answered.join()
    assert result.value == "late" and events(h) == []
    h.call_closed("a", "upload")
    again = h.post("a", train("a"))
    clock.now = 5_021.0
    assert list(h.collect([again], tick=0.01)) == []
    assert events(h) == [("dropped", "site a dropped from a train step: not heard from for 21 s")]


def test_a_site_never_joined_is_dropped_at_once_and_one_given_up_costs_one_timeout() -> None:
    h, clock = hub(heartbeat_timeout=20)
    clock.now = 1000.0
    assert list(h.collect([h.post("ghost", train("ghost"))], tick=0.01)) == []
    assert events(h) == [("dropped", "site ghost dropped from a train step: not heard from for 1000 s")]
    s = h.join("a", 1, 1)
    h.beat(s.id, "a")
    work = h.post("a", train("a"))
    clock.now = 1030.0
    assert list(h.collect([work], tick=0.01)) == []
    clock.now = 1031.0  # the next step: measured from when it was last heard of, not from the posting
    assert list(h.collect([h.post("a", train("a"))], tick=0.01)) == []
    assert [m for _, m in events(h)] == [
        "site a dropped from a train step: not heard from for 30 s",
        "site a dropped from a train step: not heard from for 31 s",
    ]


def test_a_waiting_poll_gets_work_posted_later_and_ends_with_its_call() -> None:
    h = Hub()
    session = h.join("a", 1, 1)
    assert h.next_work(session, 0.05) is None  # nothing posted: idle after the wait
    poster = threading.Timer(0.2, lambda: h.post("a", train("a")))
    poster.start()
    work = h.next_work(session, 600.0)
    poster.join()
    assert isinstance(work, Work) and work.site == "a"
    h.submit("a", work.ticket)
    # A poll whose call has ended stops waiting when any call of its site closes.
    active = threading.Event()
    active.set()
    closer = threading.Timer(0.2, lambda: (active.clear(), h.call_closed("a", "poll")))
    closer.start()
    assert h.next_work(session, 600.0, active.is_set) is None
    closer.join()


def test_stop_answers_every_poll_with_the_reason() -> None:
    h = Hub()
    session = h.join("a", 1, 1)
    stopper = threading.Timer(0.2, lambda: h.stop("the run is finished"))
    stopper.start()
    assert h.next_work(session, 600.0) == "the run is finished"
    stopper.join()
    assert h.told_to_stop() == {"a"}


# -- flow control and counting ----------------------------------------------------------------------


def test_the_budget_lets_a_waiting_reader_in_when_bytes_are_given_back() -> None:
    budget = ByteBudget(100, tick=0.01)
    assert budget.take(60) == 60
    taken: list[int] = []
    reader = threading.Thread(target=lambda: taken.append(budget.take(50)))
    reader.start()
    reader.join(0.3)
    assert reader.is_alive() and budget.used == 60  # 60 + 50 > 100: it waits
    budget.give(60)
    reader.join(30)
    assert taken == [50] and budget.used == 50
    # A message larger than the whole budget is read alone (it reserves all of it), so it is read at all.
    budget.give(50)
    assert budget.take(10_000) == 100 and budget.used == 100
    budget.give(100)
    assert budget.used == 0


def test_a_waiting_reader_gives_up_when_its_call_ends() -> None:
    budget = ByteBudget(100, tick=30.0)  # a long tick: only wake() can make it ask again soon
    budget.take(100)
    ended = threading.Event()
    outcome: list[str] = []

    def read() -> None:
        try:
            budget.take(1, lambda: "its call ended" if ended.is_set() else None)
        except Abandoned as e:
            outcome.append(str(e))

    reader = threading.Thread(target=read)
    reader.start()
    reader.join(0.2)
    assert reader.is_alive()
    ended.set()
    budget.wake()
    reader.join(30)
    assert outcome == ["its call ended"] and budget.used == 100


def test_the_meter_counts_each_message_with_its_grpc_framing() -> None:
    meter = Meter()
    meter.sent("a", 100)
    meter.received("a", 0)  # an empty message still travels its 5-byte prefix
    meter.sent("b", 7)
    assert meter.by_site() == {
        "a": Traffic(100 + GRPC_FRAME, GRPC_FRAME),
        "b": Traffic(7 + GRPC_FRAME, 0),
    }
    assert meter.total() == Traffic(112 + GRPC_FRAME, GRPC_FRAME)
    assert meter.total() - Traffic(5, 5) == Traffic(112, 0)


def test_the_meter_is_exact_under_concurrent_counting() -> None:
    meter = Meter()

    def count(site: str) -> None:
        for _ in range(2000):
            meter.sent(site, 1)
            meter.received(site, 2)

    threads = [threading.Thread(target=count, args=(s,)) for s in ("a", "a", "b", "c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    per = 2000 * Traffic(1 + GRPC_FRAME, 2 + GRPC_FRAME).sent
    assert meter.by_site()["a"] == Traffic(2 * per, 2 * 2000 * (2 + GRPC_FRAME))
    assert meter.total().sent == 4 * per


# -- the backend ------------------------------------------------------------------------------------


def serve(h: Hub, site: str, answer, count: int) -> threading.Thread:
    """A site that takes ``count`` pieces of work from the hub and files ``answer(work)`` for each."""
    session = h.join(site, 1, 1)

    def run() -> None:
        for _ in range(count):
            work = h.next_work(session, 60.0)
            assert isinstance(work, Work)
            value, failure = answer(work)
            h.submit(site, work.ticket, value, failure)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_the_backend_carries_training_evaluation_and_protocol_steps() -> None:
    h = Hub()
    backend = GrpcBackend(h, ["a", "b"])
    assert list(backend.sites()) == ["a", "b"]
    weights = np.arange(4, dtype=np.float32)

    def answer(work: Work) -> tuple:
        if work.kind == "train":
            update = Update(site=work.site, round=1, num_examples=3, vector=weights + 1, model_version=0)
            return update, None
        if work.kind == "evaluate":
            return SiteEvaluation(work.site, 1.5, 2, 4), None
        message = work.tensors[0][1].tobytes()
        return (b"" if work.site == "b" else message[::-1]), None

    threads = [serve(h, s, answer, 3) for s in ("a", "b")]
    updates = list(backend.train(weights, [Task("a", PLAN, 0), Task("b", PLAN, 0)]))
    assert sorted(u.site for u in updates) == ["a", "b"]
    assert all(np.array_equal(u.vector, weights + 1) for u in updates)
    evaluations = list(backend.evaluate(weights, ["a", "b"]))
    assert sorted(e.site for e in evaluations) == ["a", "b"] and evaluations[0].targets == 4
    # A protocol step: only sites that answer with something are yielded.
    assert list(backend.exchange({"a": b"abc", "b": b"xyz"})) == [("a", b"cba")]
    for t in threads:
        t.join(30)
    backend.close()


def test_the_backend_skips_failures_and_answers_of_the_wrong_kind() -> None:
    h = Hub()
    backend = GrpcBackend(h, ["a", "b"])
    weights = np.zeros(4, dtype=np.float32)
    serve(h, "a", lambda work: (SiteEvaluation("a", 0.0, 0, 1), None), 1)  # an evaluation for training work
    serve(h, "b", lambda work: (None, "out of memory"), 1)
    assert list(backend.train(weights, [Task("a", PLAN, 0), Task("b", PLAN, 0)])) == []
    messages = sorted(m for kind, m in events(h) if kind == "failed")
    assert messages == [
        "site a could not do its train: answered train work with a SiteEvaluation",
        "site b could not do its train: out of memory",
    ]


def test_the_backend_reports_the_traffic_its_hub_counted() -> None:
    h = Hub()
    backend = GrpcBackend(h, ["a"])
    before = backend.traffic()
    h.traffic.sent("a", 1000)
    h.traffic.received("a", 10)
    assert backend.traffic() - before == Traffic(1000 + GRPC_FRAME, 10 + GRPC_FRAME)


# -- the bytes counted against the bytes a socket carried ------------------------------------------------


class Proxy:
    """A TCP relay on 127.0.0.1 that counts the bytes it carries each way (TLS records and all)."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.to_server = 0
        self.to_site = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self._pump, args=(client, server, "to_server"), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, "to_site"), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, way: str) -> None:
        try:
            while data := source.recv(1 << 16):
                target.sendall(data)
                with self._lock:
                    setattr(self, way, getattr(self, way) + len(data))
        except OSError:
            pass
        finally:
            for s in (source, target):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()


def test_the_counted_bytes_are_what_the_socket_carried(tmp_path) -> None:
    """Two rounds of a 4 MiB model and update through a real TLS server, counted by the server and by a TCP
    relay in front of it. The relay sees everything: TLS records (5-byte header and 16-byte tag per 16 KiB),
    the handshake with its certificates, HTTP/2 frames and the calls' headers; the server counts the messages
    with their gRPC framing. So the count never exceeds what the socket carried, and with messages this large
    it is within 3% of it (what TLS and HTTP/2 add to a large message is under 0.5%)."""
    create_certificates(tmp_path, ["localhost", "127.0.0.1"])
    site = issue_site_credentials(tmp_path, "a")
    enrollment = Enrollment.open(tmp_path)
    h = Hub()
    servicer = Servicer(h, Authenticator(enrollment, "token"), ["a"], lambda: pb.JoinReply(run="r"), 64 << 20)
    server, port = start_server(servicer, "127.0.0.1:0", server_credentials(tmp_path, False), 1)
    proxy = Proxy(port)
    backend = GrpcBackend(h, ["a"])
    weights = np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32)
    channel = grpc.secure_channel(
        f"localhost:{proxy.port}", site.channel_credentials(), options=channel_options(0)
    )
    stub = FederationClient(channel)
    metadata = site.call_metadata()

    joined = stub.Join(pb.JoinRequest(version=wire.VERSION, site="a"), metadata=metadata, timeout=60)

    def take_part() -> None:
        for _ in range(2):
            request = pb.PollRequest(version=wire.VERSION, session=joined.session, wait_seconds=30)
            message = wire.assemble(stub.Poll(request, metadata=metadata, timeout=120), 64 << 20)
            beat = pb.Beat(version=wire.VERSION, session=joined.session)
            assert stub.Heartbeat(beat, metadata=metadata, timeout=60).known
            vector = message.tensor("weights", np.float32) * 2
            update = Update(site="a", round=1, num_examples=1, vector=vector, model_version=0)
            header, tensors = wire.update_message(message.header.ticket, joined.session, update)
            assert stub.Submit(wire.chunks(header, tensors), metadata=metadata, timeout=120).accepted

    site_thread = threading.Thread(target=take_part)
    site_thread.start()
    try:
        for _ in range(2):
            [update] = backend.train(weights, [Task("a", PLAN, 0)])
            assert np.array_equal(update.vector, weights * 2)
        site_thread.join(120)
    finally:
        channel.close()
        server.stop(0).wait()
        proxy.close()
        enrollment.close()
    counted = backend.traffic()
    assert h.traffic.by_site() == {"a": counted}
    assert 2 * weights.nbytes < counted.sent <= proxy.to_site
    assert 2 * weights.nbytes < counted.received <= proxy.to_server
    assert counted.sent >= 0.97 * proxy.to_site, (counted, proxy.to_site, proxy.to_server)
    assert counted.received >= 0.97 * proxy.to_server, (counted, proxy.to_site, proxy.to_server)
