"""Schedules in percent of training (issue 13, item 3): `every: "50%"`, `at: [..]`, resolved once
from the trainer's own max_steps and recorded in the ledger."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from ckpt_watch.config import ConfigError, load_config, parse_config
from ckpt_watch.ledger import Ledger
from ckpt_watch.scheduler import due_reason
from tests.conftest import run_trainer
from tests.faults.harness import eval_states, metric_lines, write_config


def _suite(**block):
    return parse_config({"base_model": "x", "suites": {"h": {"type": "heldout_loss", **block}}}).suites["h"]


def test_percent_targets_and_due_rule():
    s = _suite(every="20%")
    assert s.every == "20%" and s.percent_schedule()
    assert s.schedule_targets(40) == [8, 16, 24, 32, 40]
    targets = s.schedule_targets(40)
    # checkpoints every 10: each target is served by the first checkpoint at or after it
    due = [step for prev, step in ((0, 10), (10, 20), (20, 30), (30, 40)) if due_reason(s, step, False, targets, prev)
           is None]
    assert due == [10, 20, 30, 40]
    half = _suite(every="50%")
    assert half.schedule_targets(40) == [20, 40]
    assert "no schedule target in (0, 10]" in due_reason(half, 10, False, [20, 40], 0)
    assert due_reason(half, 30, True, [20, 40], 20) is None  # at_final
    assert _suite(at=[1.0, 0.25]).schedule_targets(100) == [25, 100]
    # only *when* changed: same hash as every checkpoint
    assert _suite(every="50%").config_hash() == _suite().config_hash()


@pytest.mark.parametrize("bad", ["abc", "0%", "150%", "-5%"])
def test_bad_percent_is_a_config_error(bad):
    with pytest.raises(ConfigError, match=r"suites\.h\.every"):
        _suite(every=bad)


def test_percent_schedule_without_max_steps_fails_validation():
    base = {"base_model": "x", "watch": {"layout": "torchtune"}, "suites": {"h": {"type": "heldout_loss",
                                                                                  "every": "25%"}}}
    with pytest.raises(ConfigError) as info:
        parse_config(base)
    assert "suites.h.every: a percent schedule needs the run's max_steps" in str(info.value)
    assert "scheduler.max_steps" in str(info.value)
    with pytest.raises(ConfigError, match=r"needs watch\.steps_per_epoch"):
        parse_config({**base, "scheduler": {"max_steps": 8}})
    ok = parse_config({**base, "scheduler": {"max_steps": 8}, "watch": {"layout": "torchtune", "steps_per_epoch": 2}})
    assert ok.scheduler.max_steps == 8
    with pytest.raises(ConfigError, match="not both"):
        _suite(every=10, at=[0.5])


@pytest.mark.slow
def test_fifty_percent_of_a_real_run_evaluates_steps_20_and_40(tmp_path, tiny_base):
    """A real HF Trainer run, max_steps 40, checkpoint every 10: every "50%" → base, 20 and 40."""
    run = tmp_path / "train"
    run_trainer(run, model="tiny", max_steps=40, save_steps=10)
    cfg = write_config(tmp_path, tiny_base, run, suites='suites:\n  quick: {type: heldout_loss, every: "50%"}')
    from ckpt_watch.daemon import Daemon

    assert asyncio.run(Daemon(load_config(cfg), once=True).run()) == 0
    results = tmp_path / "results"
    assert sorted(m["step"] for m in metric_lines(results, "run1")) == [0, 20, 40]
    states = eval_states(results)
    assert states[(10, "quick")][0] == states[(30, "quick")][0] == "skipped"
    assert "no schedule target" in states[(10, "quick")][2]
    ledger = Ledger(results / "ledger.sqlite")
    assert ledger.schedules("run1") == [("quick", 40, [20, 40])]
    ledger.close()
    status = subprocess.run([sys.executable, "-m", "ckpt_watch", "status", "-c", str(cfg)], capture_output=True,
                            text=True, timeout=120, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert status.returncode == 0, status.stderr
    assert "percent schedule over 40 steps → due at the first checkpoint at or after steps 20, 40" in status.stdout
