"""Durable outbox for the MLflow sink: a small SQLite file that holds every point until MLflow
has acknowledged it, so evaluation never waits on MLflow and a restart loses nothing.

One row per thing to deliver: a metric point, a tag, a samples table, the run's params. Rows
are delivered in id order and never deleted, so the file doubles as an audit trail.

Delivery protocol (what makes "no point lost, none written twice" hold):

1. `mark_attempted` commits `attempts += 1` BEFORE the request is sent.
2. The request is sent; on success `mark_sent` commits `sent_at`.
3. A row with `attempts == 0` was certainly never sent. A row with `attempts > 0` and no
   `sent_at` may have landed (crash between 2 and 3, or a timeout after the server committed):
   the sender checks MLflow for it before re-sending (see sinks/mlflow.py).
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

METRIC = "metric"
TAG = "tag"
TABLE = "table"
PARAMS = "params"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    step INTEGER NOT NULL DEFAULT 0,
    ts INTEGER NOT NULL DEFAULT 0,
    value REAL,
    payload TEXT,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    sent_at REAL,
    failed TEXT,
    last_error TEXT,
    UNIQUE (kind, key, step, ts)
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (kind, id) WHERE sent_at IS NULL AND failed IS NULL;
CREATE TABLE IF NOT EXISTS runs (
    tracking_uri TEXT NOT NULL,
    experiment TEXT NOT NULL,
    run_name TEXT NOT NULL,
    run_id TEXT NOT NULL,
    PRIMARY KEY (tracking_uri, experiment, run_name)
);
"""


@dataclass(frozen=True)
class Row:
    id: int
    kind: str
    key: str
    step: int
    ts: int
    value: float | None
    payload: str | None
    attempts: int

    @property
    def maybe_sent(self) -> bool:
        return self.attempts > 0


