"""The live view's reading of a run store: what changed since the last look, without ever holding up the run.

The run writes ``run.sqlite`` in WAL mode. This module opens it read-only (``mode=ro``), so it can never
write or lock the file for writing, and reads each look in one short transaction: in WAL mode a reader works
on a snapshot and never blocks the writer, and a transaction that ends at once lets the writer's checkpoints
reset the log. A look returns only rows newer than the reader's :class:`Cursor` (by round, ledger charge,
event id, sample id, and the status counter of the sites), so a run of thousands of rounds costs each look
only what is new.

What it gives out is chosen, not dumped. The config becomes a summary of named, harmless settings (never
paths, addresses or anything that may name a key or a token); a round gives its counts, never the list of
sites in it; metrics are the server's numbers (pooled and summed), never what a site sent in its update.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

SUMMARY_KEYS: dict[str, tuple[str, ...]] = {
    "run": ("name", "rounds", "seed"),
    "data": ("dataset", "partition", "max_sites"),
    "model": ("kind", "layers", "width", "hidden"),
    "server": ("strategy", "aggregator", "optimizer", "sites_per_round"),
    "privacy": (
        "dp",
        "trust",
        "mechanism",
        "noise_multiplier",
        "target_epsilon",
        "delta",
        "secure_aggregation",
        "encryption",
        "enclave",
        "record_dp",
        "record_target_epsilon",
    ),
    "backend": ("kind",),
    "eval": ("every",),
}
"""The settings the page may show, by section: all are choices and numbers, none a path or a secret."""


@dataclass(frozen=True)
class Cursor:
    """How far a client has been told: the newest row of each kind it has."""

    round: int = 0
    evaluation: int = 0
    charge: int = 0
    event: int = 0
    sample: int = 0
    sites: int = 0
    """The newest ``site_status.changed`` seen."""
    registered: int = 0
    """How many sites the ``sites`` table held (a deployment registers them once its sites joined)."""


def summary(config_path: Path) -> dict[str, Any]:
    """The :data:`SUMMARY_KEYS` of a run's config.toml (empty when there is none yet), as plain values."""
    try:
        raw = tomllib.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    out: dict[str, Any] = {}
    for section, keys in SUMMARY_KEYS.items():
        table = raw.get(section)
        if not isinstance(table, Mapping):
            continue
        for key in keys:
            value = table.get(key)
            if isinstance(value, bool | int | float) or _choice(value):
                out[f"{section}.{key}"] = value
    return out


def _choice(value: Any) -> bool:
    """A short word (a named choice such as 'central' or 'gpt', or a run's name), never a path or free
    text."""
    if not isinstance(value, str) or len(value) > 80:
        return False
    return all(ch.isalnum() or ch in "-_.:+" for ch in value) and ".." not in value


def _number(value: Any) -> float | int | bool | None:
    if isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return None


