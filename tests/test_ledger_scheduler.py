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
    assert ledger.recover() == 1
    sched = Scheduler(ledger, "r", suites, SchedulerConfig())
    assert sched.plan(10, False) == 0  # done stays done
    assert set(sched.pending()) == {20}
    assert ledger.eval_row("r", 20, "h", h).attempts == 1

    # a changed suite config is a new hash: step 10 is due again under it
    changed = _suites(h={"type": "heldout_loss", "max_texts": 2})
    sched2 = Scheduler(ledger, "r", changed, SchedulerConfig())
    assert sched2.suites["h"].hash != h
    assert sched2.plan(10, False) == 1
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