class Outbox:
    """Thread-safe by construction: every call opens its own short-lived connection (sqlite3
    connections may not cross threads), WAL lets the writer and the flusher work side by side,
    and busy_timeout turns a momentary lock into a short wait instead of an error."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("PRAGMA synchronous=FULL")  # a point acknowledged by write() survives power loss
        return conn

    def add(self, rows: list[tuple[str, str, int, int, float | None, str | None]]) -> int:
        """Insert (kind, key, step, ts, value, payload) rows in one transaction; rows already present
        (same kind, key, step, ts: the same result written twice) are ignored. Returns new rows."""
        now = time.time()
        with closing(self._connect()) as conn:
            conn.execute("BEGIN IMMEDIATE")
            before = conn.total_changes
            conn.executemany(
                "INSERT OR IGNORE INTO outbox (kind, key, step, ts, value, payload, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(*r, now) for r in rows],
            )
            added = conn.total_changes - before
            conn.execute("COMMIT")
        return added

    def put_params(self, payload: str) -> None:
        """The run's params: one row, re-queued only when they change between starts."""
        with closing(self._connect()) as conn:
            conn.execute(
                "INSERT INTO outbox (kind, key, step, ts, payload, created_at) VALUES (?, 'params', 0, 0, ?, ?) "
                "ON CONFLICT (kind, key, step, ts) DO UPDATE SET payload = excluded.payload, sent_at = NULL, "
                "failed = NULL, attempts = 0 WHERE outbox.payload IS NOT excluded.payload",
                (PARAMS, payload, time.time()),
            )

    def requeue(self, kind: str) -> None:
        """Mark every row of `kind` undelivered again (for rows whose delivery is idempotent)."""
        self._update("UPDATE outbox SET sent_at = NULL WHERE kind = ? AND failed IS NULL", [(kind,)])

    def pending(self, kinds: tuple[str, ...], limit: int) -> list[Row]:
        marks = ",".join("?" * len(kinds))
        with closing(self._connect()) as conn:
            cur = conn.execute(
                "SELECT id, kind, key, step, ts, value, payload, attempts FROM outbox "
                f"WHERE sent_at IS NULL AND failed IS NULL AND kind IN ({marks}) ORDER BY id LIMIT ?",
                (*kinds, limit),
            )
            return [Row(*r) for r in cur.fetchall()]

    def _update(self, sql: str, params: list[tuple[object, ...]]) -> None:
        with closing(self._connect()) as conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(sql, params)
            conn.execute("COMMIT")

    def mark_attempted(self, rows: list[Row]) -> None:
        self._update("UPDATE outbox SET attempts = attempts + 1 WHERE id = ?", [(r.id,) for r in rows])

    def mark_sent(self, rows: list[Row]) -> None:
        now = time.time()
        self._update("UPDATE outbox SET sent_at = ?, last_error = NULL WHERE id = ?", [(now, r.id) for r in rows])

    def mark_error(self, rows: list[Row], error: str) -> None:
        self._update("UPDATE outbox SET last_error = ? WHERE id = ?", [(error, r.id) for r in rows])

    def mark_failed(self, row: Row, error: str) -> None:
        """MLflow refused this row for good (invalid value…): kept in the file, not resent."""
        self._update("UPDATE outbox SET failed = ?, last_error = ? WHERE id = ?", [(error, error, row.id)])

    def rename(self, row: Row, key: str) -> Row:
        self._update("UPDATE outbox SET key = ? WHERE id = ?", [(key, row.id)])
        return Row(row.id, row.kind, key, row.step, row.ts, row.value, row.payload, row.attempts)

    def counts(self) -> dict[str, int]:
        """{'pending': n, 'sent': n, 'failed': n} over all rows."""
        with closing(self._connect()) as conn:
            pending, sent, failed = conn.execute(
                "SELECT COALESCE(SUM(sent_at IS NULL AND failed IS NULL), 0), COALESCE(SUM(sent_at IS NOT NULL), 0), "
                "COALESCE(SUM(failed IS NOT NULL), 0) FROM outbox"
            ).fetchone()
        return {"pending": int(pending), "sent": int(sent), "failed": int(failed)}

    def failures(self) -> list[tuple[str, str, int, str]]:
        """(kind, key, step, error) of every row MLflow refused for good."""
        with closing(self._connect()) as conn:
            return conn.execute("SELECT kind, key, step, failed FROM outbox WHERE failed IS NOT NULL").fetchall()

    def cached_run(self, tracking_uri: str, experiment: str, run_name: str) -> str | None:
        with closing(self._connect()) as conn:
            row = conn.execute(
                "SELECT run_id FROM runs WHERE tracking_uri = ? AND experiment = ? AND run_name = ?",
                (tracking_uri, experiment, run_name),
            ).fetchone()
        return row[0] if row else None

    def cache_run(self, tracking_uri: str, experiment: str, run_name: str, run_id: str | None) -> None:
        with closing(self._connect()) as conn:
            if run_id is None:
                conn.execute(
                    "DELETE FROM runs WHERE tracking_uri = ? AND experiment = ? AND run_name = ?",
                    (tracking_uri, experiment, run_name),
                )
            else:
                conn.execute(
                    "INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?)", (tracking_uri, experiment, run_name, run_id)
                )


class FlushFileLock:
    """An flock on a file beside the outbox, held while one process sends its rows."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = -1

    def acquire(self, deadline: float | None) -> bool:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    os.close(self.fd)
                    self.fd = -1
                    return False
                time.sleep(0.05)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(frozen=True)
class FlushReport:
    sent: int
    pending: int
    failed: int
    error: str | None = None


def _report(box: Outbox, sent: int, error: str | None) -> FlushReport:
    counts = box.counts()
    return FlushReport(sent, counts["pending"], counts["failed"], error)


def exclusive_flush(box: Outbox, lock: threading.Lock, timeout: float | None,
                    deliver: Callable[[float | None], tuple[int, str | None]]) -> FlushReport:
    """Run `deliver(deadline) -> (sent, error)` as the only sender of `box`: one thread of this
    process (`lock`) and one process (an flock beside the outbox — a daemon beside `ckpt-watch
    eval` shares it, and two senders could re-send the same attempted-but-unconfirmed row)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    if not lock.acquire(timeout=-1 if timeout is None else timeout):
        return _report(box, 0, "a flush is already running")
    try:
        cross = FlushFileLock(box.path.with_name(box.path.name + ".flush-lock"))
        if not cross.acquire(deadline):
            return _report(box, 0, "another process is flushing this outbox")
        try:
            sent, error = deliver(deadline)
        finally:
            cross.release()
    finally:
        lock.release()
    return _report(box, sent, error)
