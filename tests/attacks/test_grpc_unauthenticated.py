"""An unauthenticated caller cannot make the server decode its requests.

Attack: anyone who can reach the port (no token, or a forged one) sends unary requests as large as gRPC lets
through (8 MiB: the limit of an upload's chunks, which gRPC applies to every method), hoping the server spends
its CPU and memory parsing them before it asks who is calling. A real server on 127.0.0.1, with TLS and the
real token check, counts what it decodes (``Servicer.parsed``): the attack must leave that at zero.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from confide.runtime.grpc import confide_pb2 as pb
from confide.runtime.grpc import wire
from confide.runtime.grpc.hub import Hub
from confide.runtime.grpc.security import (
    Authenticator,
    Credentials,
    Enrollment,
    create_certificates,
    issue_site_credentials,
    server_credentials,
)
from confide.runtime.grpc.server import SERVICE, Servicer, start_server

UNARY = ("Join", "Heartbeat", "Poll", "Fetch")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Servicer, int, Credentials]]:
    create_certificates(tmp_path, ["localhost", "127.0.0.1"])
    site = issue_site_credentials(tmp_path, "site0")
    enrollment = Enrollment.open(tmp_path)
    servicer = Servicer(
        Hub(), Authenticator(enrollment, "token"), ["site0"], lambda: pb.JoinReply(run="r"), 1 << 20
    )
    grpc_server, port = start_server(servicer, "127.0.0.1:0", server_credentials(tmp_path, False), 1)
    yield servicer, port, site
    grpc_server.stop(0).wait()
    enrollment.close()


def raw_call(channel: grpc.Channel, method: str, data: bytes, metadata: tuple = ()) -> grpc.StatusCode:
    """Send ``data`` as the request of ``method`` byte for byte; the status it gets."""
    path = f"/{SERVICE}/{method}"
    try:
        if method in ("Poll", "Fetch"):
            list(channel.unary_stream(path, lambda b: b, lambda b: b)(data, metadata=metadata, timeout=60))
        else:
            channel.unary_unary(path, lambda b: b, lambda b: b)(data, metadata=metadata, timeout=60)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_unauthenticated_requests_are_refused_before_they_are_decoded(server) -> None:
    servicer, port, site = server
    forged = (("authorization", "Bearer cfd_" + "A" * 43),)
    with grpc.secure_channel(f"localhost:{port}", site.channel_credentials()) as channel:
        for method in UNARY:
            # Bytes that are no protobuf message at all: a server that decoded before it authenticated
            # would fail in its deserializer (INTERNAL) instead of refusing the caller.
            assert raw_call(channel, method, b"\xff" * 64) == grpc.StatusCode.UNAUTHENTICATED, method
            # Nearly the most gRPC lets through, with no token and with a forged one.
            big = pb.JoinRequest(version=wire.VERSION, site="x" * (7 << 20)).SerializeToString()
            assert raw_call(channel, method, big) == grpc.StatusCode.UNAUTHENTICATED, method
            assert raw_call(channel, method, big, forged) == grpc.StatusCode.UNAUTHENTICATED, method
        assert sum(servicer.parsed.values()) == 0, servicer.parsed
        assert servicer.hub.traffic.by_site() == {}  # nothing is counted for a site nobody proved to be

        # An enrolled site's oversized request is refused from its size, still without decoding it.
        metadata = site.call_metadata()
        assert raw_call(channel, "Join", big, metadata) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert raw_call(channel, "Join", b"\xff" * 64, metadata) == grpc.StatusCode.INVALID_ARGUMENT
        assert servicer.parsed == {"JoinRequest": 1}  # the 64 bytes, which fit, were decoded (and refused)
        join = pb.JoinRequest(version=wire.VERSION, site="site0").SerializeToString()
        assert raw_call(channel, "Join", join, metadata) == grpc.StatusCode.OK
        assert servicer.parsed == {"JoinRequest": 2}
