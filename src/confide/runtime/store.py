"""The run store: one directory per run, with the state needed to report on it and to resume it.

```
RUN_DIR/
  config.toml        the resolved configuration (every default filled in)
  run.sqlite         rounds, evaluation metrics, per-site metrics, sites, events, checkpoint references,
                     and (in simulation) each site's own state: SCAFFOLD control variates, personal models
  metrics.jsonl      one JSON object per evaluated round, strict JSON: NaN is null (rewritten from
                     run.sqlite on resume)
  checkpoints/       round-NNNNNN.safetensors: global weights + server optimizer state
```

SQLite is the source of truth. Every write is one transaction, and a checkpoint file is written under a
temporary name and renamed before the database refers to it, so a run killed at any instant leaves a store
that resumes from its last complete checkpoint with nothing half-written.

Slightly over ~400 lines: one table's reads and writes after another, kept in one class so that every write
goes through its transactions.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from confide.errors import StoreError

SCHEMA_VERSION = 4
_LEDGER_COLUMNS = "round, noise_multiplier, sampling, sample, steps, epsilon, delta, time"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sites (
  name TEXT PRIMARY KEY, grp TEXT NOT NULL, num_train INTEGER NOT NULL, num_test INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
  round INTEGER PRIMARY KEY, sites TEXT NOT NULL, num_examples INTEGER NOT NULL, train_loss REAL,
  bytes_sent INTEGER NOT NULL, bytes_received INTEGER NOT NULL, seconds REAL NOT NULL);
CREATE TABLE IF NOT EXISTS metrics (round INTEGER PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS site_metrics (
  round INTEGER NOT NULL, site TEXT NOT NULL, loss REAL NOT NULL, accuracy REAL NOT NULL,
  targets INTEGER NOT NULL, PRIMARY KEY (round, site));
CREATE TABLE IF NOT EXISTS personal_site_metrics (
  round INTEGER NOT NULL, site TEXT NOT NULL, loss REAL NOT NULL, accuracy REAL NOT NULL,
  targets INTEGER NOT NULL, PRIMARY KEY (round, site));
CREATE TABLE IF NOT EXISTS site_state (
  site TEXT NOT NULL, key TEXT NOT NULL, round INTEGER NOT NULL, data BLOB NOT NULL,
  PRIMARY KEY (site, key, round));
CREATE TABLE IF NOT EXISTS privacy_ledger (
  charge INTEGER PRIMARY KEY AUTOINCREMENT, round INTEGER NOT NULL, noise_multiplier REAL NOT NULL,
  sampling TEXT NOT NULL, sample REAL NOT NULL, steps INTEGER NOT NULL, epsilon REAL NOT NULL,
  delta REAL NOT NULL, time REAL NOT NULL, participants TEXT NOT NULL DEFAULT '[]');
CREATE TABLE IF NOT EXISTS checkpoints (round INTEGER PRIMARY KEY, path TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS events (
  id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, round INTEGER, kind TEXT NOT NULL,
  message TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS site_scores (
  round INTEGER NOT NULL, site TEXT NOT NULL, scores TEXT NOT NULL, refused INTEGER NOT NULL,
  reason TEXT NOT NULL, PRIMARY KEY (round, site));
CREATE TABLE IF NOT EXISTS quarantine (site TEXT PRIMARY KEY, round INTEGER NOT NULL, reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS audits (
  id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, time REAL NOT NULL, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS site_status (
  site TEXT PRIMARY KEY, state TEXT NOT NULL, round INTEGER, joined REAL, last_seen REAL,
  rounds INTEGER NOT NULL DEFAULT 0, refused INTEGER NOT NULL DEFAULT 0, dropped INTEGER NOT NULL DEFAULT 0,
  detail TEXT NOT NULL DEFAULT '', changed INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS site_status_changed ON site_status (changed);
CREATE TABLE IF NOT EXISTS samples (
  id INTEGER PRIMARY KEY AUTOINCREMENT, round INTEGER NOT NULL, prompt TEXT NOT NULL, text TEXT NOT NULL,
  time REAL NOT NULL);
"""

