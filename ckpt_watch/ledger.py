"""The durable ledger: what was seen and what was evaluated, in one SQLite file.

One row per checkpoint (discovery state, snapshot, attempts) and one row per
(run, step, suite, suite-config hash) evaluation. A restart resumes from here: `running`
rows go back to `pending`; `done` is never redone unless the suite's config hash changes
or the user forces it.
"""

from __future__ import annotations

import enum
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ckpt_watch.core import utcnow

SCHEMA = """
CREATE TABLE IF NOT EXISTS checkpoints (
    run TEXT NOT NULL, step INTEGER NOT NULL, path TEXT, state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, error TEXT, snapshot TEXT, is_final INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL,
    PRIMARY KEY (run, step)
);
CREATE TABLE IF NOT EXISTS evals (
    run TEXT NOT NULL, step INTEGER NOT NULL, suite TEXT NOT NULL, suite_hash TEXT NOT NULL,
    state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, error TEXT,
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL, started_at TEXT, finished_at TEXT,
    PRIMARY KEY (run, step, suite, suite_hash)
);
CREATE INDEX IF NOT EXISTS evals_state ON evals (run, state, step);
"""


class CkptState(enum.StrEnum):
    SEEN = "seen"  # found, not yet complete
    READY = "ready"  # complete and snapshotted
    FAILED = "failed"  # invalid after max attempts, or refused
    VANISHED = "vanished"  # rotated away before its snapshot


