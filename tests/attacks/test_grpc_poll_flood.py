"""An enrolled site cannot take the server's threads by holding many polls open.

Attack (audit, issue 11 §5): each Poll holds one of the server's handler threads for up to its wait (30 s at
most), and the pool is sized to the sites, so one site that opened polls without limit could leave none for
the others. Now a site may hold at most ``POLLS_PER_SITE`` polls open at once; the others are refused at
once (RESOURCE_EXHAUSTED) before they wait, and the site's own polls still work once its flood has drained.
Here over a real TLS server on 127.0.0.1.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from confide.runtime.grpc import confide_pb2 as pb
from confide.runtime.grpc import wire
from confide.runtime.grpc.hub import Hub
from confide.runtime.grpc.security import (
    Authenticator,
    Enrollment,
    create_certificates,
    issue_site_credentials,
    server_credentials,
)
from confide.runtime.grpc.server import (
    POLLS_PER_SITE,
    FederationClient,
    Servicer,
    channel_options,
    start_server,
)

FLOOD = 3 * POLLS_PER_SITE


def test_a_site_holds_only_a_few_polls_and_the_rest_are_refused_at_once(tmp_path: Path) -> None:
    create_certificates(tmp_path, ["localhost", "127.0.0.1"])
    mallory = issue_site_credentials(tmp_path, "mallory")
    enrollment = Enrollment.open(tmp_path)
    servicer = Servicer(
        Hub(), Authenticator(enrollment, "token"), ["mallory"], lambda: pb.JoinReply(run="r"), 1 << 20
    )
    server, port = start_server(servicer, "127.0.0.1:0", server_credentials(tmp_path, False), 1)
    channel = grpc.secure_channel(
        f"localhost:{port}", mallory.channel_credentials(), options=channel_options(1 << 20)
    )
    try:
        stub = FederationClient(channel)
        metadata = mallory.call_metadata()
        session = stub.Join(pb.JoinRequest(version=wire.VERSION, site="mallory"), metadata=metadata).session
        request = pb.PollRequest(version=wire.VERSION, session=session, wait_seconds=20)
        calls = [stub.Poll(request, metadata=metadata, timeout=120) for _ in range(FLOOD)]
        outcomes = [_drain(call) for call in calls]
        refused = [o for o in outcomes if o.startswith("RESOURCE_EXHAUSTED")]
        assert len(refused) >= FLOOD - POLLS_PER_SITE, outcomes
        assert all("the most a site may have at once" in o for o in refused), refused
        # Her flood is over: a poll of hers is served again (it waits, and ends with nothing to do).
        short = pb.PollRequest(version=wire.VERSION, session=session, wait_seconds=1)
        again = stub.Poll(short, metadata=metadata, timeout=60)
        assert _drain(again) == "answered"
    finally:
        channel.close()
        server.stop(0).wait()
        enrollment.close()


def _drain(call: grpc.Call) -> str:
    """How a server-streaming poll ended: answered (with work or without), or the refusal's code and text."""
    try:
        for _ in call:  # type: ignore[attr-defined]
            pass
    except grpc.RpcError as e:
        return f"{e.code().name}: {e.details()}"  # type: ignore[attr-defined]
    return "answered"
