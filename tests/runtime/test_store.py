"""The run store on real SQLite and safetensors files: what a run writes, what a resumed run finds again."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from confide.errors import StoreError
from confide.runtime.store import SCHEMA_VERSION, Store, StoreSiteState

CONFIG = "[run]\nname = 'x'\nrounds = 5\n"


def _vector(seed: int, size: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(size).astype(np.float32)


def _metrics(round: int) -> dict[str, float]:
    return {"round": round, "loss": 3.0 / round, "accuracy": 0.1 * round}


def _fill(store: Store, rounds: int) -> None:
    """``rounds`` rounds with an evaluation, site metrics and a site's state in every one."""
    store.add_sites([("a", "g1", 10, 2), ("b", "g2", 20, 4)])
    for r in range(1, rounds + 1):
        store.record_round(r, ["a", "b"], 30, 1.0 / r, 100 * r, 200 * r, 0.5)
        store.record_evaluation(
            r, _metrics(r), [("a", 1.0, 0.5, 2), ("b", 2.0, 0.25, 4)], [("a", 0.5, 0.75, 2)]
        )
        store.put_site_state("a", "control", r, np.full(3, r, dtype=np.float32))


def test_create_writes_the_run_directory(tmp_path: Path) -> None:
    store = Store.create(tmp_path / "run", CONFIG)
    assert (tmp_path / "run" / "config.toml").read_text() == CONFIG
    assert (tmp_path / "run" / "checkpoints").is_dir() and (tmp_path / "run" / "run.sqlite").is_file()
    assert store.meta("schema_version") == str(SCHEMA_VERSION) and store.meta("created") is not None
    assert store.meta("status") is None
    store.set_meta("status", "running")
    store.set_meta("status", "finished")
    assert store.meta("status") == "finished"
    assert store.rounds() == [] and store.evaluations() == [] and store.latest_checkpoint() is None
    store.close()
    with pytest.raises(StoreError, match=r"already exists and is not empty; continue it with `confide run"):
        Store.create(tmp_path / "run", CONFIG)


def test_open_refuses_what_is_not_a_run_directory(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="is not a confide run directory"):
        Store.open(tmp_path)
    Store.create(tmp_path / "run", CONFIG).close()
    (tmp_path / "run" / "config.toml").unlink()
    with pytest.raises(StoreError, match=r"it needs config.toml and run.sqlite"):
        Store.open(tmp_path / "run")


def test_open_refuses_another_schema(tmp_path: Path) -> None:
    store = Store.create(tmp_path / "run", CONFIG)
    store.set_meta("schema_version", str(SCHEMA_VERSION + 1))
    store.close()
    with pytest.raises(StoreError, match=f"has store schema {SCHEMA_VERSION + 1}; this confide reads schema"):
        Store.open(tmp_path / "run")


def test_rounds_evaluations_and_site_metrics_read_back(tmp_path: Path) -> None:
    store = Store.create(tmp_path / "run", CONFIG)
    _fill(store, 2)
    assert store.rounds()[1] == {
        "round": 2,
        "sites": ["a", "b"],
        "num_examples": 30,
        "train_loss": 0.5,
        "bytes_sent": 200,
        "bytes_received": 400,
        "seconds": 0.5,
    }
    assert store.evaluations() == [(1, _metrics(1)), (2, _metrics(2))]
    assert store.site_metrics(2) == [("a", 1.0, 0.5, 2), ("b", 2.0, 0.25, 4)]
    assert store.site_metrics(2, personal=True) == [("a", 0.5, 0.75, 2)]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [_metrics(1), _metrics(2)]
    store.event("retried", "round 2 had too few updates", 2)
    assert [(r, k, m) for _, r, k, m in store.events()] == [(2, "retried", "round 2 had too few updates")]


def _strict(constant: str) -> None:
    raise AssertionError(f"metrics.jsonl holds {constant}, which strict JSON parsers (jq, browsers) reject")


def test_metrics_jsonl_is_strict_json_with_null_for_what_is_not_a_number(tmp_path: Path) -> None:
    store = Store.create(tmp_path / "run", CONFIG)
    unknown = {"round": 1, "loss": 2.5, "unigram_accuracy": math.nan, "perplexity": math.inf}
    store.record_evaluation(1, unknown, [])
    store.record_evaluation(2, {**unknown, "round": 2}, [])
    (line, _) = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    row = json.loads(line, parse_constant=_strict)
    assert row == {"round": 1, "loss": 2.5, "unigram_accuracy": None, "perplexity": None}
    assert math.isnan(store.evaluations()[0][1]["unigram_accuracy"])  # the store keeps the float
    store.rewind(1)  # a resume rewrites the file from the store: strict too
    (line,) = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(line, parse_constant=_strict) == row


