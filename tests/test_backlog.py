"""The backlog policy (issue 15, item 3): `scheduler.max_backlog` checkpoints due per suite at most;
the surplus is skipped with the reason, keeping the newest, the final and an even spread.

Ledger-level tests build their rows through the scheduler's own API (`plan`, `next_step`) on a
real SQLite ledger; the end-to-end test runs `ckpt-watch run --once` on the real tiny LoRA run
(checkpoints 2, 4, 6) that other tests share.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ckpt_watch.config import SchedulerConfig, parse_config
from ckpt_watch.ledger import BACKLOG_SKIP, CkptState, EvalState, Ledger
from ckpt_watch.scheduler import Scheduler, backlog_keep, backlog_reason, spread
from tests.faults.harness import eval_states, metric_lines


def _suites(**blocks):
    return parse_config({"base_model": "x", "suites": blocks}).suites


def _plan(ledger: Ledger, steps, *, suites=None, final: int | None = None, **sched) -> Scheduler:
    """A scheduler over `steps` (each a READY checkpoint, `final` marked final), as discovery plans them."""
    sc = Scheduler(ledger, "r", suites or _suites(h={"type": "heldout_loss"}), SchedulerConfig(**sched))
    sc.plan_base()
    for step in steps:
        ledger.set_checkpoint("r", step, CkptState.READY, path=f"checkpoint-{step}", is_final=step == final)
        sc.plan(step, step == final)
    return sc


def _states(ledger: Ledger, suite: str = "h") -> dict[int, tuple[EvalState, str | None]]:
    return {r.step: (r.state, r.error) for r in ledger.evals("r") if r.suite == suite}


def _pending(ledger: Ledger, suite: str = "h") -> list[int]:
    return sorted(s for s, (state, _e) in _states(ledger, suite).items() if state is EvalState.PENDING)


def test_spread_is_even_by_index_with_both_ends():
    assert spread(6, 3) == [0, 3, 5]  # 2.5 rounds half up
    assert spread(10, 4) == [0, 3, 6, 9]
    assert spread(12, 4) == [0, 4, 7, 11]
    assert spread(5, 1) == [4]  # one slot: the newest
    assert spread(100, 2) == [0, 99]
    assert backlog_keep([1, 2, 3], 3) == {1, 2, 3}  # within the limit: all kept
    # a final checkpoint that is not the newest (checkpoints past max_steps) takes one slot
    assert backlog_keep([2, 4, 6, 8, 10], 3, finals={6}) == {2, 6, 10}
    assert backlog_keep([2, 4, 6, 8, 10], 3, finals={10}) == {2, 6, 10}


@pytest.mark.parametrize(("n", "limit", "kept"), [
    (5, 4, [1, 2, 4, 5]),
    (10, 4, [1, 4, 7, 10]),
    (12, 4, [1, 5, 8, 12]),
    (12, 3, [1, 7, 12]),
    (9, 2, [1, 9]),
    (7, 1, [7]),
    (4, 4, [1, 2, 3, 4]),  # not over the limit: nothing skipped
])
def test_backlog_keeps_exactly_these_steps(tmp_path, n, limit, kept):
    ledger = Ledger(tmp_path / "l.sqlite")
    sc = _plan(ledger, range(1, n + 1), final=n, max_backlog=limit)
    assert sc.next_step(set(range(n + 1))) == 0  # the base model still goes first, never counted
    assert _pending(ledger) == [0, *kept]
    skipped = {s: e for s, (state, e) in _states(ledger).items() if state is EvalState.SKIPPED}
    assert sorted(skipped) == sorted(set(range(1, n + 1)) - set(kept))
    reason = f"backlog: {n} checkpoints due > max_backlog {limit}; kept the newest, the final and an even spread"
    assert set(skipped.values()) <= {reason}
    assert reason == backlog_reason(n, limit)
    ledger.close()


def test_restart_and_rescan_keep_the_same_skipped_set(tmp_path):
    path = tmp_path / "l.sqlite"
    ledger = Ledger(path)
    sc = _plan(ledger, range(10, 130, 10), final=120, max_backlog=4)
    sc.next_step(set())
    before = _states(ledger)
    assert _pending(ledger) == [0, 10, 50, 80, 120]
    ledger.close()  # as if the daemon were killed here

    ledger = Ledger(path)  # restart: plan_known re-plans every checkpoint, the loop asks again
    sc = _plan(ledger, range(10, 130, 10), final=120, max_backlog=4)
    for _ in range(3):
        sc.next_step({0, 10, 50, 80, 120})
    assert _states(ledger) == before  # same states, same reasons: nothing un-skipped, nothing more cut
    # the base model done, the newest evaluated: what is left stays the kept subset
    h = sc.suites["h"].hash
    for step in (0, 120):
        assert ledger.claim("r", step, "h", h)
        ledger.set_eval("r", step, "h", h, EvalState.DONE)
    assert sc.next_step({10, 50, 80}) == 80
    assert _pending(ledger) == [10, 50, 80]
    ledger.close()


def test_off_by_default_changes_nothing(tmp_path):
    assert SchedulerConfig().max_backlog is None
    ledger = Ledger(tmp_path / "l.sqlite")
    sc = _plan(ledger, range(1, 31), final=30)
    assert sc.next_step(set(range(31))) == 0
    assert sc.enforce_backlog() == 0
    assert _pending(ledger) == list(range(31))
    assert not ledger.evals("r", EvalState.SKIPPED)
    ledger.close()


def test_only_due_rows_are_cut_per_suite_and_schedules_keep_their_reasons(tmp_path):
    """`every` and percent schedules decide what is due; the policy only thins that, per suite."""
    ledger = Ledger(tmp_path / "l.sqlite")
    suites = _suites(all={"type": "heldout_loss"}, every4={"type": "heldout_loss", "every": 40},
                     pct={"type": "heldout_loss", "every": "20%"})
    sc = _plan(ledger, range(10, 110, 10), suites=suites, final=100, max_backlog=3, max_steps=100)
    sc.next_step(set())
    # every checkpoint due: 10 of them → 3 kept
    assert _pending(ledger, "all") == [0, 10, 60, 100]
    # every: 40 → 40, 80 and the final 100 due: within the limit, untouched
    assert _pending(ledger, "every4") == [0, 40, 80, 100]
    assert "not a multiple of every=40" in _states(ledger, "every4")[50][1]
    # 20% of 100 steps → targets 20, 40, 60, 80, 100 due: 3 kept (ends and the middle one)
    assert _pending(ledger, "pct") == [0, 20, 60, 100]
    pct = _states(ledger, "pct")
    assert pct[40][1].startswith(BACKLOG_SKIP) and pct[80][1].startswith(BACKLOG_SKIP)
    assert pct[30][1].startswith("no schedule target")  # the schedule's own skips keep their reason
    ledger.close()


def test_force_makes_backlog_skips_due_again_and_pins_them(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    suites = _suites(h={"type": "heldout_loss"}, e={"type": "heldout_loss", "every": 3})
    sc = _plan(ledger, range(1, 9), suites=suites, max_backlog=2)
    sc.next_step(set())
    assert _pending(ledger) == [0, 1, 8]
    assert _pending(ledger, "e") == [0, 3, 6]  # 2 due: within the limit
    assert ledger.force("r") == 6  # steps 2..7 of `h`; `e`'s not-due rows are not backlog skips
    assert _pending(ledger) == list(range(9))
    assert _pending(ledger, "e") == [0, 3, 6]
    ledger.set_checkpoint("r", 9, CkptState.READY, path="checkpoint-9")
    sc.plan(9, False)  # a new checkpoint: the forced (pinned) rows are not counted or cut …
    sc.next_step(set())
    # … but the scheduler's own 1, 8 and 9 are 3 > 2: the ends 1 and 9 stay
    assert _pending(ledger) == [0, 1, 2, 3, 4, 5, 6, 7, 9]
    assert _states(ledger)[8][1] == backlog_reason(3, 2)
    ledger.close()


def test_explicit_and_attempted_rows_are_never_cut(tmp_path):
    """`ckpt-watch eval PATH` pins its rows; a row with an attempt (left by a crash, maybe with its
    result already delivered) is not skipped either: the exactly-once redelivery needs it."""
    ledger = Ledger(tmp_path / "l.sqlite")
    sc = _plan(ledger, range(1, 4), max_backlog=2)
    h = sc.suites["h"].hash
    assert ledger.claim("r", 2, "h", h, owner="gone")  # then the process dies
    assert ledger.recover(["r"]) == 1
    assert ledger.add_eval("r", 50, "h", h, EvalState.PENDING, pinned=True)  # `eval checkpoint-50`
    assert not ledger.add_eval("r", 3, "h", h, EvalState.PENDING, pinned=True)  # `eval checkpoint-3`: pinned
    for step in range(4, 7):
        sc.plan(step, False)
    sc.next_step(set())
    # candidates 1, 4, 5, 6 → 1 and 6 kept; 2 (attempted), 3 and 50 (pinned) kept on top
    assert _pending(ledger) == [0, 1, 2, 3, 6, 50]
    ledger.close()


@pytest.mark.slow
def test_run_once_on_a_real_run_evaluates_the_kept_steps(tmp_path, tiny_run, tiny_base):
    """The real tiny LoRA run (checkpoints 2, 4, 6; shared fixture) with max_backlog 2: `run --once`
    evaluates the base, 2 and 6 and records 4 as skipped with the reason; a second `run --once`
    (a restart) evaluates nothing more and skips nothing else; `status` shows the reason."""
    results = tmp_path / "results"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"""
