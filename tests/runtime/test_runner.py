"""Whole runs on a tiny corpus: determinism, resume after a kill, and the store's contents."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from confide import config
from confide.errors import DivergedError, StoreError
from confide.runtime.runner import NullObserver, Runner
from tests.conftest import tiny_config

KEYS = (
    "loss",
    "accuracy",
    "perplexity",
    "site_accuracy_p10",
    "site_loss_mean",
    "bytes_sent",
    "bytes_received",
)


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def comparable(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Everything but wall-clock timings, which differ between any two runs."""
    return [(r["round"], *(r[k] for k in KEYS)) for r in rows]


class Crash(Exception):
    pass


class CrashAfter(NullObserver):
    """Kills the run in the middle of a round: after ``site`` sites of round ``round`` trained."""

    def __init__(self, round: int, site: int) -> None:
        self.round, self.site, self.seen = round, site, 0

    def site_done(self, round: int, site: str) -> None:
        if round == self.round:
            self.seen += 1
            if self.seen == self.site:
                raise Crash


def run(path: Path, *overrides: str) -> Runner:
    runner = Runner.start(config.load(path, list(overrides)))
    runner.run()
    runner.store.close()
    return runner


def test_run_writes_the_store(tiny_config_path: Path) -> None:
    runner = run(tiny_config_path)
    run_dir = runner.store.run_dir
    rows = metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and 0 <= r["accuracy"] <= 1 for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]  # it learns
    assert rows[0]["perplexity"] == pytest.approx(np.exp(rows[0]["loss"]))
    weights = runner.state.weights.nbytes
    # Per round: the weights go to 3 training sites and to the 6 evaluating sites.
    assert rows[0]["bytes_sent"] >= 9 * weights and rows[0]["bytes_received"] >= 3 * weights
    assert rows[-1]["total_bytes_sent"] == sum(r["bytes_sent"] for r in rows)
    db = sqlite3.connect(run_dir / "run.sqlite")
    assert db.execute("SELECT COUNT(*) FROM rounds").fetchone()[0] == 4
    assert db.execute("SELECT COUNT(*) FROM sites").fetchone()[0] == 6
    assert db.execute("SELECT COUNT(*) FROM site_metrics WHERE round = 4").fetchone()[0] == 6
    assert [r[0] for r in db.execute("SELECT round FROM checkpoints ORDER BY round")] == [2, 4]
    assert config.load(run_dir / "config.toml") == config.load(tiny_config_path)


def test_same_seed_same_metrics_other_seed_other_metrics(tiny_config_path: Path) -> None:
    a = metrics(run(tiny_config_path, "run.name=a").store.run_dir)
    b = metrics(run(tiny_config_path, "run.name=b").store.run_dir)
    c = metrics(run(tiny_config_path, "run.name=c", "run.seed=8").store.run_dir)
    assert comparable(a) == comparable(b)
    assert comparable(a) != comparable(c)


@pytest.mark.parametrize(("crash_round", "crash_site"), [(1, 2), (3, 1), (4, 3)])
def test_resume_after_a_kill_gives_identical_metrics(
    tiny_config_path: Path, crash_round: int, crash_site: int
) -> None:
    reference = metrics(run(tiny_config_path, "run.name=whole").store.run_dir)

    runner = Runner.start(config.load(tiny_config_path, ["run.name=killed"]))
    with pytest.raises(Crash):
        runner.run(CrashAfter(crash_round, crash_site))
    runner.store.close()
    run_dir = runner.store.run_dir

    resumed = Runner.resume(run_dir)
    assert resumed.state.round == (crash_round - 1) // 2 * 2  # the last checkpoint before the crash
    resumed.run()
    resumed.store.close()
    assert comparable(metrics(run_dir)) == comparable(reference)
    db = sqlite3.connect(run_dir / "run.sqlite")
    assert db.execute("SELECT COUNT(*) FROM metrics").fetchone()[0] == 4
    assert db.execute("SELECT COUNT(*) FROM events WHERE kind = 'resume'").fetchone()[0] == 1


def test_resume_of_a_finished_run_changes_nothing(tiny_config_path: Path) -> None:
    run_dir = run(tiny_config_path).store.run_dir
    before = (run_dir / "metrics.jsonl").read_text()
    runner = Runner.resume(run_dir)
    runner.run()
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_existing_run_dir_and_missing_run_dir_are_clear_errors(
    tiny_config_path: Path, tmp_path: Path
) -> None:
    run(tiny_config_path)
    with pytest.raises(StoreError, match="already exists and is not empty; continue it with"):
        Runner.start(config.load(tiny_config_path))
    with pytest.raises(StoreError, match="is not a confide run directory"):
        Runner.resume(tmp_path / "nowhere")


def test_lstm_and_server_optimizers_run(tmp_path: Path, text_corpus: Path) -> None:
    path = tmp_path / "lstm.toml"
    path.write_text(tiny_config(text_corpus, tmp_path / "runs", model={"kind": "'lstm'", "hidden": "16"}))
    for optimizer in ("sgd", "momentum", "yogi", "adagrad"):
        rows = metrics(
            run(
                path,
                f"run.name=lstm-{optimizer}",
                "run.rounds=2",
                f"server.optimizer={optimizer}",
                "client.optimizer=sgd",
                "client.learning_rate=0.5",
            ).store.run_dir
        )
        assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)


def test_divergence_stops_the_run_with_advice(tiny_config_path: Path) -> None:
    overrides = ["server.optimizer=sgd", "server.learning_rate=1e30"]
    runner = Runner.start(config.load(tiny_config_path, overrides))
    with pytest.raises(DivergedError, match=r"diverged: after round 1 .* lower client\.learning_rate"):
        runner.run()
    assert [e[2] for e in runner.store.events()] == ["start", "diverged"]
    assert runner.store.evaluations() == []  # nothing half-recorded