def test_checkpoints_hold_weights_optimizer_state_and_extras_exactly(tmp_path: Path) -> None:
    store = Store.create(tmp_path / "run", CONFIG)
    store.save_checkpoint(1, _vector(0), {"m": _vector(1)})
    path = store.save_checkpoint(2, _vector(2), {"m": _vector(3), "v": _vector(4)}, {"control": _vector(5)})
    assert path == tmp_path / "run" / "checkpoints" / "round-000002.safetensors"
    assert sorted(p.name for p in path.parent.iterdir()) == ["round-000001.safetensors", path.name]
    latest = store.latest_checkpoint()
    assert latest is not None and latest.round == 2
    np.testing.assert_array_equal(latest.weights, _vector(2))
    assert sorted(latest.optimizer_state) == ["m", "v"] and list(latest.extra) == ["control"]
    np.testing.assert_array_equal(latest.optimizer_state["v"], _vector(4))
    np.testing.assert_array_equal(latest.extra["control"], _vector(5))


def test_a_reopened_store_resumes_where_it_stopped(tmp_path: Path) -> None:
    store = Store.create(tmp_path / "run", CONFIG)
    _fill(store, 3)
    store.save_checkpoint(3, _vector(0), {"m": _vector(1)})
    store.record_spend(3, (1.1, "poisson", 0.1, 3), 0.9, 1e-5)
    store.close()

    again = Store.open(tmp_path / "run")
    assert [r["round"] for r in again.rounds()] == [1, 2, 3]
    assert again.evaluations()[-1] == (3, _metrics(3))
    latest = again.latest_checkpoint()
    assert latest is not None and latest.round == 3
    np.testing.assert_array_equal(latest.weights, _vector(0))
    np.testing.assert_array_equal(again.get_site_state("a", "control"), np.full(3, 3, dtype=np.float32))
    assert again.ledger() == [(3, 1.1, "poisson", 0.1, 3, 0.9)]
    assert int(again.db.execute("SELECT COUNT(*) FROM sites").fetchone()[0]) == 2


def test_rewind_forgets_what_came_after_the_checkpoint_but_never_the_privacy_spent(tmp_path: Path) -> None:
    store = Store.create(tmp_path / "run", CONFIG)
    _fill(store, 5)
    store.save_checkpoint(3, _vector(3), {})  # the last checkpoint before a crash in round 6
    for r in range(1, 6):
        store.record_spend(r, (1.0, "fixed", 2.0, r), 0.5 * r, 1e-5)
    store.event("start", "started", 1)

    store.rewind(3)

    assert [r["round"] for r in store.rounds()] == [1, 2, 3]
    assert [r for r, _ in store.evaluations()] == [1, 2, 3]
    assert store.site_metrics(4) == [] and store.site_metrics(4, personal=True) == []
    latest = store.latest_checkpoint()
    assert latest is not None and latest.round == 3
    np.testing.assert_array_equal(store.get_site_state("a", "control"), np.full(3, 3, dtype=np.float32))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2, 3]
    # The ledger is not rewound: rounds 4 and 5 were released before the crash, and their cost stays.
    assert [r for r, *_ in store.ledger()] == [1, 2, 3, 4, 5]
    assert len(store.events()) == 1


def test_the_ledger_keeps_every_release_and_a_reproducible_redo_once(tmp_path: Path) -> None:
    store = Store.create(tmp_path / "run", CONFIG)
    assert store.record_spend(1, (1.2, "poisson", 0.05, 1), 0.3, 1e-5, ["b", "a"])
    assert store.record_spend(2, (1.2, "poisson", 0.05, 1), 0.45, 1e-5, ["a"])
    # A round redone with fresh (secret) noise is a second release of it: a second charge.
    assert store.record_spend(2, (0.9, "poisson", 0.05, 1), 0.7, 1e-5, ["c"])
    # In the insecure reproducible simulation a redone round releases the same result: kept once.
    assert not store.record_spend(2, (9.9, "poisson", 0.5, 1), 7.0, 1e-5, once_per_round=True)
    assert store.ledger() == [
        (1, 1.2, "poisson", 0.05, 1, 0.3),
        (2, 1.2, "poisson", 0.05, 1, 0.45),
        (2, 0.9, "poisson", 0.05, 1, 0.7),
    ]
    assert store.ledger(up_to=1) == [(1, 1.2, "poisson", 0.05, 1, 0.3)]
    assert store.ledger_participants() == [(1, ["a", "b"]), (2, ["a"]), (2, ["c"])]