base_model: {tiny_base}
results_dir: {results}
run_name: run1
watch: {{dir: {tiny_run}, settle_seconds: 0.3}}
engine: {{kind: hf, batch_size: 16}}
scheduler: {{max_backlog: 2}}
suites:
  quick: {{type: heldout_loss}}
mlflow: {{enabled: false}}
""")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    once = [sys.executable, "-m", "ckpt_watch", "run", "-c", str(cfg), "--once"]
    first = subprocess.run(once, capture_output=True, text=True, timeout=600, env=env)
    assert first.returncode == 0, first.stderr[-4000:]
    assert sorted(m["step"] for m in metric_lines(results, "run1")) == [0, 2, 6]
    states = eval_states(results)
    reason = "backlog: 3 checkpoints due > max_backlog 2; kept the newest, the final and an even spread"
    assert {s: st[0] for (s, _suite), st in states.items()} == {0: "done", 2: "done", 4: "skipped", 6: "done"}
    assert states[(4, "quick")][2] == reason
    second = subprocess.run(once, capture_output=True, text=True, timeout=600, env=env)
    assert second.returncode == 0, second.stderr[-4000:]
    assert eval_states(results) == states
    assert len(metric_lines(results, "run1")) == 3
    status = subprocess.run([sys.executable, "-m", "ckpt_watch", "status", "-c", str(cfg)], capture_output=True,
                            text=True, timeout=120, env=env)
    assert status.returncode == 0, status.stderr
    assert "max_backlog 2" in status.stdout  # the skipped row's reason, as status shows it
