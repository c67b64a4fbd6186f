"""Anomaly detection across rounds: the reputation formula, quarantine of repeat offenders in a whole run
(no longer selected, listed in the report with why), and the store's schema 3 migration."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from confide.report import write_report
from confide.runtime.store import SCHEMA_VERSION, Store
from confide.server.reputation import offenders, reputations
from tests.defence.harness import ATTACKER, run, write_config


def test_reputation_decays_offences_geometrically() -> None:
    history = [(1, "a", True), (2, "a", False), (3, "a", False), (1, "b", False), (3, "b", True)]
    got = reputations(history, decay=0.5)
    # a: 1 -> 0.5·1 + 0 = 0.5 -> 0.5·0.5 + 0.5 = 0.75 -> 0.875. b: 1 -> 1 -> 0.5.
    assert got == {"a": pytest.approx(0.875), "b": pytest.approx(0.5)}


def test_offenders_count_refusals_within_the_window() -> None:
    history = [
        (1, "a", True),
        (2, "a", True),
        (5, "a", True),
        (4, "b", True),
        (5, "b", True),
        (5, "c", False),
    ]
    assert offenders(history, 5, after=2, window=2) == [("b", 2)]  # rounds 4 and 5
    assert offenders(history, 5, after=2, window=5) == [("a", 3), ("b", 2)]
    assert offenders(history, 5, after=2, window=5, known={"a"}) == [("b", 2)]
    assert offenders(history, 5, after=0, window=5) == []  # quarantine off


def test_a_repeat_offender_is_quarantined_no_longer_selected_and_reported(
    tmp_path: Path, text_corpus: Path
) -> None:
    path = write_config(tmp_path, text_corpus, "quarantine")
    overrides = [
        "run.rounds=4",
        "defence.norm_bound=5.0",
        "defence.quarantine_after=2",
        "defence.quarantine_window=3",
    ]
    runner = run(path, overrides, boost=30.0)
    # Refused in rounds 1 and 2, quarantined after round 2, not asked in rounds 3 and 4.
    assert runner.backend.attacked_rounds == [1, 2]  # type: ignore[attr-defined]
    quarantined = runner.store.quarantined()
    assert list(quarantined) == [ATTACKER] and quarantined[ATTACKER][0] == 2
    assert "refused 2 times in the last 3 rounds" in quarantined[ATTACKER][1]
    assert "defence.norm_bound" in quarantined[ATTACKER][1]
    rounds = runner.store.rounds()
    assert [ATTACKER in r["sites"] for r in rounds] == [True, True, False, False]
    history = runner.store.score_history()
    assert [(r, refused) for r, site, _, refused, _ in history if site == ATTACKER] == [(1, True), (2, True)]
    assert all(not refused for _, site, _, refused, _ in history if site != ATTACKER)
    assert all("norm" in scores for _, _, scores, _, _ in history)
    kinds = [kind for _, _, kind, _ in runner.store.events()]
    assert kinds.count("rejected") == 2 and kinds.count("quarantine") == 1
    html = write_report(runner.store.run_dir).read_text()
    assert "Quarantined sites" in html and ATTACKER in html and "refused 2 times" in html


def test_a_schema_2_store_is_migrated_to_keep_scores(tmp_path: Path) -> None:
    store = Store.create(tmp_path / "run", "")
    store.close()
    db = sqlite3.connect(tmp_path / "run" / "run.sqlite")
    db.executescript(
        "DROP TABLE site_scores; DROP TABLE quarantine;"
        "UPDATE meta SET value = '2' WHERE key = 'schema_version';"
    )
    db.commit()
    db.close()
    reopened = Store.open(tmp_path / "run")
    assert reopened.meta("schema_version") == str(SCHEMA_VERSION) == "4"
    reopened.record_scores(1, [("a", {"norm": 2.0}, True, "too long")])
    reopened.quarantine("a", 1, "too long")
    assert reopened.score_history() == [(1, "a", {"norm": 2.0}, True, "too long")]
    assert reopened.quarantined() == {"a": (1, "too long")}
    reopened.rewind(0)  # a resumed run redoes round 1: its scores and quarantine go with it
    assert reopened.score_history() == [] and reopened.quarantined() == {}
