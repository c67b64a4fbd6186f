"""An enrolled site cannot stall a deployment by opening uploads and never finishing them.

Attack (audit, issue 11 §5): "mallory", an enrolled site with valid credentials, declares the largest message
the server accepts in Submit streams and then sends nothing more. Before the fix two such streams took the
whole read budget (it waited without a timeout, and before the session was checked), every honest upload
then waited behind them forever, and their handler threads were never freed.

Here a real `confide server` runs with a budget of exactly two maximal messages, two honest real clients
train, and mallory (in this test's process, over real gRPC) stalls at every chance she gets: uploads for a
ticket that is not hers, and two at once for the one that is. The run must finish, her second upload must be
refused at once, and her stalled one must be cancelled by the server (its bytes and thread released) when her
work is given up.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc

from confide.runtime.grpc import confide_pb2 as pb
from confide.runtime.grpc import confide_pb2_grpc as pb_grpc
from confide.runtime.grpc import wire
from confide.runtime.grpc.security import Credentials
from tests.conftest import tiny_config
from tests.runtime.grpc_harness import Cluster, enroll, metrics, query

LIMIT_MB = 1


def stalling(header: pb.Header, release: threading.Event) -> Iterator[pb.Chunk]:
    """A header declaring the largest message the server takes, then nothing until ``release``."""
    header.tensors.add(name="vector", dtype="uint8", shape=[LIMIT_MB << 20])
    yield pb.Chunk(header=header)
    release.wait()


class Mallory:
    """Polls for her work and answers each piece with stalled uploads; notes what the server did to them."""

    def __init__(self, port: int, credentials: Credentials) -> None:
        self.channel = grpc.secure_channel(f"localhost:{port}", credentials.channel_credentials())
        self.stub = pb_grpc.FederationStub(self.channel)
        self.metadata = credentials.call_metadata()
        self.release = threading.Event()
        self.outcomes: dict[str, list[str]] = {"foreign": [], "second": [], "stalled": []}
        self.session = b""

    def join(self) -> None:
        request = pb.JoinRequest(version=wire.VERSION, site="mallory", num_train=10, num_test=1)
        self.session = self.stub.Join(request, metadata=self.metadata, timeout=60).session
        self.stub.Heartbeat(pb.Beat(version=wire.VERSION, session=self.session), metadata=self.metadata)

    def upload(self, ticket: int, kind: str) -> grpc.Future:
        header = pb.Header(
            version=wire.VERSION, ticket=ticket, session=self.session, update=pb.UpdateResult()
        )
        call = self.stub.Submit.future(stalling(header, self.release), metadata=self.metadata)
        call.add_done_callback(lambda f: self.outcomes[kind].append(_outcome(f)))
        return call

    def run(self) -> None:
        while True:
            request = pb.PollRequest(version=wire.VERSION, session=self.session, wait_seconds=5)
            try:
                message = wire.assemble(self.stub.Poll(request, metadata=self.metadata, timeout=60), 1 << 30)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.NOT_FOUND:  # given up for silence: join again
                    self.join()
                    continue
                return  # the server is gone
            if message.kind == "stop":
                return
            if message.kind != "train":  # evaluation: she declines it, so that her next poll waits
                failure = wire.failure_message(message.header.ticket, self.session, "no")
                self.stub.Submit(wire.chunks(failure), metadata=self.metadata, timeout=60)
                continue
            ticket = message.header.ticket
            # Two at once for a ticket not hers (before the fix, these two alone took the whole budget): each
            # is turned away from its header, before it takes any budget, or as her second upload at once.
            foreign = [self.upload(ticket + 1000, "foreign") for _ in range(2)]
            for call in foreign:
                call.exception(timeout=60)
            stalled = self.upload(ticket, "stalled")
            self.upload(ticket, "second").exception(timeout=60)  # while the first one is open
            try:
                stalled.exception(timeout=300)  # until the server cancels it
            except grpc.FutureTimeoutError:
                return

    def close(self) -> None:
        self.release.set()
        self.channel.close()


def _outcome(future: grpc.Future) -> str:
    error = future.exception()
    if error is None:
        reply = future.result()
        return "accepted" if reply.accepted else f"refused: {reply.reason}"
    return error.code().name  # type: ignore[attr-defined]


def test_stalled_uploads_are_refused_or_cancelled_while_the_honest_sites_finish(
    tmp_path: Path, text_corpus: Path
) -> None:
    sites = ["site0", "site1", "mallory"]
    # One round: each of mallory's stalls comes in it, and the round waits task_timeout for her update.
    text = tiny_config(text_corpus, tmp_path / "runs", run__rounds="1", server__sites_per_round="3")
    (tmp_path / "run.toml").write_text(text)
    credentials = enroll(tmp_path / "deploy", sites)
    overrides = [
        f"deploy.max_message_mb={LIMIT_MB}",
        f"deploy.receive_buffer_mb={2 * LIMIT_MB}",  # two of mallory's declarations would fill it
        "deploy.task_timeout=30",  # how long a round waits for mallory's update that never comes
    ]
    c = Cluster(tmp_path, tmp_path / "run.toml", tmp_path / "deploy", overrides)
    mallory = None
    try:
        c.start_server()
        mallory = Mallory(c.port, Credentials.load(credentials["mallory"]))
        mallory.join()
        attack = threading.Thread(target=mallory.run, daemon=True)
        attack.start()
        for site in ("site0", "site1"):
            c.start_client(site, credentials[site], text_corpus)

        assert c.wait_server(timeout=600) == 0, c.log("server")
        assert set(c.wait_clients().values()) == {0}, c.log("site0")
        attack.join(60)
        run_dir = tmp_path / "runs" / "tiny"
        assert [m["round"] for m in metrics(run_dir)] == [1]
        # Only mallory was dropped: the honest uploads were never stuck behind hers.
        dropped = [m for (m,) in query(run_dir, "SELECT message FROM events WHERE kind = 'dropped'")]
        assert dropped and all(m.startswith("site mallory ") for m in dropped), dropped
        outcomes = mallory.outcomes
        refused = ("is not open", "RESOURCE_EXHAUSTED")
        foreign = outcomes["foreign"]
        assert foreign and all(any(r in o for r in refused) for o in foreign), outcomes
        assert any("is not open" in o for o in foreign), outcomes
        assert outcomes["second"] and set(outcomes["second"]) == {"RESOURCE_EXHAUSTED"}, outcomes
        # The server ended each stalled upload itself (she never would have).
        assert outcomes["stalled"] and set(outcomes["stalled"]) == {"CANCELLED"}, outcomes
        stalled = [m for (m,) in query(run_dir, "SELECT message FROM events WHERE kind = 'stalled'")]
        assert stalled and all("mallory" in m and "withdrawn" in m for m in stalled), stalled
    finally:
        if mallory is not None:
            mallory.close()
        c.close()
