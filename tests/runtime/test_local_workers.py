"""The local backend's worker processes (``backend.workers``): a seeded run gives the same metrics.jsonl and
checkpoints, byte for byte, with 1, 2 and 4 workers (secure aggregation with distributed DP, Ditto's
personal models, simulated dropouts and the virtual clock; SCAFFOLD's state in the run store; FedBuff's
asynchronous rounds); a worker killed in a round costs its sites that round and is replaced; a stopped one is
waited for; and how many workers a run gets."""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from confide import config
from confide.errors import ConfigError
from confide.runtime import pool
from confide.runtime.federation import RoundResult
from confide.runtime.pool import SitePool, resolve_workers
from confide.runtime.runner import NullObserver, Runner
from tests.conftest import tiny_config

LSTM = {"kind": "'lstm'", "hidden": "16"}


@pytest.fixture
def path(tmp_path: Path, text_corpus: Path) -> Path:
    """The tiny config with a tiny LSTM over the six sites."""
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_config(text_corpus, tmp_path / "runs", model=LSTM))
    return path


def start(path: Path, workers: int, *overrides: str) -> Runner:
    return Runner.start(
        config.load(path, [f"run.name=workers-{workers}", f"backend.workers={workers}", *overrides])
    )


def run(path: Path, workers: int, *overrides: str) -> Path:
    runner = start(path, workers, "run.rounds=3", *overrides)
    try:
        runner.run()
    finally:
        runner.close()
    return runner.store.run_dir


def measured(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl without what the wall clock measured (the virtual clock's seconds stay)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k == "clock_seconds" or "seconds" not in k} for row in rows]


def checkpoints(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "checkpoints").iterdir())}


SECURE = (
    "privacy.secure_aggregation=true",
    "privacy.dp=distributed",
    "privacy.noise_multiplier=0.5",
    "privacy.insecure_reproducible_noise=true",  # seeded noise: a repeat adds the same noise
    "client.personalization=ditto",
    "client.optimizer=sgd",
    "client.learning_rate=0.5",
    "server.sites_per_round=5",
    "backend.dropout=0.2",
    "backend.speed_sigma=0.5",
)


@pytest.mark.parametrize(
    ("options", "counts"),
    [
        (SECURE, (1, 2, 4)),
        (("server.strategy=scaffold", "client.optimizer=sgd", "client.learning_rate=0.5"), (1, 2)),
        (("server.strategy=fedbuff", "server.sites_per_round=2", "backend.speed_sigma=0.5"), (1, 2)),
    ],
    ids=["secure-dp-ditto-dropout", "scaffold", "fedbuff"],
)
def test_a_seeded_run_gives_the_same_metrics_and_checkpoints_whatever_the_workers(
    path: Path, options: tuple[str, ...], counts: tuple[int, ...]
) -> None:
    runs = {workers: run(path, workers, *options) for workers in counts}
    one = runs[1]
    rows = measured(one)
    assert len(rows) == 3 and len({r["loss"] for r in rows}) == 3  # the model moved
    if options is SECURE:
        assert rows[-1]["personal_loss"] is not None  # Ditto's personal models evaluated
        assert all(r["site_accuracy_mean"] is None for r in rows)  # null (NaN): only sums seen
    for workers, run_dir in runs.items():
        assert measured(run_dir) == rows, workers
        assert checkpoints(run_dir) == checkpoints(one), workers
    if "server.strategy=scaffold" in options:
        db = sqlite3.connect(runs[2] / "run.sqlite")
        keys = {key for (key,) in db.execute("SELECT DISTINCT key FROM site_state")}
        assert keys, "the workers wrote SCAFFOLD's control variates to the run store"


class Stopper(NullObserver):
    """Freezes worker 1 (SIGSTOP) as round ``round`` starts; at that round's first update, kills it
    (SIGKILL) or lets it go on (SIGCONT) after a second. Remembers each round's sites and participants."""

    def __init__(self, runner: Runner, round: int, kill: bool) -> None:
        self.pool: SitePool = runner.backend.pool  # type: ignore[attr-defined]
        self.round, self.kill = round, kill
        self.frozen = 0
        self.sites: dict[int, list[str]] = {}
        self.participants: dict[int, list[str]] = {}

    def round_started(self, round: int, sites: Sequence[str]) -> None:
        self.sites[round] = list(sites)
        if round == self.round:
            self.frozen = self.pool.pids()[1]
            os.kill(self.frozen, signal.SIGSTOP)

    def site_done(self, round: int, site: str) -> None:
        if round == self.round and self.frozen and site == self.sites[round][0]:
            if self.kill:
                os.kill(self.frozen, signal.SIGKILL)
            else:
                time.sleep(1.0)  # far longer than a tiny site's training: slow, not dead
                os.kill(self.frozen, signal.SIGCONT)

    def round_finished(self, result: RoundResult) -> None:
        self.participants[result.round] = result.participants


