"""Real `confide server` and `confide client` processes on 127.0.0.1, for the deployment tests."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from confide.cli import main

FAST = [
    "deploy.heartbeat_seconds=0.3",
    "deploy.heartbeat_timeout=30",
    "deploy.retry_wait=0.5",
    "deploy.join_timeout=600",
]
"""Deadlines short enough for tests, yet long enough that a site slowed by a loaded machine is not dropped
(the recovery tests, which kill sites on purpose, shorten the heartbeat timeout further)."""


def enroll(
    directory: Path, sites: list[str], certificate: bool = False, identity: bool = False
) -> dict[str, Path]:
    """A development CA and server certificate in ``directory``, and a credentials file per site. With
    ``certificate`` (mTLS) or ``identity`` (a token, and an identity key for authenticated secure
    aggregation) each site makes its own keys (``confide keys``) and the server signs its request."""
    if not (directory / "server.pem").exists():
        assert main(["certs", "--dir", str(directory)]) == 0
    files = {}
    for site in sites:
        home = directory.parent / f"site-{site}"
        out = home / f"{site}.json"
        args = ["enroll", site, "--dir", str(directory), "--out", str(out)]
        if certificate or identity:
            assert main(["keys", site, "--dir", str(home)]) == 0
            args += ["--csr", str(home / f"{site}.csr"), "--auth", "mtls" if certificate else "token"]
        else:
            home.mkdir(parents=True, exist_ok=True)
        assert main(args) == 0
        files[site] = out
    return files


class Cluster:
    """A server process and client processes; everything is killed at the end of the test."""

    def __init__(self, tmp: Path, config: Path, directory: Path, overrides: list[str] | None = None) -> None:
        self.tmp = tmp
        self.config = config
        self.directory = directory
        self.overrides = [*FAST, *(overrides or [])]
        self.server: subprocess.Popen[bytes] | None = None
        self.clients: dict[str, subprocess.Popen[bytes]] = {}
        self.port = 0
        self.logs = tmp / "logs"
        self.logs.mkdir(exist_ok=True)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 (the process owns it)
        return subprocess.Popen(
            [sys.executable, "-m", "confide", *args], stdout=log, stderr=subprocess.STDOUT, env=self.env
        )

    def start_server(self, port: int = 0, timeout: float = 60, extra: Sequence[str] = ()) -> int:
        ready = self.tmp / "ready"
        ready.unlink(missing_ok=True)
        args = ["server", "--config", str(self.config), "--listen", f"127.0.0.1:{port}"]
        args += ["--dir", str(self.directory), "--ready-file", str(ready), "--no-report", *extra]
        for item in self.overrides:
            args += ["--set", item]
        self.server = self._spawn("server", args)
        end = time.monotonic() + timeout
        while not ready.exists() or not ready.read_text():
            if self.server.poll() is not None:
                raise AssertionError(
                    f"the server exited with {self.server.returncode}:\n{self.log('server')}"
                )
            if time.monotonic() > end:
                raise AssertionError(f"the server did not listen within {timeout} s:\n{self.log('server')}")
            time.sleep(0.05)
        self.port = int(ready.read_text())
        return self.port

    def start_client(self, site: str, credentials: Path, data: Path, *extra: str) -> subprocess.Popen[bytes]:
        args = ["client", "--server", f"localhost:{self.port}", "--site", site, "--data", str(data)]
        args += ["--credentials", str(credentials), "--threads", "1", *extra]
        process = self._spawn(site, args)
        self.clients[site] = process
        return process

    def wait_server(self, timeout: float = 240) -> int:
        assert self.server is not None
        try:
            return self.server.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the server did not finish in {timeout} s:\n{self.log('server')}") from None

    def wait_clients(self, timeout: float = 60) -> dict[str, int]:
        return {site: p.wait(timeout) for site, p in self.clients.items()}

    def kill_server(self) -> None:
        assert self.server is not None
        self.server.send_signal(signal.SIGKILL)
        self.server.wait(10)

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def close(self) -> None:
        for process in [self.server, *self.clients.values()]:
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(10)


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def query(run_dir: Path, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows of the run store of a running server, read through a connection of our own (the server may be
    writing; WAL lets us read at the same time)."""
    path = run_dir / "run.sqlite"
    if not path.exists():
        return []
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return list(connection.execute(sql, args))
    except sqlite3.OperationalError:
        return []  # the schema is not written yet
    finally:
        connection.close()


def wait_for(condition: Callable[[], Any], what: str, cluster: Cluster, timeout: float = 120) -> Any:
    """Poll ``condition`` until it is true; fail with the server's log if it is not within ``timeout``."""
    end = time.monotonic() + timeout
    while not (value := condition()):
        if cluster.server is not None and cluster.server.poll() is not None:
            raise AssertionError(f"the server exited while waiting for {what}:\n{cluster.log('server')}")
        if time.monotonic() > end:
            raise AssertionError(f"no {what} within {timeout} s:\n{cluster.log('server')}")
        time.sleep(0.05)
    return value


def many_sites(directory: Path, data: Path, count: int, lines: list[str]) -> list[str]:
    """``count`` enrolled sites with a small text each in ``data`` and their credentials as
    ``directory/credentials/SITE.json`` (quicker than ``count`` `confide enroll` commands)."""
    from confide.runtime.grpc.security import create_certificates, issue_site_credentials

    create_certificates(directory, ["localhost", "127.0.0.1"])
    data.mkdir(parents=True, exist_ok=True)
    (directory / "credentials").mkdir()
    sites = [f"site{i:04d}" for i in range(count)]
    for i, site in enumerate(sites):
        text = "\n".join(lines[(i + j) % len(lines)] for j in range(8)) + "\n"
        (data / f"{site}.txt").write_text(text)
        issue_site_credentials(directory, site).save(directory / "credentials" / f"{site}.json")
    return sites
