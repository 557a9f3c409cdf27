"""The SQLite ledger and the scheduler, on a real ledger file."""

from __future__ import annotations

from ckpt_watch.config import SchedulerConfig, parse_config
from ckpt_watch.ledger import CkptState, EvalState, Ledger
from ckpt_watch.scheduler import Scheduler, due_reason


def _suites(**blocks):
    return parse_config({"base_model": "x", "suites": blocks}).suites


def test_due_rules_and_skip_reasons():
    s = _suites(h={"type": "heldout_loss", "every": 100})["h"]
    assert due_reason(s, 0, False) is None
    assert due_reason(s, 200, False) is None
    assert "not a multiple of every=100" in due_reason(s, 150, False)
    assert due_reason(s, 150, True) is None  # at_final
    s2 = _suites(h={"type": "heldout_loss", "every": 100, "at_final": False, "base": False})["h"]
    assert due_reason(s2, 150, True) is not None
    assert due_reason(s2, 0, False) == "suite has base: false"


def test_order_newest_backfills_and_base_goes_first(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    suites = _suites(h={"type": "heldout_loss"})
    sched = Scheduler(ledger, "r", suites, SchedulerConfig(order="newest"))
    sched.plan_base()
    for step in (10, 20, 30):
        sched.plan(step, False)
    assert sched.next_step({0, 10, 20, 30}) == 0
    h = sched.suites["h"].hash
    ledger.set_eval("r", 0, "h", h, EvalState.DONE)
    assert sched.next_step({0, 10, 20, 30}) == 30
    ledger.set_eval("r", 30, "h", h, EvalState.DONE)
    assert sched.next_step({0, 10, 20}) == 20
    oldest = Scheduler(ledger, "r", suites, SchedulerConfig(order="oldest"))
    assert oldest.next_step({0, 10, 20}) == 10
    # a step whose adapter is not available yet is not picked
    assert oldest.next_step({0, 20}) == 20


def test_skipped_rows_are_recorded_with_reason(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    sched = Scheduler(ledger, "r", _suites(h={"type": "heldout_loss", "every": 20}), SchedulerConfig())
    assert sched.plan(10, False) == 0
    assert sched.plan(20, False) == 1
    rows = {r.step: r for r in ledger.evals("r")}
    assert rows[10].state is EvalState.SKIPPED and "every=20" in rows[10].error
    assert rows[20].state is EvalState.PENDING


def test_restart_recovers_running_and_never_redoes_done(tmp_path):
    path = tmp_path / "l.sqlite"
    ledger = Ledger(path)
    suites = _suites(h={"type": "heldout_loss"})
    sched = Scheduler(ledger, "r", suites, SchedulerConfig())
    sched.plan(10, False)
    sched.plan(20, False)
    h = sched.suites["h"].hash
    ledger.set_eval("r", 10, "h", h, EvalState.RUNNING)
    ledger.set_eval("r", 10, "h", h, EvalState.DONE)
    ledger.set_eval("r", 20, "h", h, EvalState.RUNNING)
    ledger.close()  # as if the process were killed here

    ledger = Ledger(path)
    assert ledger.recover(["other-run"]) == 0  # only the lock holder's own run is touched
    assert ledger.recover(["r"]) == 1
    sched = Scheduler(ledger, "r", suites, SchedulerConfig())
    assert sched.plan(10, False) == 0  # done stays done
    assert set(sched.pending()) == {20}
    assert ledger.eval_row("r", 20, "h", h).attempts == 1

    # a changed suite config is a new hash: step 10 is due again under it
    changed = _suites(h={"type": "heldout_loss", "max_texts": 2})
    sched2 = Scheduler(ledger, "r", changed, SchedulerConfig())
    assert sched2.suites["h"].hash != h
    assert sched2.plan(10, False) == 1
    # ... and its results carry another name, so two configurations never share one series
    assert (sched.suites["h"].key, sched2.suites["h"].key) == ("h", "h.v2")
    assert Scheduler(ledger, "r", suites, SchedulerConfig()).suites["h"].key == "h"  # stable
    # changing only *when* a suite runs keeps the hash
    assert _suites(h={"type": "heldout_loss", "every": 5})["h"].config_hash() == h
    # --force
    assert ledger.force("r") == 1
    assert ledger.eval_row("r", 10, "h", h).state is EvalState.PENDING


def test_checkpoint_rows(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.set_checkpoint("r", 5, CkptState.SEEN, path="/x/checkpoint-5", attempts=1, error="bad json")
    ledger.set_checkpoint("r", 5, CkptState.READY, snapshot="/snap", is_final=True)
    row = ledger.checkpoint("r", 5)
    assert row.state is CkptState.READY and row.path == "/x/checkpoint-5" and row.attempts == 1
    assert row.snapshot == "/snap" and row.is_final and row.error is None


def test_claim_is_atomic_across_connections(tmp_path):
    """Two processes on one ledger (a daemon and `ckpt-watch eval`): exactly one claim wins."""
    path = tmp_path / "l.sqlite"
    a, b = Ledger(path), Ledger(path)
    a.add_eval("r", 4, "s", "h1", EvalState.PENDING)
    assert a.claim("r", 4, "s", "h1") is True
    assert b.claim("r", 4, "s", "h1") is False
    row = b.eval_row("r", 4, "s", "h1")
    assert row.state is EvalState.RUNNING and row.attempts == 1
    a.release("r", 4, "s", "h1", "interrupted by shutdown")
    row = b.eval_row("r", 4, "s", "h1")
    assert row.state is EvalState.PENDING and row.attempts == 0  # a release is not an attempt
    assert b.claim("r", 4, "s", "h1") is True and a.claim("r", 4, "s", "h1") is False


def test_trainings_and_stale_lookup(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    assert ledger.current_run("out-ab12cd") == "out-ab12cd"
    ledger.set_checkpoint("out-ab12cd", 10, CkptState.READY, sha256="aaa", weights_stat="5:1")
    assert ledger.new_training("out-ab12cd", "checkpoint-10 changed") == "out-ab12cd-t2"
    assert ledger.current_run("out-ab12cd") == "out-ab12cd-t2"
    assert [r for _g, r, _w in ledger.trainings("out-ab12cd")] == ["out-ab12cd", "out-ab12cd-t2"]
    assert ledger.find_by_sha(["out-ab12cd"], 10, "aaa").run == "out-ab12cd"
    assert ledger.find_by_sha(["out-ab12cd"], 10, "bbb") is None
    ledger.add_eval("out-ab12cd", 10, "s", "h", EvalState.PENDING)
    assert ledger.skip_pending("out-ab12cd", "superseded") == 1


def test_old_ledger_file_is_migrated(tmp_path):
    """A ledger written by the first release (no fingerprint columns) opens and gains them."""
    import sqlite3

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""
CREATE TABLE checkpoints (run TEXT NOT NULL, step INTEGER NOT NULL, path TEXT, state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, error TEXT, snapshot TEXT, is_final INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL, PRIMARY KEY (run, step));
INSERT INTO checkpoints VALUES ('r', 2, '/x/checkpoint-2', 'ready', 0, NULL, '/snap', 0, 't', 't');
""")
    db.close()
    ledger = Ledger(path)
    row = ledger.checkpoint("r", 2)
    assert row.state is CkptState.READY and row.sha256 is None and row.weights_stat is None
    ledger.set_checkpoint("r", 2, CkptState.READY, sha256="abc")
    assert ledger.checkpoint("r", 2).sha256 == "abc"


def test_recover_leaves_a_live_guests_rows_alone(tmp_path):
    """A daemon restarting beside a live `ckpt-watch eval` must not take back the rows the eval is
    running; the rows of a process that is gone are pending again (its owner mark is free)."""
    import subprocess
    import sys

    from ckpt_watch.locking import OwnerMark, owner_alive

    path = tmp_path / "l.sqlite"
    ledger = Ledger(path)
    for step in (2, 4):
        ledger.add_eval("r", step, "s", "h", EvalState.PENDING)
    live = OwnerMark.acquire(tmp_path)  # this process: alive
    # a real other process takes an owner mark and dies (SIGKILL: its flock goes with it)
    code = ("import sys; from pathlib import Path; from ckpt_watch.locking import OwnerMark; "
            "m = OwnerMark.acquire(Path(sys.argv[1])); print(m.owner, flush=True); import os; os.kill(os.getpid(), 9)")
    dead = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True).stdout.strip()
    assert dead and owner_alive(tmp_path, live.owner) and not owner_alive(tmp_path, dead)
    assert ledger.claim("r", 2, "s", "h", owner=live.owner) and ledger.claim("r", 4, "s", "h", owner=dead)
    owners = ledger.running_owners(["r"])
    assert owners == {live.owner, dead}
    gone = [o for o in owners if not owner_alive(tmp_path, o)]
    assert ledger.recover(["r"], gone) == 1
    assert ledger.eval_row("r", 2, "s", "h").state is EvalState.RUNNING  # the live one's
    assert ledger.eval_row("r", 4, "s", "h").state is EvalState.PENDING
    live.release(tmp_path)


def test_release_restores_the_previous_start(tmp_path):
    """An attempt released without a result must not hide the earlier attempt's start: the crash
    redelivery compares the written result's start with it."""
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.add_eval("r", 2, "s", "h", EvalState.PENDING)
    ledger.claim("r", 2, "s", "h")
    first = ledger.eval_row("r", 2, "s", "h").started_at
    ledger.recover(["r"])  # the process died after writing its result
    ledger.claim("r", 2, "s", "h")
    ledger.release("r", 2, "s", "h", "interrupted by shutdown", first)
    row = ledger.eval_row("r", 2, "s", "h")
    assert (row.state, row.attempts, row.started_at) == (EvalState.PENDING, 1, first)
    ledger.claim("r", 2, "s", "h")
    ledger.release("r", 2, "s", "h", "engine died", first, count_attempt=True)
    assert ledger.eval_row("r", 2, "s", "h").attempts == 2


def test_two_processes_cannot_start_two_new_trainings(tmp_path):
    a, b = Ledger(tmp_path / "l.sqlite"), Ledger(tmp_path / "l.sqlite")
    assert a.new_training("w", "changed", after="w") == "w-t2"
    assert b.new_training("w", "changed too", after="w") == "w-t2"  # saw the old run: gets the one started
    assert [r for _g, r, _why in b.trainings("w")] == ["w", "w-t2"]


def test_migrated_ledger_keeps_the_plain_key_for_the_old_configuration(tmp_path):
    """Results logged before suite versions existed keep their series: the oldest configuration is v1."""
    import sqlite3

    path = tmp_path / "l.sqlite"
    ledger = Ledger(path)
    ledger.add_eval("r", 0, "s", "old", EvalState.DONE)
    ledger.add_eval("r", 0, "s", "new", EvalState.DONE)
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM suite_versions")  # as a ledger of the first release
        db.execute("UPDATE evals SET created_at='2026-01-01' WHERE suite_hash='old'")
    ledger.close()
    ledger = Ledger(path)
    assert ledger.suite_version("r", "s", "old") == 1 and ledger.suite_version("r", "s", "new") == 2
