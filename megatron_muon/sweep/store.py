"""The results store of a sweep or study: one SQLite file, one row per trial, safe against crashes.

Every state change is one transaction in WAL mode with synchronous=FULL, so a runner killed at any instant
leaves the file consistent: a trial is pending, running (with the job that runs it), done, diverged or failed,
never half of one. The store remembers the config it was created for (a canonical-JSON fingerprint); opening it
for a different config is refused before anything is written. One runner at a time holds an exclusive lock
(flock on a sibling .lock file); readers (the report) need no lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SCHEMA_VERSION = 1
STATUSES = ("pending", "running", "done", "diverged", "failed")
FINISHED = ("done", "diverged")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS stages (
    stage INTEGER PRIMARY KEY,
    width INTEGER NOT NULL,
    log_centre TEXT NOT NULL,      -- JSON list: the grid centre in log space, fixed once the stage exists
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS trials (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,      -- identity of the trial within the sweep, e.g. telescope/s1/lr-1/wd+3
    kind TEXT NOT NULL,            -- telescope, brute_force or batch
    stage INTEGER,
    width INTEGER,
    params TEXT NOT NULL,          -- JSON: every field the trial command is rendered from
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'diverged', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    job_id TEXT,                   -- backend:id of the attempt in flight or last run
    final_loss REAL,
    smoothed_loss REAL,
    tokens INTEGER,
    wall_s REAL,
    tokens_per_second REAL,
    curve TEXT,                    -- JSON [[tokens, loss], ...]
    run_dir TEXT,
    log_path TEXT,
    error TEXT,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS trials_by_stage ON trials (kind, stage, status);
"""


class StoreError(RuntimeError):
    pass


class StoreMismatch(StoreError):
    pass


class StoreLocked(StoreError):
    pass


