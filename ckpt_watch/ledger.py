"""The durable ledger: what was seen and what was evaluated, in one SQLite file.

One row per checkpoint (discovery state, snapshot, the adapter's SHA-256, attempts) and one
row per (run, step, suite, suite-config hash) evaluation. A restart resumes from here:
`running` rows of the restarting process's own run go back to `pending`; `done` is never
redone unless the suite's config hash changes or the user forces it.

Several processes may open one ledger (a daemon, `ckpt-watch eval`, `run --once`): an
evaluation is taken with `claim()`, an atomic `UPDATE … WHERE state='pending'`, so only one
of them ever evaluates a row; `recover()` is called only by the holder of the run's lock
(ckpt_watch/locking.py).

Backlog (`scheduler.max_backlog`, ckpt_watch/scheduler.py): `trim_backlog()` turns the surplus of
a suite's pending rows into `skipped` in one write transaction, so a row another process has
claimed is never touched. Only rows the scheduler queued by itself and never attempted are
candidates: `pinned` rows (asked for by `ckpt-watch eval PATH` or `--force`) and rows with an
attempt (an interrupted attempt may already have delivered its result) are always kept.

Identity tables: `trainings` numbers the training runs seen in one watched folder (a known
step whose adapter fingerprint changed starts the next one, under its own run name) and
`suite_versions` numbers the configurations of each suite within a run, so two
configurations never share one result name or MLflow series.
"""

from __future__ import annotations

