"""State a site keeps between rounds: SCAFFOLD's control variate, Ditto's personal model, FedRep's head.

This state belongs to the site, never to the server. A deployed site keeps it in its own SQLite file
(:class:`DurableSiteState`); in
simulation the backend keeps every site's state in the run store, tagged with the round that wrote it, so
that a resumed run rewinds it together with the global model and recomputes exactly what an uninterrupted
run computes.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Protocol

import numpy as np

from confide.core import Vector
from confide.errors import StoreError

LOCK_TIMEOUT = 120.0
"""Seconds a site's state file waits for another process's lock before it gives up."""


class SiteState(Protocol):
    """Per-site named vectors that survive from one round to the next."""

    def get(self, site: str, key: str) -> Vector | None:
        """The latest vector ``key`` of ``site``, or None if the site has not stored one yet."""
        ...

    def put(self, site: str, key: str, round: int, vector: Vector) -> None:
        """Store ``vector`` as ``key`` of ``site``, written in round ``round``."""
        ...


class MemorySiteState:
    """Site state in a dictionary: for library use and tests that need no run directory."""

    def __init__(self) -> None:
        self._data: dict[tuple[str, str], tuple[int, Vector]] = {}

    def get(self, site: str, key: str) -> Vector | None:
        entry = self._data.get((site, key))
        return None if entry is None else entry[1]

    def put(self, site: str, key: str, round: int, vector: Vector) -> None:
        self._data[(site, key)] = (round, np.array(vector, dtype=np.float32, copy=True))

    def keys(self) -> list[tuple[str, str]]:
        return sorted(self._data)


class DurableSiteState:
    """A deployed site's own state in a SQLite file of its own, so that a restarted site process loses
    nothing: its record-level DP-SGD ledger (an epsilon reset to 0 would under-count what it spent), its
    SCAFFOLD control variate, its Ditto or FedRep personal model.

    Rows are kept per run (a site may take part in several runs over its life), and only the latest value of
    each key is kept: after a server that resumes from an earlier checkpoint, a site goes on from what it
    last wrote, which never forgets privacy spent. One file may hold several sites (a process hosting a
    group of them); calls may come from several threads.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.run = ""
        """The run whose state is read and written (set when the site joins)."""
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Several processes may share one file (site groups started from one folder): a lock another
            # holds is waited for, on a busy machine for long, never taken as a broken file.
            self._db = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=LOCK_TIMEOUT
            )
            self._prepare()
        except sqlite3.DatabaseError as e:
            raise StoreError(
                f"cannot use {self.path} as the site's state file ({e}); give another path with --state, or "
                "move the broken file aside (the site then starts without its earlier state)"
            ) from e

    def _prepare(self) -> None:
        """WAL mode and the tables. Switching to WAL needs the file to itself, and SQLite reports another
        process's open transaction at that moment as 'locked' without waiting: so retry, within the
        timeout."""
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS site_state (run TEXT NOT NULL, site TEXT NOT NULL, "
            "key TEXT NOT NULL, round INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (run, site, key))"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS survivors (run TEXT NOT NULL, site TEXT NOT NULL, "
            "round INTEGER NOT NULL, survivors TEXT NOT NULL, PRIMARY KEY (run, site, round))"
        )

    def get(self, site: str, key: str) -> Vector | None:
        with self._lock:
            row = self._db.execute(
                "SELECT data FROM site_state WHERE run = ? AND site = ? AND key = ?", (self.run, site, key)
            ).fetchone()
        return None if row is None else np.frombuffer(row[0], dtype=np.float32).copy()

    def put(self, site: str, key: str, round: int, vector: Vector) -> None:
        data = np.ascontiguousarray(vector, dtype=np.float32).tobytes()
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO site_state VALUES (?, ?, ?, ?, ?)", (self.run, site, key, round, data)
            )

    def survivor_store(self, site: str) -> _Survivors:
        """Where ``site`` remembers, per (run, round), the survivor set it agreed to unmask (a
        :class:`~confide.privacy.secagg.SurvivorStore`): a restarted site still refuses to unmask a round it
        answered for with another set."""
        return _Survivors(self, site)

    def agreed(self, site: str, run: str, round: int) -> tuple[str, ...] | None:
        """The survivor set ``site`` agreed to unmask for ``round`` of ``run``, if any."""
        with self._lock:
            row = self._db.execute(
                "SELECT survivors FROM survivors WHERE run = ? AND site = ? AND round = ?", (run, site, round)
            ).fetchone()
        return None if row is None else tuple(json.loads(row[0]))

    def agree(self, site: str, run: str, round: int, survivors: tuple[str, ...]) -> None:
        """Remember the set ``site`` agreed to for ``round`` of ``run``; an entry is never replaced."""
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO survivors VALUES (?, ?, ?, ?)",
                (run, site, round, json.dumps(list(survivors))),
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()


class _Survivors:
    """One site's view of its durable state's survivor sets (a SurvivorStore)."""

    def __init__(self, state: DurableSiteState, site: str) -> None:
        self.state, self.site = state, site

    def get(self, run: str, round: int) -> tuple[str, ...] | None:
        return self.state.agreed(self.site, run, round)

    def put(self, run: str, round: int, survivors: tuple[str, ...]) -> None:
        self.state.agree(self.site, run, round, survivors)