def fingerprint(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _config_differences(stored: dict, given: dict) -> list[str]:
    keys = sorted(set(stored) | set(given))
    return [f"{k}: store has {stored.get(k)!r}, command gives {given.get(k)!r}"
            for k in keys if stored.get(k) != given.get(k)]


@dataclass(frozen=True)
class TrialSpec:
    key: str
    kind: str
    stage: int | None
    width: int | None
    params: dict


@dataclass(frozen=True)
class Trial:
    id: int
    key: str
    kind: str
    stage: int | None
    width: int | None
    params: dict
    status: str
    attempts: int
    job_id: str | None
    final_loss: float | None
    smoothed_loss: float | None
    tokens: int | None
    wall_s: float | None
    tokens_per_second: float | None
    curve: list | None
    run_dir: str | None
    log_path: str | None
    error: str | None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def objective(self, name: str) -> float:
        """The loss a sweep minimises; diverged runs (stored as NULL) count as infinitely bad."""
        value = self.final_loss if name == "final" else self.smoothed_loss
        return math.inf if value is None else value


class ResultStore:
    """Open (or create) the store at `path` for `config`; `config=None` opens an existing store read-only-ish,
    accepting whatever config it holds (the report's use)."""

    def __init__(self, path: Path | str, config: dict | None = None):
        self.path = Path(path)
        self._lock_file = None
        # An empty file is what sqlite3.connect leaves behind when it merely opened the path: nothing to protect.
        exists = self.path.exists() and self.path.stat().st_size > 0
        if not exists and config is None:
            raise StoreError(f"no store at {self.path}")
        if exists:
            self._check_is_store()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        if exists:
            self.config = self._load_config(config)
        else:
            self._create(config)
            self.config = config

    def _check_is_store(self) -> None:
        with open(self.path, "rb") as f:
            if f.read(16) != b"SQLite format 3\x00":
                raise StoreError(f"{self.path} is not an SQLite file; refusing to touch it")

    def _create(self, config: dict) -> None:
        with self._transaction():
            # One statement at a time: executescript would commit the open transaction first.
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._conn.execute(statement)
            self._conn.executemany(
                "INSERT OR IGNORE INTO meta VALUES (?, ?)",
                [("schema_version", str(SCHEMA_VERSION)), ("config", json.dumps(config, sort_keys=True)),
                 ("fingerprint", fingerprint(config)), ("created_at", str(time.time()))],
            )
        # Another process may have created it first with a different config: check what is really there.
        self._load_config(config)

    def _load_config(self, config: dict | None) -> dict:
        try:
            meta = dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path} is not a sweep store ({e})") from None
        if "config" not in meta or "fingerprint" not in meta:
            raise StoreError(f"{self.path} is not a sweep store (no config recorded)")
        if int(meta.get("schema_version", -1)) != SCHEMA_VERSION:
            raise StoreError(f"{self.path} has schema version {meta.get('schema_version')}, "
                             f"this code reads {SCHEMA_VERSION}")
        stored = json.loads(meta["config"])
        if config is not None and meta["fingerprint"] != fingerprint(config):
            raise StoreMismatch(
                f"{self.path} belongs to a different sweep config (fingerprint {meta['fingerprint']}, command's "
                f"{fingerprint(config)}); use another --store or the original command. Differences:\n  "
                + "\n  ".join(_config_differences(stored, config))
            )
        return stored

    def _transaction(self):
        return _Transaction(self._conn)

    def close(self) -> None:
        self.release_lock()
        self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the one-runner lock --------------------------------------------------------------------------------

    def acquire_lock(self) -> None:
        lock_path = self.path.with_name(self.path.name + ".lock")
        handle = open(lock_path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise StoreLocked(f"another runner ({holder}) is using {self.path}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {os.uname().nodename}")
        handle.flush()
        self._lock_file = handle

    def release_lock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    # -- stages ---------------------------------------------------------------------------------------------

    def stage_centre(self, stage: int) -> tuple[float, ...] | None:
        row = self._conn.execute("SELECT log_centre FROM stages WHERE stage = ?", (stage,)).fetchone()
        return None if row is None else tuple(json.loads(row[0]))

    def fix_stage(self, stage: int, width: int, log_centre: tuple[float, ...], trials: Iterable[TrialSpec]) -> None:
        """Record a stage's centre and its trials in one transaction: a crash leaves both or neither."""
        with self._transaction():
            self._conn.execute("INSERT INTO stages VALUES (?, ?, ?, ?)",
                               (stage, width, json.dumps(list(log_centre)), time.time()))
            self._insert(trials)

    # -- trials ---------------------------------------------------------------------------------------------

    def add_trials(self, trials: Iterable[TrialSpec]) -> None:
        """Insert trials not yet known (by key); known ones keep their state."""
        with self._transaction():
            self._insert(trials)

    def _insert(self, trials: Iterable[TrialSpec]) -> None:
        now = time.time()
        self._conn.executemany(
            "INSERT OR IGNORE INTO trials (key, kind, stage, width, params, status, updated_at) "
            "VALUES (?, ?, ?, ?, ?, 'pending', ?)",
            [(t.key, t.kind, t.stage, t.width, json.dumps(t.params, sort_keys=True), now) for t in trials],
        )

    def trials(self, kind: str | None = None, stage: int | None = None, status: str | None = None,
               keys: Iterable[str] | None = None) -> list[Trial]:
        clauses, values = [], []
        for column, value in (("kind", kind), ("stage", stage), ("status", status)):
            if value is not None:
                clauses.append(f"{column} = ?")
                values.append(value)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = [self._trial(r) for r in self._conn.execute(f"SELECT * FROM trials{where} ORDER BY id", values)]
        if keys is not None:
            wanted = set(keys)
            rows = [t for t in rows if t.key in wanted]
        return rows

    def trial(self, trial_id: int) -> Trial:
        return self._trial(self._conn.execute("SELECT * FROM trials WHERE id = ?", (trial_id,)).fetchone())

    @staticmethod
    def _trial(row: sqlite3.Row) -> Trial:
        d = dict(row)
        d.pop("updated_at")
        d["params"] = json.loads(d["params"])
        d["curve"] = None if d["curve"] is None else json.loads(d["curve"])
        return Trial(**d)

    def _update(self, trial_id: int, expected_status: tuple[str, ...], **columns) -> None:
        with self._transaction():
            self._update_in(trial_id, expected_status, **columns)

    def mark_running(self, trial_id: int, run_dir: str, log_path: str) -> None:
        """Before the backend starts the attempt: a crash right after leaves a running trial with no job id,
        which the next runner harvests from run_dir or puts back to pending."""
        with self._transaction():
            self._conn.execute("UPDATE trials SET attempts = attempts + 1 WHERE id = ?", (trial_id,))
            self._update_in(trial_id, ("pending",), status="running", job_id=None, run_dir=run_dir,
                            log_path=log_path, error=None)

    def set_jobs(self, trial_jobs: Iterable[tuple[int, str]]) -> None:
        with self._transaction():
            for trial_id, job_id in trial_jobs:
                self._update_in(trial_id, ("running",), job_id=job_id)

    def _update_in(self, trial_id: int, expected_status: tuple[str, ...], **columns) -> None:
        """Set `columns` inside the open transaction, only if the trial is in one of `expected_status`."""
        columns["updated_at"] = time.time()
        assignments = ", ".join(f"{c} = ?" for c in columns)
        marks = ", ".join("?" * len(expected_status))
        cursor = self._conn.execute(
            f"UPDATE trials SET {assignments} WHERE id = ? AND status IN ({marks})",
            (*columns.values(), trial_id, *expected_status),
        )
        if cursor.rowcount != 1:
            raise StoreError(f"trial {trial_id} is not in state {expected_status}; another runner?")

    def mark_finished(self, trial_id: int, *, final_loss: float, smoothed_loss: float, tokens: int, wall_s: float,
                      tokens_per_second: float, curve: list) -> None:
        diverged = not (math.isfinite(final_loss) and math.isfinite(smoothed_loss))
        self._update(
            trial_id, ("running",),
            status="diverged" if diverged else "done",
            final_loss=final_loss if math.isfinite(final_loss) else None,
            smoothed_loss=smoothed_loss if math.isfinite(smoothed_loss) else None,
            tokens=tokens, wall_s=wall_s, tokens_per_second=tokens_per_second,
            curve=json.dumps([[t, v if math.isfinite(v) else None] for t, v in curve]),
        )

    def mark_attempt_failed(self, trial_id: int, error: str, give_up: bool) -> None:
        self._update(trial_id, ("running",), status="failed" if give_up else "pending", error=error)

    def requeue(self, trial_id: int, reason: str) -> None:
        """An attempt that was interrupted (not the trial's fault): back to pending."""
        self._update(trial_id, ("running",), status="pending", error=reason)

    def retry_failed(self, trial_ids: Iterable[int]) -> None:
        with self._transaction():
            for trial_id in trial_ids:
                self._update_in(trial_id, ("failed",), status="pending")

    def integrity_ok(self) -> bool:
        return self._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception (the connection runs in autocommit mode)."""

    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn

    def __enter__(self):
        self._conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb):
        self._conn.execute("ROLLBACK" if exc_type else "COMMIT")