SITE_STATES = ("joined", "working", "answered", "took part", "dropped", "refused", "quarantined")
"""A site's state in ``site_status``: joined (a deployment's site connected, not asked yet), working (asked
in the round under way), answered (its update is in; the round goes on), took part (its update reached the
round's result), dropped (asked but never answered), refused (its update was refused), quarantined (left out
of every later round)."""


@dataclass(frozen=True)
class Checkpoint:
    round: int
    weights: np.ndarray
    optimizer_state: dict[str, np.ndarray]
    extra: dict[str, np.ndarray]


def finite_json(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None: strict JSON (browsers, jq) has neither."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


def _json_line(metrics: Mapping[str, Any]) -> str:
    """A line of metrics.jsonl: strict JSON, a NaN or infinite value (say, an accuracy the server cannot know)
    written as null. run.sqlite keeps the float, which Python reads back."""
    return json.dumps(finite_json(metrics), allow_nan=False)


class Store:
    """A run directory and its SQLite database."""

    def __init__(self, run_dir: Path, connection: sqlite3.Connection) -> None:
        self.run_dir = run_dir
        self.db = connection

    # -- opening -------------------------------------------------------------------------------------------

    @classmethod
    def create(cls, run_dir: Path, config_toml: str) -> Store:
        if run_dir.exists() and any(run_dir.iterdir()):
            raise StoreError(
                f"the run directory {run_dir} already exists and is not empty; continue it with "
                f"`confide run --resume {run_dir}` or choose another run.name"
            )
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        _atomic_write(run_dir / "config.toml", config_toml.encode())
        store = cls(run_dir, _connect(run_dir / "run.sqlite"))
        with store._tx() as db:
            db.executescript(_SCHEMA)
            db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            db.execute("INSERT INTO meta VALUES ('created', ?)", (str(time.time()),))
        return store

    @classmethod
    def attach(cls, run_dir: Path) -> Store:
        """Another process's connection to the store of a run under way (a local worker process writing its
        sites' state): no migration, as the run's own process opened it already."""
        return cls(run_dir, _connect(run_dir / "run.sqlite"))

    @classmethod
    def open(cls, run_dir: Path) -> Store:
        path = run_dir / "run.sqlite"
        if not path.is_file() or not (run_dir / "config.toml").is_file():
            raise StoreError(
                f"{run_dir} is not a confide run directory (it needs config.toml and run.sqlite, "
                "as `confide run` writes them)"
            )
        try:
            store = cls(run_dir, _connect(path))
            version = store.meta("schema_version")
        except sqlite3.DatabaseError as e:
            raise StoreError(
                f"{path} is not a readable run store ({e}); the run directory is damaged and cannot resume"
            ) from e
        if version == "1":
            store._migrate_from_1()
            version = store.meta("schema_version")
        if version == "2":
            store._migrate_from_2()
            version = store.meta("schema_version")
        if version == "3":
            store._migrate_from_3()
            version = store.meta("schema_version")
        if version != str(SCHEMA_VERSION):
            raise StoreError(f"{path} has store schema {version}; this confide reads schema {SCHEMA_VERSION}")
        with store._tx() as db:
            db.executescript(_SCHEMA)  # tables added since the run was created (the schema only ever grows)
        return store

    def _migrate_from_1(self) -> None:
        """Schema 1 kept one ledger entry per round; schema 2 keeps one per charge (a round released twice
        is charged twice), with the sites that took part. The old entries keep their order."""
        with self._tx() as db:
            db.execute("ALTER TABLE privacy_ledger RENAME TO privacy_ledger_v1")
            db.executescript(_SCHEMA)
            db.execute(
                f"INSERT INTO privacy_ledger ({_LEDGER_COLUMNS}) "
                "SELECT * FROM privacy_ledger_v1 ORDER BY round"
            )
            db.execute("DROP TABLE privacy_ledger_v1")
            db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")

    def _migrate_from_2(self) -> None:
        """Schema 3 adds the defences' per-site score history and the quarantine (both empty for a run
        made before them: it screened nothing)."""
        with self._tx() as db:
            db.executescript(_SCHEMA)
            db.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")

    def _migrate_from_3(self) -> None:
        """Schema 4 adds each site's current status and the passages generated at each evaluation, for the
        live view (`confide dashboard`); a run made before them has neither until it resumes."""
        with self._tx() as db:
            db.executescript(_SCHEMA)
            db.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self.db:  # commits on success, rolls back on an exception
            yield self.db

    # -- writing -------------------------------------------------------------------------------------------

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def add_sites(self, rows: Sequence[tuple[str, str, int, int]]) -> None:
        with self._tx() as db:
            db.executemany("INSERT OR REPLACE INTO sites VALUES (?, ?, ?, ?)", rows)

    def record_round(
        self,
        round: int,
        sites: Sequence[str],
        num_examples: int,
        train_loss: float,
        bytes_sent: int,
        bytes_received: int,
        seconds: float,
    ) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO rounds VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    round,
                    json.dumps(list(sites)),
                    num_examples,
                    train_loss,
                    bytes_sent,
                    bytes_received,
                    seconds,
                ),
            )

    def record_evaluation(
        self,
        round: int,
        metrics: Mapping[str, Any],
        per_site: Sequence[tuple[str, float, float, int]],
        personal: Sequence[tuple[str, float, float, int]] = (),
    ) -> None:
        """Store one evaluated round (per site: the global model, and personalized ones when there are) and
        append it to metrics.jsonl."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO metrics VALUES (?, ?)", (round, json.dumps(dict(metrics))))
            db.executemany(
                "INSERT OR REPLACE INTO site_metrics VALUES (?, ?, ?, ?, ?)",
                [(round, site, loss, acc, n) for site, loss, acc, n in per_site],
            )
            db.executemany(
                "INSERT OR REPLACE INTO personal_site_metrics VALUES (?, ?, ?, ?, ?)",
                [(round, site, loss, acc, n) for site, loss, acc, n in personal],
            )
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(_json_line(metrics) + "\n")

    def event(self, kind: str, message: str, round: int | None = None) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO events (time, round, kind, message) VALUES (?, ?, ?, ?)",
                (time.time(), round, kind, message),
            )

    def record_audit(self, kind: str, value: Mapping[str, Any]) -> None:
        """The numbers of one audit (``canaries``, ``inversion``, ``membership``); earlier ones are kept."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO audits (kind, time, value) VALUES (?, ?, ?)",
                (kind, time.time(), json.dumps(finite_json(value), allow_nan=False)),
            )

    def audits(self) -> dict[str, tuple[float, dict[str, Any]]]:
        """The latest audit of each kind: kind -> (time, numbers)."""
        rows = self.db.execute("SELECT kind, time, value FROM audits ORDER BY id").fetchall()
        return {kind: (t, json.loads(value)) for kind, t, value in rows}

    def record_scores(self, round: int, rows: Sequence[tuple[str, Mapping[str, float], bool, str]]) -> None:
        """One round's defence scores: (site, scores, refused, why) per screened or refused site."""
        with self._tx() as db:
            db.executemany(
                "INSERT OR REPLACE INTO site_scores VALUES (?, ?, ?, ?, ?)",
                [(round, site, json.dumps(dict(s)), int(bad), why) for site, s, bad, why in rows],
            )

    def quarantine(self, site: str, round: int, reason: str) -> None:
        """Leave ``site`` out of every round after ``round``, for ``reason``."""
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO quarantine VALUES (?, ?, ?)", (site, round, reason))

    def site_status(
        self,
        rows: Sequence[tuple[str, str, int | None, str]],
        *,
        seen: bool = False,
    ) -> None:
        """Set the state (one of :data:`SITE_STATES`) of each (site, state, round, detail) in one transaction,
        and count each 'took part', 'dropped' and 'refused'; ``seen``: the sites were heard from now."""
        now = time.time()
        with self._tx() as db:
            changed = _next_change(db)
            db.executemany(
                """INSERT INTO site_status
                     (site, state, round, last_seen, rounds, refused, dropped, detail, changed)
                   VALUES (:site, :state, :round, :seen, :took, :refused, :dropped, :detail, :changed)
                   ON CONFLICT (site) DO UPDATE SET state = excluded.state,
                     round = COALESCE(excluded.round, round),
                     last_seen = COALESCE(excluded.last_seen, last_seen),
                     rounds = rounds + excluded.rounds, refused = refused + excluded.refused,
                     dropped = dropped + excluded.dropped, detail = excluded.detail,
                     changed = excluded.changed""",
                [
                    {
                        "site": site,
                        "state": state,
                        "round": round,
                        "seen": now if seen else None,
                        "took": int(state == "took part"),
                        "refused": int(state == "refused"),
                        "dropped": int(state == "dropped"),
                        "detail": detail,
                        "changed": changed,
                    }
                    for site, state, round, detail in rows
                ],
            )

    def sites_seen(self, rows: Sequence[tuple[str, float, float]]) -> None:
        """A deployment's connected sites: (site, when it joined, when it was last heard from), as times of
        ``time.time()``; a site never seen before is 'joined'."""
        with self._tx() as db:
            changed = _next_change(db)
            db.executemany(
                """INSERT INTO site_status (site, state, joined, last_seen, changed)
                   VALUES (?, 'joined', ?, ?, ?)
                   ON CONFLICT (site) DO UPDATE SET joined = excluded.joined,
                     last_seen = MAX(COALESCE(last_seen, 0), excluded.last_seen), changed = excluded.changed
                   WHERE joined IS NOT excluded.joined OR COALESCE(last_seen, 0) < excluded.last_seen""",
                [(site, joined, seen, changed) for site, joined, seen in rows],
            )

    def record_sample(self, round: int, prompt: str, text: str) -> None:
        """A passage the global model wrote after evaluating ``round`` (``text`` continues ``prompt``)."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO samples (round, prompt, text, time) VALUES (?, ?, ?, ?)",
                (round, prompt, text, time.time()),
            )

    def save_checkpoint(
        self,
        round: int,
        weights: np.ndarray,
        optimizer_state: Mapping[str, np.ndarray],
        extra: Mapping[str, np.ndarray] | None = None,
    ) -> Path:
        tensors = {"weights": weights}
        tensors.update({f"optimizer.{k}": v for k, v in optimizer_state.items()})
        tensors.update({f"extra.{k}": v for k, v in (extra or {}).items()})
        path = self.run_dir / "checkpoints" / f"round-{round:06d}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"round": str(round)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?)",
                (round, str(path.relative_to(self.run_dir)), time.time()),
            )
            # A resume never goes back before this checkpoint, so of each site's state only the newest
            # version written by this round is still needed (and any written after it).
            db.execute(
                """DELETE FROM site_state WHERE round < (
                     SELECT MAX(s.round) FROM site_state s
                     WHERE s.site = site_state.site AND s.key = site_state.key AND s.round <= ?)""",
                (round,),
            )
        return path

    def rewind(self, round: int) -> None:
        """Forget everything after ``round`` (the last checkpoint) before a resumed run redoes it."""
        with self._tx() as db:
            tables = (
                "rounds",
                "metrics",
                "site_metrics",
                "personal_site_metrics",
                "site_state",
                "checkpoints",
                "site_scores",
                "quarantine",
                "samples",
            )
            for table in tables:
                db.execute(f"DELETE FROM {table} WHERE round > ?", (round,))
        lines = [_json_line(m) for _, m in self.evaluations()]
        _atomic_write(self.run_dir / "metrics.jsonl", "".join(line + "\n" for line in lines).encode())

    # -- reading -------------------------------------------------------------------------------------------

    def checkpoint_rounds(self) -> list[int]:
        """The rounds that have a stored checkpoint, in order."""
        return [int(r) for (r,) in self.db.execute("SELECT round FROM checkpoints ORDER BY round")]

    def latest_checkpoint(self) -> Checkpoint | None:
        rounds = self.checkpoint_rounds()
        if not rounds:
            return None
        try:
            return self.checkpoint(rounds[-1])
        except StoreError as e:
            raise StoreError(f"{e}; the run cannot resume from it") from None

    def checkpoint(self, round: int) -> Checkpoint:
        """The checkpoint of ``round`` (one of :meth:`checkpoint_rounds`); StoreError if it cannot be read."""
        row = self.db.execute("SELECT path FROM checkpoints WHERE round = ?", (round,)).fetchone()
        if row is None:
            raise StoreError(f"{self.run_dir} has no checkpoint of round {round}")
        path = self.run_dir / row[0]
        try:
            tensors = load_file(str(path))
            weights = tensors["weights"]
        except (OSError, ValueError, KeyError, SafetensorError) as e:
            raise StoreError(f"the checkpoint {path} cannot be read ({e})") from e
        return Checkpoint(
            round=round,
            weights=weights,
            optimizer_state={k[10:]: v for k, v in tensors.items() if k.startswith("optimizer.")},
            extra={k[6:]: v for k, v in tensors.items() if k.startswith("extra.")},
        )

    def evaluations(self) -> list[tuple[int, dict[str, Any]]]:
        rows = self.db.execute("SELECT round, value FROM metrics ORDER BY round").fetchall()
        return [(int(r), json.loads(v)) for r, v in rows]

    def rounds(self) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM rounds ORDER BY round").fetchall()
        names = ("round", "sites", "num_examples", "train_loss", "bytes_sent", "bytes_received", "seconds")
        out = [dict(zip(names, row, strict=True)) for row in rows]
        for r in out:
            r["sites"] = json.loads(r["sites"])
        return out

    def site_metrics(self, round: int, personal: bool = False) -> list[tuple[str, float, float, int]]:
        """Per-site (site, loss, accuracy, targets) of round ``round``: of the global model, or with
        ``personal`` of each site's personalized model."""
        table = "personal_site_metrics" if personal else "site_metrics"
        rows = self.db.execute(
            f"SELECT site, loss, accuracy, targets FROM {table} WHERE round = ? ORDER BY site", (round,)
        ).fetchall()
        return [(str(s), float(loss), float(acc), int(n)) for s, loss, acc, n in rows]

    # -- privacy ledger ------------------------------------------------------------------------------------

    def record_spend(
        self,
        round: int,
        entry: tuple[float, str, float, int],
        epsilon: float,
        delta: float,
        participants: Sequence[str] = (),
        *,
        once_per_round: bool = False,
    ) -> bool:
        """Record what a release of round ``round`` spent, committed before the round's result is used, and
        return whether it was recorded.

        The ledger is never rewound. With secret noise every release is a new one: a round redone after a
        crash or a retry draws fresh noise, and two releases of a round are two charges (their difference
        would otherwise show the noise). ``once_per_round`` is for the insecure reproducible simulation,
        where a redone round, drawn from the same seed, releases exactly the same result: its entry is kept
        once.
        """
        noise, sampling, sample, steps = entry
        with self._tx() as db:
            if (
                once_per_round
                and db.execute("SELECT 1 FROM privacy_ledger WHERE round = ?", (round,)).fetchone()
            ):
                return False
            db.execute(
                f"INSERT INTO privacy_ledger ({_LEDGER_COLUMNS}, participants) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    round,
                    noise,
                    sampling,
                    sample,
                    steps,
                    epsilon,
                    delta,
                    time.time(),
                    json.dumps(sorted(participants)),
                ),
            )
        return True

    def ledger(self, up_to: int | None = None) -> list[tuple[int, float, str, float, int, float]]:
        """(round, noise multiplier, sampling, sample, steps, epsilon after it) of every charge, oldest
        first."""
        query = "SELECT round, noise_multiplier, sampling, sample, steps, epsilon FROM privacy_ledger"
        args: tuple[int, ...] = ()
        if up_to is not None:
            query += " WHERE round <= ?"
            args = (up_to,)
        return [
            (int(r), float(z), str(s), float(q), int(k), float(e))
            for r, z, s, q, k, e in self.db.execute(query + " ORDER BY charge", args)
        ]

    def ledger_participants(self) -> list[tuple[int, list[str]]]:
        """(round, the sites whose updates reached the aggregate) of every charge, oldest first."""
        rows = self.db.execute("SELECT round, participants FROM privacy_ledger ORDER BY charge")
        return [(int(r), list(json.loads(p))) for r, p in rows]

    def site_values(self, key: str) -> dict[str, float]:
        """The first value of ``key`` in every site's newest state (e.g. each site's record-level epsilon)."""
        rows = self.db.execute(
            """SELECT site, data FROM site_state s WHERE key = ? AND round = (
                 SELECT MAX(round) FROM site_state t WHERE t.site = s.site AND t.key = s.key)""",
            (key,),
        ).fetchall()
        return {str(site): float(np.frombuffer(data, dtype=np.float32)[0]) for site, data in rows}

    # -- site state (simulation) ---------------------------------------------------------------------------

    def readable(self, weights: np.ndarray, size: int) -> np.ndarray:
        """A stored global model in clear. Under CKKS the server holds it encrypted: a simulation keeps its
        simulated sites' keys in the run store and decrypts it with one; a deployed server holds no key, and
        is told so (StoreError)."""
        from confide.core import is_encrypted
        from confide.privacy.he.ceremony import SECRET, from_state
        from confide.privacy.he.ckks import ENCRYPTED_MODEL, SecretKey

        if not is_encrypted(weights):
            return weights
        row = self.db.execute("SELECT data FROM site_state WHERE key = ? LIMIT 1", (SECRET,)).fetchone()
        if row is None:
            raise StoreError(
                f"{ENCRYPTED_MODEL}: this run directory holds no site's key (a deployment's server never "
                "does), so the model cannot be read here"
            )
        key = SecretKey.from_secret_bytes(from_state(np.frombuffer(row[0], dtype=np.float32)))
        return key.decrypt(weights.tobytes(), size).astype(np.float32)

    def get_site_state(self, site: str, key: str) -> np.ndarray | None:
        row = self.db.execute(
            "SELECT data FROM site_state WHERE site = ? AND key = ? ORDER BY round DESC LIMIT 1", (site, key)
        ).fetchone()
        return None if row is None else np.frombuffer(row[0], dtype=np.float32).copy()

    def put_site_state(self, site: str, key: str, round: int, vector: np.ndarray) -> None:
        data = np.ascontiguousarray(vector, dtype=np.float32).tobytes()
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO site_state VALUES (?, ?, ?, ?)", (site, key, round, data))

    def score_history(self, after: int = 0) -> list[tuple[int, str, dict[str, float], bool, str]]:
        """Every (round, site, scores, refused, why) the defences recorded for rounds after ``after``, oldest
        round first."""
        rows = self.db.execute(
            "SELECT round, site, scores, refused, reason FROM site_scores WHERE round > ? "
            "ORDER BY round, site",
            (after,),
        )
        return [(int(r), str(s), dict(json.loads(sc)), bool(bad), str(why)) for r, s, sc, bad, why in rows]

    def quarantined(self) -> dict[str, tuple[int, str]]:
        """Each quarantined site with the round it was quarantined after and why."""
        rows = self.db.execute("SELECT site, round, reason FROM quarantine ORDER BY round, site")
        return {str(site): (int(r), str(why)) for site, r, why in rows}

    def events(self) -> list[tuple[float, int | None, str, str]]:
        return list(self.db.execute("SELECT time, round, kind, message FROM events ORDER BY id"))

    def site_states(self) -> dict[str, tuple[str, int | None, str]]:
        """Each site's current (state, round, detail), of the sites that have one."""
        rows = self.db.execute("SELECT site, state, round, detail FROM site_status ORDER BY site")
        return {str(site): (str(state), r, str(detail)) for site, state, r, detail in rows}

    def samples(self) -> list[tuple[int, str, str]]:
        """(round, prompt, continuation) of every passage written at an evaluation, oldest first."""
        return [
            (int(r), str(p), str(t))
            for r, p, t in self.db.execute("SELECT round, prompt, text FROM samples ORDER BY id")
        ]


class StoreSiteState:
    """Every simulated site's own state, in the run store (implements confide.client.state.SiteState)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def get(self, site: str, key: str) -> np.ndarray | None:
        return self.store.get_site_state(site, key)

    def put(self, site: str, key: str, round: int, vector: np.ndarray) -> None:
        self.store.put_site_state(site, key, round, vector)


def _next_change(db: sqlite3.Connection) -> int:
    """The next number of ``site_status.changed``: a reader asks for the rows changed after the last number
    it saw (times could repeat or go back)."""
    return int(db.execute("SELECT COALESCE(MAX(changed), 0) + 1 FROM site_status").fetchone()[0])


LOCK_WAIT = 600.0
"""Seconds a write waits for another's lock: the local backend's worker processes write their sites' state
into the same file, and on a busy machine a writer may be descheduled while it holds the lock (SQLite's
default of 5 s would fail the run)."""


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level="DEFERRED", timeout=LOCK_WAIT)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    return db


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