def test_a_schema_1_ledger_is_migrated_in_order(tmp_path: Path) -> None:
    import sqlite3

    store = Store.create(tmp_path / "run", CONFIG)
    store.close()
    db = sqlite3.connect(tmp_path / "run" / "run.sqlite")
    db.executescript(
        "DROP TABLE privacy_ledger; CREATE TABLE privacy_ledger (round INTEGER PRIMARY KEY, "
        "noise_multiplier REAL NOT NULL, sampling TEXT NOT NULL, sample REAL NOT NULL, steps INTEGER NOT "
        "NULL, epsilon REAL NOT NULL, delta REAL NOT NULL, time REAL NOT NULL); "
        "UPDATE meta SET value = '1' WHERE key = 'schema_version';"
        "INSERT INTO privacy_ledger VALUES (2, 1.0, 'fixed', 5, 1, 0.5, 1e-5, 0);"
        "INSERT INTO privacy_ledger VALUES (1, 1.0, 'fixed', 5, 1, 0.2, 1e-5, 0);"
    )
    db.commit()
    db.close()
    reopened = Store.open(tmp_path / "run")
    assert [row[0] for row in reopened.ledger()] == [1, 2]
    assert reopened.meta("schema_version") == str(SCHEMA_VERSION)
    assert reopened.record_spend(3, (1.0, "fixed", 5, 1), 0.9, 1e-5, ["a"])


def test_site_state_keeps_the_newest_version_and_a_checkpoint_prunes_the_older(tmp_path: Path) -> None:
    store = Store.create(tmp_path / "run", CONFIG)
    state = StoreSiteState(store)
    assert state.get("a", "ditto.model") is None
    for r in (1, 2, 4):
        state.put("a", "ditto.model", r, np.full(2, r, dtype=np.float64))  # stored as float32
    state.put("b", "ditto.model", 1, np.array([7.0, 8.0]))
    got = state.get("a", "ditto.model")
    assert got is not None and got.dtype == np.float32
    np.testing.assert_array_equal(got, [4.0, 4.0])
    got[:] = 0  # a copy: changing it leaves the store alone
    np.testing.assert_array_equal(state.get("a", "ditto.model"), [4.0, 4.0])
    assert store.site_values("ditto.model") == {"a": 4.0, "b": 7.0}

    store.save_checkpoint(3, _vector(0), {})

    kept = store.db.execute("SELECT site, round FROM site_state ORDER BY site, round").fetchall()
    # a: round 1 goes; round 2 (the newest at the checkpoint) and round 4 (after it) stay. b: its only one.
    assert kept == [("a", 2), ("a", 4), ("b", 1)]
    store.rewind(3)
    np.testing.assert_array_equal(state.get("a", "ditto.model"), [2.0, 2.0])


def test_a_missing_checkpoint_file_is_a_store_error(tmp_path: Path) -> None:
    store = Store.create(tmp_path / "run", CONFIG)
    store.save_checkpoint(1, _vector(0), {}).unlink()
    with pytest.raises(StoreError, match=r"round-000001.safetensors cannot be read .*cannot resume from it"):
        store.latest_checkpoint()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint" * 8], ids=["empty", "garbage"])
def test_a_corrupt_checkpoint_file_is_a_store_error(tmp_path: Path, content: bytes) -> None:
    store = Store.create(tmp_path / "run", CONFIG)
    store.save_checkpoint(1, _vector(0), {}).write_bytes(content)
    with pytest.raises(StoreError, match=r"cannot be read .*cannot resume from it"):
        store.latest_checkpoint()


def test_a_corrupt_database_is_a_store_error(tmp_path: Path) -> None:
    Store.create(tmp_path / "run", CONFIG).close()
    (tmp_path / "run" / "run.sqlite").write_bytes(b"this is not SQLite" * 64)
    with pytest.raises(StoreError, match=r"run\.sqlite"):
        Store.open(tmp_path / "run")
