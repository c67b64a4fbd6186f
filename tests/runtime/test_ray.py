"""The Ray backend against the local one: the same metrics from a seeded run (plain, with secure aggregation,
with site state across rounds and a resume, FedBuff), a killed worker as dropped sites, and clear errors for
bad options. One small Ray (two CPUs) serves the whole module."""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from confide import config
from confide.errors import ConfigError
from confide.runtime.federation import RoundResult
from confide.runtime.ray import WORKER_NICENESS
from confide.runtime.runner import NullObserver, Runner
from tests.conftest import tiny_config

ray = pytest.importorskip("ray")

KEYS = ("round", "loss", "accuracy", "train_loss", "bytes_sent", "bytes_received", "clock_seconds")
LSTM = {"kind": "'lstm'", "hidden": "16"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """One local Ray for the module, started as a user's script would before making runs."""
    os.environ.setdefault(WORKER_NICENESS, "0")  # as the backend does when it starts Ray itself
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=150 * 2**20, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def path(tmp_path: Path, text_corpus: Path) -> Path:
    """The tiny config with a tiny LSTM over the six sites, three rounds."""
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_config(text_corpus, tmp_path / "runs", model=LSTM))
    return path


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def start(path: Path, kind: str, *overrides: str) -> Runner:
    return Runner.start(config.load(path, [f"run.name={kind}", f"backend.kind={kind}", *overrides]))


def run(path: Path, kind: str, *overrides: str) -> list[dict[str, Any]]:
    runner = start(path, kind, "run.rounds=3", *overrides)
    try:
        runner.run()
    finally:
        runner.close()
    return metrics(runner.store.run_dir)


def assert_same(
    local: list[dict[str, Any]], on_ray: list[dict[str, Any]], keys: tuple[str, ...] = KEYS
) -> None:
    assert len(local) == len(on_ray) == 3
    for a, b in zip(local, on_ray, strict=True):
        for key in keys:
            if a[key] is None:  # metrics.jsonl writes what is not known (NaN) as null
                assert b[key] is None, (a["round"], key)
            else:
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (a["round"], key)


def test_a_seeded_run_gives_the_metrics_of_the_local_backend(cluster: None, path: Path) -> None:
    options = ("server.sites_per_round=4", "backend.dropout=0.2", "backend.speed_sigma=0.5")
    local = run(path, "local", *options)
    on_ray = run(path, "ray", *options)
    assert_same(local, on_ray, (*KEYS, "site_loss_mean", "eval_sites"))
    assert len({r["loss"] for r in on_ray}) == 3  # the model moved


def test_secure_aggregation_runs_its_exchanges_over_ray(cluster: None, path: Path) -> None:
    options = ("privacy.secure_aggregation=true", "server.sites_per_round=5", "backend.dropout=0.2")
    local = run(path, "local", *options)
    on_ray = run(path, "ray", *options)
    assert_same(local, on_ray)
    assert all(r["site_accuracy_mean"] is None for r in on_ray)  # null (NaN): hidden per site


class Crash(Exception):
    pass


class CrashIn(NullObserver):
    """Kills the run after the first site of round ``round`` trained."""

    def __init__(self, round: int) -> None:
        self.round = round

    def site_done(self, round: int, site: str) -> None:
        if round == self.round:
            raise Crash


def test_site_state_lives_in_the_run_store_across_rounds_and_a_resume(cluster: None, path: Path) -> None:
    # SCAFFOLD's control variates and Ditto's personal models, written by the workers, read back by others.
    options = (
        "server.strategy=scaffold",
        "client.optimizer=sgd",
        "client.learning_rate=0.5",
        "client.personalization=ditto",
    )
    local = run(path, "local", *options)
    killed = start(path, "ray", "run.rounds=3", "backend.workers=1", *options)
    try:
        with pytest.raises(Crash):
            killed.run(CrashIn(3))  # after checkpoint 2; round 3's state already written must be rewound
    finally:
        killed.close()  # the cluster's workers are gone: the resumed run has new ones
    resumed = Runner.resume(killed.store.run_dir)
    try:
        assert resumed.state.round == 2
        resumed.run()
    finally:
        resumed.close()
    personal = ("personal_loss", "personal_accuracy", "personalized_sites")
    assert_same(local, metrics(killed.store.run_dir), (*KEYS[:-1], *personal))
    db = sqlite3.connect(killed.store.run_dir / "run.sqlite")
    keys = {key for (key,) in db.execute("SELECT DISTINCT key FROM site_state")}
    assert any("ditto" in key for key in keys) and len(keys) >= 2, keys


