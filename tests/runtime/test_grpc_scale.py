"""Many sites on one server: every site connected at once, and each trains and evaluates in every round.

The short form (the issue's 200 sites) runs in `make test`; ``CONFIDE_FULL=1`` runs 1000, and
``CONFIDE_SCALE_SITES=N`` any number. The sites are hosted
by two `confide client` processes (several sites per process share one model and take turns, as in a
simulation); each site still has its own TLS connection (``--connection-per-site``), token, session and long
poll.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import LINES, tiny_config
from tests.runtime.grpc_harness import Cluster, many_sites, metrics, query

COUNT = int(os.environ.get("CONFIDE_SCALE_SITES", 1000 if os.environ.get("CONFIDE_FULL") else 200))
PROCESSES = 2


@pytest.mark.slow
def test_a_server_serves_many_connected_sites(tmp_path: Path) -> None:
    deploy, data = tmp_path / "deploy", tmp_path / "data"
    sites = many_sites(deploy, data, COUNT, LINES)
    text = tiny_config(
        data,
        tmp_path / "runs",
        model={"kind": "'gpt'", "layers": "1", "heads": "1", "width": "16", "dropout": "0.0"},
        run__rounds="2",
        server__sites_per_round=str(COUNT),
        client__max_steps="1",
        data__path="''",  # the server holds no data: each site gives its own with --data
    )
    (tmp_path / "run.toml").write_text(text)
    # The run starts only when all sites have joined (deploy.min_sites = 0): all are connected at once.
    c = Cluster(
        tmp_path, tmp_path / "run.toml", deploy, ["deploy.heartbeat_seconds=2", "deploy.heartbeat_timeout=60"]
    )
    try:
        c.start_server()
        for p in range(PROCESSES):
            group = sites[p::PROCESSES]
            args = ["client", "--server", f"localhost:{c.port}", "--data", str(data)]
            args += ["--credentials", str(deploy / "credentials"), "--threads", "1", "--connection-per-site"]
            for site in group:
                args += ["--site", site]
            c.clients[f"group{p}"] = c._spawn(f"group{p}", args)
        assert c.wait_server(timeout=600) == 0, c.log("server")
        assert set(c.wait_clients().values()) == {0}, c.log("group0")
        assert f"{COUNT // PROCESSES} of {COUNT // PROCESSES} sites: the run is finished" in c.log("group0")
        run_dir = tmp_path / "runs" / "tiny"
        assert [m["round"] for m in metrics(run_dir)] == [1, 2]
        # Every site sent an update in each round, and was evaluated.
        assert metrics(run_dir)[-1]["eval_sites"] == COUNT
        assert query(run_dir, "SELECT kind, message FROM events WHERE kind IN ('dropped', 'failed')") == []
        (count,) = query(run_dir, "SELECT COUNT(*) FROM sites")[0]
        assert count == COUNT
    finally:
        c.close()
