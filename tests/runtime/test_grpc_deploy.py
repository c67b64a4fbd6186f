"""A deployment end to end: a real `confide server` and real `confide client` processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import urllib.request
from pathlib import Path

import grpc
import pytest

from confide import config
from confide.runtime.grpc import confide_pb2 as pb
from confide.runtime.grpc import confide_pb2_grpc as pb_grpc
from confide.runtime.grpc import wire
from confide.runtime.grpc.security import Credentials
from confide.runtime.runner import Runner
from tests.conftest import tiny_config
from tests.runtime.grpc_harness import enroll, metrics, query

SITES = [f"site{i}" for i in range(6)]
KEYS = (
    "loss",
    "accuracy",
    "site_accuracy_mean",
    "site_loss_p90",
    "train_loss",
)
"""Bytes are not among them: a deployment also moves its polls, heartbeats and acknowledgements."""


def local_metrics(config_text: str, tmp: Path) -> list[dict]:
    path = tmp / "local.toml"
    path.write_text(config_text.replace(str(tmp / "runs"), str(tmp / "local-runs")))
    runner = Runner.start(config.load(path))
    runner.run()
    runner.store.close()
    return metrics(runner.store.run_dir)


def assert_same(deployed: list[dict], local: list[dict]) -> None:
    assert [m["round"] for m in deployed] == [m["round"] for m in local]
    for a, b in zip(deployed, local, strict=True):
        for key in KEYS:
            # The same training at every site; only the order in which updates are summed differs.
            if b[key] is None:  # metrics.jsonl writes what is not known (NaN) as null
                assert a[key] is None, (a["round"], key)
            else:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["round"], key)


FULL = bool(os.environ.get("CONFIDE_FULL"))
ALSO_AUTHENTICATED = "its protocol runs in the authenticated variant too; CONFIDE_FULL=1 runs it alone"


@pytest.mark.parametrize(
    "secure, auth",
    [
        (False, "token"),
        pytest.param(
            True, "token", marks=[pytest.mark.slow, pytest.mark.skipif(not FULL, reason=ALSO_AUTHENTICATED)]
        ),
        ("authenticated", "token"),
        (False, "mtls"),
        ("ckks", "token"),
    ],
    ids=["plain", "secure-aggregation", "authenticated-secure-aggregation", "mutual-tls", "ckks"],
)
def test_a_deployed_run_gives_the_metrics_of_the_simulation(
    cluster, tmp_path, text_corpus, secure, auth
) -> None:
    extra = {"privacy__secure_aggregation": "true"} if secure else {}
    if secure == "ckks":
        # The key ceremony runs over the wire, signed with each site's enrolled identity; the server adds
        # ciphertexts into the encrypted model, one plain SGD step.
        extra = {"privacy__encryption": "'ckks'", "server__optimizer": "'sgd'"}
        extra["server__learning_rate"] = "1.0"
    if secure == "authenticated":
        # Each site signs its keys with the identity it made; every site checks the others' against the
        # registry the server sends, entry by entry, against the deployment CA.
        extra["privacy__secagg_authenticated"] = "true"
    text = tiny_config(text_corpus, tmp_path / "runs", run__rounds="2", **extra)
    credentials = enroll(
        tmp_path / "deploy", SITES, certificate=auth == "mtls", identity=secure in ("authenticated", "ckks")
    )
    c = cluster(text, [f"deploy.auth='{auth}'"])
    watched = not secure and auth == "token"  # the plain run is also served to the live view
    c.start_server(extra=["--dashboard", "127.0.0.1:0"] if watched else [])
    if watched:
        # The view listens before any site has joined, and says the run has not started.
        url = re.search(r"live view: (http://127\.0\.0\.1:\d+/)", c.log("server")).group(1)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url + "api/state", timeout=30) as response:
            assert json.loads(response.read())["status"] == "waiting for the run to start"
    for site in SITES:
        c.start_client(site, credentials[site], text_corpus)
    assert c.wait_server() == 0, c.log("server")
    # Every site joined (a time from the hub), and the three sites of each of the two rounds took part.
    states = query(
        tmp_path / "runs" / "tiny", "SELECT site, state, joined, last_seen, rounds FROM site_status"
    )
    assert sorted(site for site, *_ in states) == SITES
    assert all(joined is not None and seen >= joined for _, _, joined, seen, _ in states)
    assert sum(rounds for *_, rounds in states) == 2 * 3 and {state for _, state, *_ in states} <= {
        "took part",
        "joined",
    }
    assert set(c.wait_clients().values()) == {0}, c.log("site0")
    assert "the run is finished" in c.log("site0")
    assert f"TLS, {auth} authentication" in (c.logs / "server.log").read_text()
    # Nobody was dropped (that would change the metrics for a reason other than the transport).
    assert query(tmp_path / "runs" / "tiny", "SELECT message FROM events WHERE kind = 'dropped'") == []
    deployed = metrics(tmp_path / "runs" / "tiny")
    assert_same(deployed, local_metrics(text, tmp_path))
    # Counted on the wire: more goes out (the weights to every training and evaluating site) than comes in.
    assert all(m["bytes_sent"] > m["bytes_received"] > 0 for m in deployed)


def test_refused_credentials_and_plaintext(cluster, tmp_path, text_corpus) -> None:
    text = tiny_config(text_corpus, tmp_path / "runs", run__rounds="1")
    credentials = enroll(tmp_path / "deploy", SITES[:2])
    c = cluster(text, ["deploy.join_timeout=30"])
    c.start_server()
    # A token that was never issued.
    good = Credentials.load(credentials["site0"])
    forged = tmp_path / "forged.json"
    Credentials(site="site0", ca_pem=good.ca_pem, token="cfd_" + "A" * 43).save(forged)
    assert c.start_client("site0", forged, text_corpus).wait(60) == 2
    assert "refused" in c.log("site0")
    # Plaintext to the TLS port: the handshake never completes.
    with grpc.insecure_channel(f"127.0.0.1:{c.port}") as channel:
        with pytest.raises(grpc.RpcError) as error:
            pb_grpc.FederationStub(channel).Join(
                pb.JoinRequest(version=wire.VERSION, site="site0"), timeout=5
            )
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    # A site's credentials cannot join as another site.
    with grpc.secure_channel(f"localhost:{c.port}", good.channel_credentials()) as channel:
        with pytest.raises(grpc.RpcError) as error:
            pb_grpc.FederationStub(channel).Join(
                pb.JoinRequest(version=wire.VERSION, site="site1"), metadata=good.call_metadata(), timeout=5
            )
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # A revoked site is refused from its next call.
    from confide.cli import main

    assert main(["enroll", "site1", "--revoke", "--dir", str(tmp_path / "deploy")]) == 0
    assert c.start_client("site1", credentials["site1"], text_corpus).wait(60) == 2
    assert "revoked" in c.log("site1")
    c.close()
    assert c.log("server").count("refused") >= 2  # each refusal is logged, without the token
    assert "cfd_AAAA" not in c.log("server")