def test_a_worker_killed_in_a_round_drops_its_sites_and_is_replaced(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runner = start(path, 2, "run.rounds=3", "server.sites_per_round=6")
    assert "2 worker processes" in runner.backend.describe()  # type: ignore[attr-defined]
    stopper = Stopper(runner, round=2, kill=True)
    try:
        with caplog.at_level(logging.WARNING, logger="confide.runtime"):
            runner.run(stopper)
        pids = stopper.pool.pids()
    finally:
        runner.close()
    db = sqlite3.connect(runner.store.run_dir / "run.sqlite")
    assert db.execute("SELECT value FROM meta WHERE key = 'status'").fetchone() == ("finished",)
    everyone = stopper.sites[2]
    # The first two tasks went to worker 0, the next two to the frozen worker 1, killed when the first
    # update was in: its two sites sent nothing; worker 0 trained the last two.
    assert set(stopper.participants[2]) == set(everyone) - set(everyone[2:4])
    assert set(stopper.participants[1]) == set(stopper.participants[3]) == set(everyone)
    assert stopper.frozen not in pids and all(pids)  # a new worker 1 took its place
    assert "died (killed by signal 9)" in caplog.text and "sends no update in round 2" in caplog.text
    assert [r["round"] for r in measured(runner.store.run_dir)] == [1, 2, 3]


def test_secure_aggregation_goes_on_without_the_sites_of_a_worker_killed_in_its_key_exchange(
    path: Path,
) -> None:
    # Three workers of two sites each: the four sites left are enough to unmask (a majority of five).
    runner = start(path, 3, "run.rounds=3", "server.sites_per_round=6", "privacy.secure_aggregation=true")

    class KillInExchange(Stopper):
        def round_started(self, round: int, sites: Sequence[str]) -> None:
            super().round_started(round, sites)
            if round == self.round:
                # Killed once the key exchange waits on it (it is frozen: it cannot answer).
                def kill() -> None:
                    while not self.pool.pending(1):
                        time.sleep(0.01)
                    os.kill(self.frozen, signal.SIGKILL)

                threading.Thread(target=kill, daemon=True).start()

        def site_done(self, round: int, site: str) -> None:
            pass

    stopper = KillInExchange(runner, round=2, kill=True)
    try:
        runner.run(stopper)
    finally:
        runner.close()
    everyone = set(stopper.sites[2])
    assert len(stopper.participants[2]) == 4  # unmasked without the killed worker's two sites
    assert set(stopper.participants[3]) == everyone
    rows = measured(runner.store.run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3] and all(r["loss"] == r["loss"] for r in rows)


def test_a_stopped_worker_is_waited_for_not_taken_for_dead(path: Path) -> None:
    runner = start(path, 2, "run.rounds=2", "server.sites_per_round=6")
    stopper = Stopper(runner, round=2, kill=False)
    try:
        runner.run(stopper)
        pids = stopper.pool.pids()
    finally:
        runner.close()
    assert set(stopper.participants[2]) == set(stopper.sites[2])
    assert stopper.frozen in pids


def test_how_many_workers_a_run_gets(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool, "cores", lambda: 8)
    monkeypatch.delenv("CONFIDE_WORKERS", raising=False)

    def workers(*overrides: str) -> int:
        return resolve_workers(config.load(path, list(overrides)), 6)

    assert workers() == 3  # the cores, but no more than a round's sites (the tiny config asks 3)
    assert workers("server.sites_per_round=6") == 6
    assert workers("server.sites_per_round=20") == 6
    assert workers("backend.workers=2") == 2
    monkeypatch.setenv("CONFIDE_WORKERS", "1")
    assert workers() == 1
    assert workers("backend.workers=4") == 4  # the config's own number wins
    assert workers("attack.kind=sign_flip", "attack.sites=2", "attack.collude=true") == 1
    monkeypatch.setenv("CONFIDE_WORKERS", "two")
    with pytest.raises(ConfigError, match=r"CONFIDE_WORKERS = 'two' must be a whole number"):
        workers()
    with pytest.raises(ConfigError, match=r"runs every site in one process; set backend.workers = 1"):
        config.load(path, ["backend.workers=2", "privacy.encryption=ckks"])
    assert pool.worker_threads(4, 2) == 4 and pool.worker_threads(4, 4) == 2  # at most the cores in all
    assert pool.worker_threads(0, 3) == 1