class EvalState(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class EvalRow:
    run: str
    step: int
    suite: str
    suite_hash: str
    state: EvalState
    attempts: int
    error: str | None
    updated_at: str
    finished_at: str | None
    started_at: str | None = None  # when the latest attempt began (set by eval_row)


@dataclass(frozen=True)
class CkptRow:
    run: str
    step: int
    path: str | None
    state: CkptState
    attempts: int
    error: str | None
    snapshot: str | None
    is_final: bool


class Ledger:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- recovery -------------------------------------------------------------------------

    def recover(self) -> int:
        """After a crash or kill: evaluations left `running` go back to `pending`."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE evals SET state=?, updated_at=? WHERE state=?",
                (EvalState.PENDING, utcnow(), EvalState.RUNNING),
            )
            return cur.rowcount

    # -- checkpoints ----------------------------------------------------------------------

    def checkpoint(self, run: str, step: int) -> CkptRow | None:
        with self._lock:
            r = self._db.execute(
                "SELECT run, step, path, state, attempts, error, snapshot, is_final FROM checkpoints "
                "WHERE run=? AND step=?",
                (run, step),
            ).fetchone()
        return CkptRow(r[0], r[1], r[2], CkptState(r[3]), r[4], r[5], r[6], bool(r[7])) if r else None

    def checkpoints(self, run: str) -> list[CkptRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT run, step, path, state, attempts, error, snapshot, is_final FROM checkpoints "
                "WHERE run=? ORDER BY step",
                (run,),
            ).fetchall()
        return [CkptRow(r[0], r[1], r[2], CkptState(r[3]), r[4], r[5], r[6], bool(r[7])) for r in rows]

    def set_checkpoint(
        self,
        run: str,
        step: int,
        state: CkptState,
        *,
        path: str | None = None,
        attempts: int | None = None,
        error: str | None = None,
        snapshot: str | None = None,
        is_final: bool = False,
    ) -> None:
        now = utcnow()
        with self._tx() as db:
            db.execute(
                "INSERT INTO checkpoints (run, step, path, state, attempts, error, snapshot, is_final, "
                "created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT (run, step) DO UPDATE SET path=coalesce(excluded.path, path), state=excluded.state, "
                "attempts=coalesce(?, attempts), error=excluded.error, snapshot=coalesce(excluded.snapshot, snapshot), "
                "is_final=excluded.is_final OR is_final, updated_at=excluded.updated_at",
                (run, step, path, state, attempts or 0, error, snapshot, int(is_final), now, now, attempts),
            )

    # -- evaluations ----------------------------------------------------------------------

    def add_eval(self, run: str, step: int, suite: str, suite_hash: str, state: EvalState,
                 error: str | None = None) -> bool:
        """Insert the row if it is new; returns whether it was inserted."""
        now = utcnow()
        with self._tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO evals (run, step, suite, suite_hash, state, error, created_at, updated_at) "
                "VALUES (?,?,?,?,?,?,?,?)",
                (run, step, suite, suite_hash, state, error, now, now),
            )
            return cur.rowcount == 1

    def set_eval(self, run: str, step: int, suite: str, suite_hash: str, state: EvalState,
                 error: str | None = None) -> None:
        now = utcnow()
        sets = ["state=?", "error=?", "updated_at=?"]
        args: list[object] = [state, error, now]
        if state is EvalState.RUNNING:
            sets += ["attempts=attempts+1", "started_at=?"]
            args.append(now)
        if state in (EvalState.DONE, EvalState.FAILED):
            sets.append("finished_at=?")
            args.append(now)
        with self._tx() as db:
            db.execute(
                f"UPDATE evals SET {', '.join(sets)} WHERE run=? AND step=? AND suite=? AND suite_hash=?",
                (*args, run, step, suite, suite_hash),
            )

    def evals(self, run: str, state: EvalState | None = None) -> list[EvalRow]:
        q = ("SELECT run, step, suite, suite_hash, state, attempts, error, updated_at, finished_at "
             "FROM evals WHERE run=?")
        args: list[object] = [run]
        if state is not None:
            q += " AND state=?"
            args.append(state)
        with self._lock:
            rows = self._db.execute(q + " ORDER BY step, suite", args).fetchall()
        return [EvalRow(r[0], r[1], r[2], r[3], EvalState(r[4]), r[5], r[6], r[7], r[8]) for r in rows]

    def pending_keys(self, run: str) -> list[tuple[int, str, str]]:
        """(step, suite, suite_hash) of every pending evaluation, by step then suite: what the
        scheduler needs, without building a full row for each (the daemon asks every loop)."""
        with self._lock:
            return self._db.execute(
                "SELECT step, suite, suite_hash FROM evals WHERE run=? AND state=? ORDER BY step, suite",
                (run, EvalState.PENDING),
            ).fetchall()

    def pending_steps(self, run: str, suites: Iterable[tuple[str, str]]) -> list[int]:
        """Distinct steps with a pending evaluation of one of these (suite, suite_hash) pairs."""
        pairs = list(suites)
        if not pairs:
            return []
        values = ",".join(["(?,?)"] * len(pairs))
        with self._lock:
            rows = self._db.execute(
                f"SELECT DISTINCT step FROM evals WHERE run=? AND state=? AND (suite, suite_hash) IN (VALUES {values})",
                (run, EvalState.PENDING, *(x for pair in pairs for x in pair)),
            ).fetchall()
        return [r[0] for r in rows]

    def eval_row(self, run: str, step: int, suite: str, suite_hash: str) -> EvalRow | None:
        with self._lock:
            r = self._db.execute(
                "SELECT run, step, suite, suite_hash, state, attempts, error, updated_at, finished_at, started_at "
                "FROM evals WHERE run=? AND step=? AND suite=? AND suite_hash=?",
                (run, step, suite, suite_hash),
            ).fetchone()
        return EvalRow(r[0], r[1], r[2], r[3], EvalState(r[4]), r[5], r[6], r[7], r[8], r[9]) if r else None

    def force(self, run: str) -> int:
        """--force: every finished or failed evaluation of the run is due again."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE evals SET state=?, attempts=0, error=NULL, updated_at=? WHERE run=? AND state IN (?,?)",
                (EvalState.PENDING, utcnow(), run, EvalState.DONE, EvalState.FAILED),
            )
            return cur.rowcount

    def runs(self) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT run FROM checkpoints UNION SELECT run FROM evals ORDER BY 1"
            ).fetchall()
        return [r[0] for r in rows]