class Killer(NullObserver):
    """Kills one Ray worker as each of ``rounds`` starts (before its sites get their work), with ray.kill or
    its process with SIGKILL; remembers each round's participants."""

    def __init__(self, runner: Runner, rounds: dict[int, str]) -> None:
        self.backend: Any = runner.backend
        self.rounds = rounds
        self.killed: dict[int, list[str]] = {}
        self.participants: dict[int, list[str]] = {}
        self.round = 0

    def round_started(self, round: int, sites: Any) -> None:
        how = self.rounds.get(round)
        if how is None:
            return
        index = round % len(self.backend.workers)
        worker = self.backend.workers[index]
        self.killed[round] = [s for s in sites if self.backend.worker_of(s) == index]
        if how == "ray.kill":
            ray.kill(worker, no_restart=True)
        else:
            os.kill(ray.get(worker.pid.remote()), signal.SIGKILL)

    def round_finished(self, result: RoundResult) -> None:
        self.participants[result.round] = result.participants


def test_a_killed_worker_drops_its_sites_for_the_round_and_is_replaced(
    cluster: None, path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runner = start(path, "ray", "run.rounds=2", "server.sites_per_round=6")
    killer = Killer(runner, {1: "ray.kill", 2: "SIGKILL"})
    try:
        with caplog.at_level(logging.WARNING, logger="confide.runtime.ray"):
            runner.run(killer)
    finally:
        runner.close()
    db = sqlite3.connect(runner.store.run_dir / "run.sqlite")
    assert db.execute("SELECT value FROM meta WHERE key = 'status'").fetchone() == ("finished",)
    assert runner.state.round == 2
    everyone = set(runner.backend.sites())
    for round in (1, 2):
        assert killer.killed[round], "each worker plays some of the six sites"
        assert set(killer.participants[round]) == everyone - set(killer.killed[round])
    # Round 2's participants include the sites of the worker killed in round 1: its replacement plays them.
    assert set(killer.killed[1]) <= set(killer.participants[2])
    assert "died" in caplog.text and "dropped" in caplog.text
    rows = metrics(runner.store.run_dir)
    assert [r["round"] for r in rows] == [1, 2] and all(r["loss"] == r["loss"] for r in rows)
    assert rows[0]["eval_sites"] == 6  # the evaluation after round 1 reached every site


def test_fedbuff_runs_on_ray_as_it_runs_locally(cluster: None, path: Path) -> None:
    options = ("server.strategy=fedbuff", "server.sites_per_round=2", "backend.speed_sigma=0.5")
    local = run(path, "local", *options)
    on_ray = run(path, "ray", "backend.workers=1", *options)
    assert_same(local, on_ray)
    assert on_ray[-1]["clock_seconds"] > 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("backend.address='10.0.0.5:6379'",), r"backend.address = .* option of the Ray backend, but "),
        (("backend.num_gpus=1",), r"set backend.kind = 'ray'"),
        (("backend.kind=ray", "backend.num_cpus=0"), r"backend.num_cpus must be > 0 \(got 0"),
        (("backend.kind=ray", "backend.workers=-1"), r"backend.workers must be >= 0"),
        (("backend.kind=ray", "privacy.encryption=ckks"), r"cannot run with privacy.encryption = 'ckks' yet"),
        (("backend.kind=rai",), r"did you mean 'ray'"),
    ],
)
def test_bad_options_are_refused_with_what_to_do(
    path: Path, overrides: tuple[str, ...], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        config.load(path, list(overrides))


def test_without_ray_installed_the_error_says_how_to_install_it(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from confide.runtime.ray import import_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # what Python does for a package that is not there
    with pytest.raises(ConfigError, match=r"pip install 'confide\[ray\]'"):
        config.load(path, ["backend.kind=ray"])
    with pytest.raises(ConfigError, match=r"pip install 'confide\[ray\]'"):
        import_ray()


def test_more_cpus_per_worker_than_the_cluster_has_is_refused(cluster: None, path: Path) -> None:
    with pytest.raises(ConfigError, match=r"backend.num_cpus = 3 is more than the Ray cluster's 2 CPUs"):
        start(path, "ray", "backend.num_cpus=3")