class RunReader:
    """Read-only looks at the run store in ``run_dir``; safe to use from several threads (one at a time)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "run.sqlite"
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _connection(self) -> sqlite3.Connection | None:
        """The read-only connection, opened once the run has made its store (None before)."""
        if self._db is None and self.path.is_file():
            uri = f"file:{quote(str(self.path.resolve()))}?mode=ro"
            # Autocommit: every look opens and ends its own transaction (BEGIN ... COMMIT below). In WAL mode
            # a reader waits only while the file is recovered or reset; a busy machine may make that slow.
            self._db = sqlite3.connect(
                uri, uri=True, isolation_level=None, check_same_thread=False, timeout=120
            )
        return self._db

    def look(self, cursor: Cursor | None = None) -> tuple[dict[str, Any], Cursor | None]:
        """What is new since ``cursor`` (everything with None), and the cursor after it (None while the run
        has no store yet).

        The answer's ``reset`` is true when it holds everything (a first look, or a store that went back: a
        resumed run forgets the rounds after its last checkpoint and does them again)."""
        with self._lock:
            db = self._connection()
            if db is None:
                return _waiting(self.run_dir), None
            db.execute("BEGIN")
            try:
                return self._look(db, cursor)
            finally:
                db.execute("COMMIT")

    def _look(self, db: sqlite3.Connection, cursor: Cursor | None) -> tuple[dict[str, Any], Cursor]:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        last_round = db.execute("SELECT COALESCE(MAX(round), 0) FROM rounds").fetchone()[0]
        if cursor is not None and last_round < cursor.round:
            cursor = None  # rewound by a resume: start again from nothing
        reset = cursor is None
        c = cursor or Cursor()
        meta = dict(db.execute("SELECT key, value FROM meta"))
        out: dict[str, Any] = {
            "reset": reset,
            "status": meta.get("status", "starting"),
            "created": float(meta.get("created", 0) or 0),
        }
        if reset:
            out["config"] = summary(self.run_dir / "config.toml")
        out["rounds"] = [
            {
                "round": r,
                "sites": len(json.loads(sites)),
                "examples": n,
                "train_loss": _number(loss),
                "bytes_sent": sent,
                "bytes_received": received,
                "seconds": _number(seconds),
            }
            for r, sites, n, loss, sent, received, seconds in db.execute(
                "SELECT round, sites, num_examples, train_loss, bytes_sent, bytes_received, seconds "
                "FROM rounds WHERE round > ? ORDER BY round",
                (c.round,),
            )
        ]
        evaluations = []
        for r, value in db.execute(
            "SELECT round, value FROM metrics WHERE round > ? ORDER BY round", (c.evaluation,)
        ):
            numbers = {k: _number(v) for k, v in json.loads(value).items()}
            evaluations.append({"round": r, **{k: v for k, v in numbers.items() if k != "round"}})
        out["evaluations"] = evaluations
        out["ledger"] = [
            {"charge": i, "round": r, "noise_multiplier": z, "sample": q, "steps": k, "epsilon": _number(e)}
            for i, r, z, q, k, e in db.execute(
                "SELECT charge, round, noise_multiplier, sample, steps, epsilon FROM privacy_ledger "
                "WHERE charge > ? ORDER BY charge",
                (c.charge,),
            )
        ]
        out["events"] = [
            {"id": i, "time": t, "round": r, "kind": kind, "message": message}
            for i, t, r, kind, message in db.execute(
                "SELECT id, time, round, kind, message FROM events WHERE id > ? ORDER BY id", (c.event,)
            )
        ]
        out["samples"] = []
        if "samples" in tables:  # a store of schema 3 (made before the live view) has none
            out["samples"] = [
                {"id": i, "round": r, "prompt": prompt, "text": text}
                for i, r, prompt, text in db.execute(
                    "SELECT id, round, prompt, text FROM samples WHERE id > ? ORDER BY id", (c.sample,)
                )
            ]
        registered = db.execute("SELECT COUNT(*) FROM sites").fetchone()[0]
        out["sites"], changed = self._sites(db, tables, c, registered != c.registered)
        out["quarantined"] = db.execute("SELECT COUNT(*) FROM quarantine").fetchone()[0]
        after = replace(
            c,
            round=max([c.round, *(x["round"] for x in out["rounds"])]),
            evaluation=max([c.evaluation, *(x["round"] for x in evaluations)]),
            charge=max([c.charge, *(x["charge"] for x in out["ledger"])]),
            event=max([c.event, *(x["id"] for x in out["events"])]),
            sample=max([c.sample, *(x["id"] for x in out["samples"])]),
            sites=max(c.sites, changed),
            registered=registered,
        )
        return out, after

    def _sites(
        self, db: sqlite3.Connection, tables: set[str], c: Cursor, everyone: bool
    ) -> tuple[list[dict[str, Any]], int]:
        """The sites whose status changed since ``c`` (every registered site with ``everyone``), and the
        newest status counter."""
        if "site_status" not in tables:
            rows = (
                db.execute("SELECT name, grp, num_train, num_test FROM sites ORDER BY name")
                if everyone
                else []
            )
            return [_site(name, group, train, test) for name, group, train, test in rows], 0
        changed = db.execute("SELECT COALESCE(MAX(changed), 0) FROM site_status").fetchone()[0]
        select = (
            "SELECT s.name, s.grp, s.num_train, s.num_test, t.state, t.round, t.joined, t.last_seen, "
            "t.rounds, t.refused, t.dropped, t.detail FROM {} ORDER BY 1"
        )
        if everyone:
            # Every registered site, with its status when it has one.
            rows = db.execute(select.format("sites s LEFT JOIN site_status t ON t.site = s.name")).fetchall()
            # A deployment's site may join before the run registers its sites: show it all the same.
            rows += db.execute(
                "SELECT t.site, '', 0, 0, t.state, t.round, t.joined, t.last_seen, t.rounds, t.refused, "
                "t.dropped, t.detail FROM site_status t WHERE t.site NOT IN (SELECT name FROM sites)"
            ).fetchall()
        else:
            rows = db.execute(
                "SELECT t.site, COALESCE(s.grp, ''), COALESCE(s.num_train, 0), COALESCE(s.num_test, 0), "
                "t.state, t.round, t.joined, t.last_seen, t.rounds, t.refused, t.dropped, t.detail "
                "FROM site_status t LEFT JOIN sites s ON s.name = t.site WHERE t.changed > ? ORDER BY 1",
                (c.sites,),
            ).fetchall()
        return [_site(*row) for row in rows], changed


def _site(
    name: str,
    group: str,
    train: int,
    test: int,
    state: str | None = None,
    round: int | None = None,
    joined: float | None = None,
    last_seen: float | None = None,
    rounds: int | None = 0,
    refused: int | None = 0,
    dropped: int | None = 0,
    detail: str | None = "",
) -> dict[str, Any]:
    return {
        "site": name,
        "group": group,
        "train": train,
        "test": test,
        "state": state or "not asked yet",
        "round": round,
        "joined": joined,
        "last_seen": last_seen,
        "rounds": rounds or 0,
        "refused": refused or 0,
        "dropped": dropped or 0,
        "detail": detail or "",
    }


def _waiting(run_dir: Path) -> dict[str, Any]:
    """The answer before the run has made its store (a server still waiting for its sites to join)."""
    return {
        "reset": True,
        "status": "waiting for the run to start",
        "created": 0.0,
        "config": summary(run_dir / "config.toml"),
        "rounds": [],
        "evaluations": [],
        "ledger": [],
        "events": [],
        "samples": [],
        "sites": [],
        "quarantined": 0,
    }