import enum
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
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
CREATE TABLE IF NOT EXISTS trainings (
    base_run TEXT NOT NULL, generation INTEGER NOT NULL, run TEXT NOT NULL, reason TEXT,
    created_at TEXT NOT NULL,
    PRIMARY KEY (base_run, generation)
);
CREATE TABLE IF NOT EXISTS schedules (
    run TEXT NOT NULL, suite TEXT NOT NULL, max_steps INTEGER NOT NULL, targets TEXT NOT NULL,
    created_at TEXT NOT NULL, spec TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (run, suite)
);
CREATE TABLE IF NOT EXISTS suite_versions (
    run TEXT NOT NULL, suite TEXT NOT NULL, suite_hash TEXT NOT NULL, version INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (run, suite, suite_hash)
);
"""
# columns added after the first release: (table, column, declaration)
_MIGRATIONS = (
    ("checkpoints", "sha256", "TEXT"),
    ("checkpoints", "weights_stat", "TEXT"),
    ("checkpoints", "epoch", "INTEGER"),
    ("evals", "owner", "TEXT"),
    ("evals", "pinned", "INTEGER NOT NULL DEFAULT 0"),  # asked for explicitly: the backlog policy keeps it
)
# the reason of every row the backlog policy (scheduler.max_backlog) skipped starts with this;
# `--force` makes exactly those skipped rows due again (not the ones a schedule said are not due)
BACKLOG_SKIP = "backlog: "


class CkptState(enum.StrEnum):
    SEEN = "seen"  # found, not yet complete
    READY = "ready"  # complete and snapshotted
    FAILED = "failed"  # invalid after max attempts, or refused
    VANISHED = "vanished"  # rotated away before its snapshot
    STALE = "stale"  # left over from an earlier training run in the same folder (same weights)


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
    sha256: str | None = None  # of the adapter weights file, computed while snapshotting
    weights_stat: str | None = None  # "size:mtime_ns" of the trainer's weights file at snapshot time
    epoch: int | None = None  # torchtune's epoch_N


_CKPT_COLS = "run, step, path, state, attempts, error, snapshot, is_final, sha256, weights_stat, epoch"


def _ckpt_row(r: tuple) -> CkptRow:
    return CkptRow(r[0], r[1], r[2], CkptState(r[3]), r[4], r[5], r[6], bool(r[7]), r[8], r[9], r[10])


def generation_run(base_run: str, generation: int) -> str:
    """The run name of the n-th training seen in one folder: the base name, then `<base>-t2`, …"""
    return base_run if generation <= 1 else f"{base_run}-t{generation}"


class Ledger:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Bring a ledger written by an earlier release up to date (inside one write transaction, so
        two processes opening it at once do not both alter it)."""
        with self._tx() as db:
            for table, column, decl in _MIGRATIONS:
                have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
            # suite configurations evaluated before versions existed: number them in order of first
            # use, so the oldest keeps the plain key its MLflow points already have
            if db.execute("SELECT count(*) FROM suite_versions").fetchone()[0] == 0:
                rows = db.execute("SELECT run, suite, suite_hash, min(created_at) FROM evals "
                                  "GROUP BY run, suite, suite_hash ORDER BY run, suite, 4").fetchall()
                seen: dict[tuple[str, str], int] = {}
                for run, suite, h, created in rows:
                    seen[(run, suite)] = seen.get((run, suite), 0) + 1
                    db.execute("INSERT INTO suite_versions VALUES (?,?,?,?,?)",
                               (run, suite, h, seen[(run, suite)], created))

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

    def recover(self, runs: Iterable[str], dead: Iterable[str] | None = None) -> int:
        """After a crash or kill: evaluations of these runs left `running` go back to `pending`.
        Only the holder of the runs' lock may call this. With `dead`, only rows claimed by those
        owners (processes known to be gone) or by no recorded owner are touched: a live guest's
        rows stay its own."""
        names = list(runs)
        if not names:
            return 0
        marks = ",".join("?" * len(names))
        sql = f"UPDATE evals SET state=?, updated_at=?, owner=NULL WHERE state=? AND run IN ({marks})"
        args: list[object] = [EvalState.PENDING, utcnow(), EvalState.RUNNING, *names]
        if dead is not None:
            gone = list(dead)
            sql += f" AND (owner IS NULL OR owner IN ({','.join('?' * len(gone)) or 'NULL'}))"
            args += gone
        with self._tx() as db:
            return db.execute(sql, args).rowcount

    # -- identity -------------------------------------------------------------------------

    def trainings(self, base_run: str) -> list[tuple[int, str, str | None]]:
        """(generation, run, reason) of every training run seen under this base name."""
        with self._lock:
            rows = self._db.execute(
                "SELECT generation, run, reason FROM trainings WHERE base_run=? ORDER BY generation", (base_run,)
            ).fetchall()
        return [(r[0], r[1], r[2]) for r in rows] or [(1, base_run, None)]

    def base_of(self, run: str) -> str:
        """The watched run a training run belongs to (itself for the first training)."""
        with self._lock:
            row = self._db.execute("SELECT base_run FROM trainings WHERE run=?", (run,)).fetchone()
        return row[0] if row else run

    def current_run(self, base_run: str) -> str:
        return self.trainings(base_run)[-1][1]

    def new_training(self, base_run: str, reason: str, after: str | None = None) -> str:
        """Record the next training run in the same folder; returns its run name. With `after` (the
        run the caller saw as current), a newer run someone else already started is returned instead."""
        now = utcnow()
        with self._tx() as db:
            last = db.execute("SELECT max(generation) FROM trainings WHERE base_run=?", (base_run,)).fetchone()[0]
            if last is None:
                db.execute("INSERT INTO trainings VALUES (?,?,?,?,?)", (base_run, 1, base_run, None, now))
                last = 1
            current = generation_run(base_run, last)
            if after is not None and current != after:
                return current
            run = generation_run(base_run, last + 1)
            db.execute("INSERT INTO trainings VALUES (?,?,?,?,?)", (base_run, last + 1, run, reason, now))
        return run

    def suite_version(self, run: str, suite: str, suite_hash: str) -> int:
        """1 for the first configuration of `suite` seen in `run`, 2 for the next, …; stable."""
        with self._tx() as db:
            row = db.execute("SELECT version FROM suite_versions WHERE run=? AND suite=? AND suite_hash=?",
                             (run, suite, suite_hash)).fetchone()
            if row:
                return int(row[0])
            last = db.execute("SELECT max(version) FROM suite_versions WHERE run=? AND suite=?",
                              (run, suite)).fetchone()[0]
            version = (last or 0) + 1
            db.execute("INSERT INTO suite_versions VALUES (?,?,?,?,?)", (run, suite, suite_hash, version, utcnow()))
        return version

    def schedule(self, run: str, suite: str, spec: str, max_steps: int | None = None,
                 targets: list[int] | None = None) -> tuple[int, list[int]] | None:
        """A percent schedule's resolved (max_steps, target steps) for the schedule `spec`, recorded
        the first time it is known and the same from then on; a new spec (edited `every`/`at`)
        replaces the record when its targets are given."""
        with self._tx() as db:
            row = db.execute("SELECT max_steps, targets, spec FROM schedules WHERE run=? AND suite=?",
                             (run, suite)).fetchone()
            if (row is None or row[2] != spec) and max_steps is not None and targets is not None:
                db.execute("INSERT OR REPLACE INTO schedules VALUES (?,?,?,?,?,?)",
                           (run, suite, max_steps, ",".join(map(str, targets)), utcnow(), spec))
                row = (max_steps, ",".join(map(str, targets)), spec)
        if row is None:
            return None
        return int(row[0]), [int(x) for x in row[1].split(",") if x]

    def schedule_max_steps(self, run: str) -> int | None:
        """max_steps recorded for any suite of the run (to re-resolve an edited schedule)."""
        with self._lock:
            row = self._db.execute("SELECT max(max_steps) FROM schedules WHERE run=?", (run,)).fetchone()
        return int(row[0]) if row and row[0] is not None else None

    def schedules(self, run: str) -> list[tuple[str, int, list[int]]]:
        """(suite, max_steps, target steps) of every resolved percent schedule of the run."""
        with self._lock:
            rows = self._db.execute("SELECT suite, max_steps, targets FROM schedules WHERE run=? ORDER BY suite",
                                    (run,)).fetchall()
        return [(r[0], int(r[1]), [int(x) for x in r[2].split(",") if x]) for r in rows]

    def suite_versions(self, run: str) -> list[tuple[str, str, int]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT suite, suite_hash, version FROM suite_versions WHERE run=? ORDER BY suite, version", (run,)
            ).fetchall()
        return [(r[0], r[1], r[2]) for r in rows]

    # -- checkpoints ----------------------------------------------------------------------

    def checkpoint(self, run: str, step: int) -> CkptRow | None:
        with self._lock:
            r = self._db.execute(f"SELECT {_CKPT_COLS} FROM checkpoints WHERE run=? AND step=?", (run, step)).fetchone()
        return _ckpt_row(r) if r else None

    def checkpoints(self, run: str) -> list[CkptRow]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_CKPT_COLS} FROM checkpoints WHERE run=? ORDER BY step",
                                    (run,)).fetchall()
        return [_ckpt_row(r) for r in rows]

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
        sha256: str | None = None,
        weights_stat: str | None = None,
        epoch: int | None = None,
    ) -> None:
        now = utcnow()
        with self._tx() as db:
            db.execute(
                "INSERT INTO checkpoints (run, step, path, state, attempts, error, snapshot, is_final, "
                "sha256, weights_stat, epoch, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT (run, step) DO UPDATE SET path=coalesce(excluded.path, path), state=excluded.state, "
                "attempts=coalesce(?, attempts), error=excluded.error, snapshot=coalesce(excluded.snapshot, snapshot), "
                "is_final=excluded.is_final OR is_final, sha256=coalesce(excluded.sha256, sha256), "
                "weights_stat=coalesce(excluded.weights_stat, weights_stat), epoch=coalesce(excluded.epoch, epoch), "
                "updated_at=excluded.updated_at",
                (run, step, path, state, attempts or 0, error, snapshot, int(is_final), sha256, weights_stat, epoch,
                 now, now, attempts),
            )

    def find_by_sha(self, runs: Iterable[str], step: int, sha256: str) -> CkptRow | None:
        """A checkpoint of one of these runs at `step` with exactly these weights."""
        for run in runs:
            row = self.checkpoint(run, step)
            if row is not None and row.sha256 == sha256:
                return row
        return None

    # -- evaluations ----------------------------------------------------------------------

    def add_eval(self, run: str, step: int, suite: str, suite_hash: str, state: EvalState,
                 error: str | None = None, *, pinned: bool = False) -> bool:
        """Insert the row if it is new; returns whether it was inserted. `pinned`: asked for
        explicitly, so the backlog policy never skips it (an existing pending row is pinned too)."""
        now = utcnow()
        with self._tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO evals (run, step, suite, suite_hash, state, error, created_at, updated_at, "
                "pinned) VALUES (?,?,?,?,?,?,?,?,?)",
                (run, step, suite, suite_hash, state, error, now, now, int(pinned)),
            )
            if cur.rowcount == 1:
                return True
            if pinned:
                db.execute("UPDATE evals SET pinned=1 WHERE run=? AND step=? AND suite=? AND suite_hash=? "
                           "AND state=?", (run, step, suite, suite_hash, EvalState.PENDING))
            return False

    def claim(self, run: str, step: int, suite: str, suite_hash: str, owner: str | None = None) -> bool:
        """Take a pending evaluation for this process (`owner`): pending → running (attempts + 1) in
        one statement, so of several processes on one ledger exactly one gets it."""
        now = utcnow()
        with self._tx() as db:
            cur = db.execute(
                "UPDATE evals SET state=?, attempts=attempts+1, started_at=?, updated_at=?, error=NULL, owner=? "
                "WHERE run=? AND step=? AND suite=? AND suite_hash=? AND state=?",
                (EvalState.RUNNING, now, now, owner, run, step, suite, suite_hash, EvalState.PENDING),
            )
            return cur.rowcount == 1

    def release(self, run: str, step: int, suite: str, suite_hash: str, error: str | None = None,
                previous_start: str | None = None, *, count_attempt: bool = False) -> None:
        """Give back a claimed evaluation that did not finish: pending, the attempt not counted
        (shutdown) or counted (the engine died), and the previous attempt's start restored — no
        result was written by this attempt, so the crash-redelivery check must keep using that one."""
        undo = 0 if count_attempt else 1
        with self._tx() as db:
            db.execute(
                "UPDATE evals SET state=?, attempts=max(attempts-?, 0), error=?, updated_at=?, started_at=?, "
                "owner=NULL WHERE run=? AND step=? AND suite=? AND suite_hash=? AND state=?",
                (EvalState.PENDING, undo, error, utcnow(), previous_start, run, step, suite, suite_hash,
                 EvalState.RUNNING),
            )

    def requeue(self, run: str, step: int, suite: str, suite_hash: str) -> None:
        """`eval --force` of one row: due again from scratch (no earlier result is redelivered), and
        pinned: asked for explicitly, the backlog policy does not skip it again."""
        with self._tx() as db:
            db.execute("UPDATE evals SET state=?, attempts=0, error=NULL, pinned=1, updated_at=? "
                       "WHERE run=? AND step=? AND suite=? AND suite_hash=? AND state<>?",
                       (EvalState.PENDING, utcnow(), run, step, suite, suite_hash, EvalState.RUNNING))

    def running_owners(self, runs: Iterable[str]) -> set[str]:
        names = list(runs)
        marks = ",".join("?" * len(names))
        with self._lock:
            rows = self._db.execute(f"SELECT DISTINCT owner FROM evals WHERE state=? AND run IN ({marks})",
                                    (EvalState.RUNNING, *names)).fetchall()
        return {r[0] for r in rows if r[0]}

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

    def skip_pending(self, run: str, reason: str) -> int:
        """Every pending evaluation of the run becomes skipped (e.g. superseded by a new training)."""
        with self._tx() as db:
            cur = db.execute("UPDATE evals SET state=?, error=?, updated_at=? WHERE run=? AND state=?",
                             (EvalState.SKIPPED, reason, utcnow(), run, EvalState.PENDING))
            return cur.rowcount

    def force(self, run: str) -> int:
        """--force: every finished or failed evaluation of the run, and every one the backlog policy
        skipped, is due again, pinned (the backlog policy leaves it alone from then on)."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE evals SET state=?, attempts=0, error=NULL, pinned=1, updated_at=? "
                "WHERE run=? AND (state IN (?,?) OR (state=? AND error LIKE ?))",
                (EvalState.PENDING, utcnow(), run, EvalState.DONE, EvalState.FAILED, EvalState.SKIPPED,
                 BACKLOG_SKIP + "%"),
            )
            return cur.rowcount

    # -- backlog (scheduler.max_backlog) ------------------------------------------------

    _BACKLOG_ROWS = "FROM evals WHERE run=? AND state=? AND step<>0 AND pinned=0 AND attempts=0"

    def backlog_counts(self, run: str) -> dict[tuple[str, str], int]:
        """(suite, suite_hash) → how many of its pending rows the backlog policy may skip: queued by
        the scheduler, never attempted, not the base model (step 0)."""
        with self._lock:
            rows = self._db.execute(f"SELECT suite, suite_hash, count(*) {self._BACKLOG_ROWS} "
                                    "GROUP BY suite, suite_hash", (run, EvalState.PENDING)).fetchall()
        return {(r[0], r[1]): r[2] for r in rows}

    def trim_backlog(self, run: str, suite: str, suite_hash: str,
                     choose: Callable[[list[int]], tuple[set[int], str]]) -> list[int]:
        """Skip what `choose` does not keep of this suite's backlog (its candidate steps, ascending;
        it returns the steps to keep and the reason, which must start with BACKLOG_SKIP), in one
        write transaction; returns the skipped steps."""
        with self._tx() as db:
            due = [r[0] for r in db.execute(f"SELECT step {self._BACKLOG_ROWS} AND suite=? AND suite_hash=? "
                                            "ORDER BY step", (run, EvalState.PENDING, suite, suite_hash))]
            keep, reason = choose(due)
            assert reason.startswith(BACKLOG_SKIP), reason
            drop = [s for s in due if s not in keep]
            now = utcnow()
            for step in drop:
                db.execute("UPDATE evals SET state=?, error=?, updated_at=? WHERE run=? AND step=? AND suite=? "
                           "AND suite_hash=? AND state=?",
                           (EvalState.SKIPPED, reason, now, run, step, suite, suite_hash, EvalState.PENDING))
        return drop

    def runs(self) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT run FROM checkpoints UNION SELECT run FROM evals ORDER BY 1"
            ).fetchall()
        return [r[0] for r in rows]
