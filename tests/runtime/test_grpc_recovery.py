"""A deployment survives its processes dying: real `confide server` and `confide client` processes on
127.0.0.1, killed with SIGKILL (no chance to say goodbye) in the middle of a run."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import numpy as np

from tests.conftest import tiny_config
from tests.runtime.grpc_harness import enroll, metrics, query, wait_for
from tests.runtime.test_grpc_deploy import local_metrics

SITES = [f"site{i}" for i in range(6)]
QUICK_DROP = ["deploy.heartbeat_timeout=12"]
"""A killed site is noticed after 12 s of silence (a live site on a loaded machine has gone 4 s between
heartbeats: too close to a shorter timeout)."""


def events(run_dir: Path, kind: str) -> list[str]:
    return [m for (m,) in query(run_dir, "SELECT message FROM events WHERE kind = ? ORDER BY id", (kind,))]


def finished_rounds(run_dir: Path) -> list[int]:
    return [r for (r,) in query(run_dir, "SELECT round FROM rounds ORDER BY round")]


def work_done(log: str) -> int:
    """The pieces of work a client process did, from its last line."""
    found = re.findall(r"\((\d+) pieces of work done\)", log)
    assert found, log
    return int(found[-1])


def test_killed_sites_are_dropped_the_round_is_retried_and_they_rejoin(
    cluster, tmp_path, text_corpus
) -> None:
    # Every site trains every round; a round needs 5 of the 6 updates.
    text = tiny_config(text_corpus, tmp_path / "runs", run__rounds="6", server__sites_per_round="6")
    run_dir = tmp_path / "runs" / "tiny"
    credentials = enroll(tmp_path / "deploy", SITES)
    c = cluster(text, [*QUICK_DROP, "deploy.min_updates=5", "deploy.round_retries=200"])
    c.start_server()
    for site in SITES:
        c.start_client(site, credentials[site], text_corpus)

    # Kill site5 once the run is under way: it is dropped, and the round completes with the other five (the
    # drop is written to the store when the round it happened in is done).
    wait_for(lambda: finished_rounds(run_dir), "first round", c)
    c.clients["site5"].send_signal(signal.SIGKILL)
    wait_for(lambda: "site5" in " ".join(events(run_dir, "dropped")), "site5 dropped", c)
    # Kill site4 too: 4 updates are too few, so the round is not applied but retried.
    c.clients["site4"].send_signal(signal.SIGKILL)
    retried = wait_for(lambda: events(run_dir, "retry"), "retried round", c)
    assert "only 4 of 6 sites sent an update" in retried[0]
    # Both come back (new processes, same credentials): they rejoin, and the run goes on.
    for site in ("site4", "site5"):
        c.clients[site].wait(10)
        c.start_client(site, credentials[site], text_corpus)

    assert c.wait_server() == 0, c.log("server")
    assert set(c.wait_clients().values()) == {0}, c.log("site4") + c.log("site5")
    assert finished_rounds(run_dir) == [1, 2, 3, 4, 5, 6]
    assert [m["round"] for m in metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert "site4" in " ".join(events(run_dir, "dropped"))
    for site in ("site4", "site5"):
        log = c.log(site)
        assert log.count(f"site {site} joined run tiny") == 2 and "the run is finished" in log, log
        assert work_done(log) > 0, log  # the new process took part


def test_a_killed_server_restarts_where_it_was_with_its_privacy_ledger(
    cluster, tmp_path, text_corpus
) -> None:
    text = tiny_config(
        text_corpus,
        tmp_path / "runs",
        run__rounds="5",
        privacy__dp="'central'",
        privacy__noise_multiplier="0.8",
        privacy__clip_norm="0.5",
    )
    run_dir = tmp_path / "runs" / "tiny"
    credentials = enroll(tmp_path / "deploy", SITES)
    c = cluster(text)
    port = c.start_server()
    for site in SITES:
        c.start_client(site, credentials[site], text_corpus)

    # Kill the server once round 2 is checkpointed (round 3 may be in flight, and its spend recorded).
    wait_for(lambda: query(run_dir, "SELECT round FROM checkpoints WHERE round >= 2"), "checkpoint 2", c)
    c.kill_server()
    assert all(p.poll() is None for p in c.clients.values())  # the sites wait for it to come back
    # The same command on the same port: it resumes the run, and the sites rejoin by themselves.
    assert c.start_server(port) == port
    assert c.wait_server() == 0, c.log("server")
    assert set(c.wait_clients().values()) == {0}, c.log("site0")

    assert "Resuming" in c.log("server")
    assert events(run_dir, "resume")
    assert "forgot this session" in c.log("site0") or "server unreachable" in c.log("site0")
    # Nothing released is forgotten: every round is charged, and a round released before the kill and redone
    # after it (with fresh, secret noise: a second release) is charged again, so the run spends at least
    # what an uninterrupted one does. The noise and the central-DP sample are secret, so the metrics are
    # not a seeded simulation's.
    charged = [r for (r,) in query(run_dir, "SELECT round FROM privacy_ledger ORDER BY charge")]
    assert sorted(set(charged)) == [1, 2, 3, 4, 5] and charged[:2] == [1, 2]
    deployed = metrics(run_dir)
    local = local_metrics(text, tmp_path)
    assert [m["round"] for m in deployed] == [m["round"] for m in local]
    assert all(np.isfinite(m["loss"]) for m in deployed)
    assert deployed[-1]["epsilon"] >= local[-1]["epsilon"] * (1 - 1e-12)
    assert (len(charged) > 5) == (deployed[-1]["epsilon"] > local[-1]["epsilon"] * (1 + 1e-9))
