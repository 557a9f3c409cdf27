"""Exactly once, on the right weights: what a result's identity is (run, adapter fingerprint, suite
hash) and the edges where it used to break (issue 11).

Real daemons (`python -m ckpt_watch run` / `eval` subprocesses), real PEFT adapters from a real HF
Trainer run (tiny Llama), real MLflow (a `mlflow server` or a SQLite store); every held-out value is
checked against the independent transformers + peft reference, so a result computed on the wrong
weights fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.faults.harness import (
    SUITES,
    DaemonProc,
    checkpoint_states,
    eval_states,
    json_duplicates,
    metric_lines,
    mlflow_block,
    mlflow_duplicates,
    mlflow_points,
    mlflow_run,
    place_checkpoint,
    populate,
    step_record,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.slow

RUN = "run1"
RUNNING = re.compile(r"(?:base|step-(\d+)): running (quick|slow)\b")


def _ran(*outputs: str) -> Counter:
    """(step, suite) → how many times any of these processes started evaluating it."""
    counts: Counter = Counter()
    for out in outputs:
        for m in RUNNING.finditer(out):
            counts[(int(m.group(1) or 0), m.group(2))] += 1
    return counts


def _status(cfg: Path) -> str:
    r = subprocess.run([sys.executable, "-m", "ckpt_watch", "status", "-c", str(cfg)], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    return r.stdout


def _torchtune_dir(tiny_run: Path, watch: Path) -> None:
    """PEFT adapters laid out as torchtune saves them: epoch_0.. with adapter files only."""
    for epoch, step in enumerate((2, 4, 6)):
        dest = watch / f"epoch_{epoch}"
        dest.mkdir(parents=True)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy2(tiny_run / f"checkpoint-{step}" / name, dest / name)


def test_torchtune_epoch_0_is_an_adapter_not_the_base(tmp_path, tiny_run, tiny_base, reference, fault_record):
    watch = tmp_path / "watch"
    _torchtune_dir(tiny_run, watch)
    # steps_per_epoch 2: epoch_N lands at global step 2·(N+1), which is where the reference's adapters are
    cfg = write_config(tmp_path, tiny_base, watch)
    cfg.write_text(cfg.read_text().replace("watch:\n", "watch:\n  layout: torchtune\n  steps_per_epoch: 2\n"))
    with DaemonProc(cfg, "--once") as daemon:
        assert daemon.wait(600) == 0, daemon.output()
    results = tmp_path / "results"
    evaluated = 0
    for step, epoch in ((0, None), (2, 0), (4, 1), (6, 2)):
        for suite in SUITES:
            rec = step_record(results, RUN, step, suite)
            reference.check(rec, step, suite)
            assert rec["info"].get("epoch") == epoch
        evaluated += 1
    values = {step_record(results, RUN, s, "slow")["metrics"]["nll"] for s in (0, 2, 4, 6)}
    fault_record(expected=4, evaluated=evaluated, duplicated=json_duplicates(results, RUN))
    assert len(values) == 4, "four distinct results at four distinct steps"


def test_eval_and_once_beside_a_live_daemon_never_evaluate_a_row_twice(
        tmp_path, tiny_run, tiny_base, reference, mlflow_server, fault_record):
    watch = tmp_path / "watch"
    populate(tiny_run, watch)
    experiment = "concurrent"
    cfg = write_config(tmp_path, tiny_base, watch, mlflow=mlflow_block(mlflow_server.uri, experiment))
    results = tmp_path / "results"
    with DaemonProc(cfg) as daemon:
        daemon.wait_line(r"step-2: running slow|base: running slow", 600)
        # a second daemon on the same results dir and run: refused, exit 2, nothing touched
        second = subprocess.run([sys.executable, "-m", "ckpt_watch", "run", "-c", str(cfg)], cwd=tmp_path,
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stdout + second.stderr
        assert "already evaluates run 'run1'" in second.stderr and f"pid {daemon.pid}" in second.stderr
        assert f"evaluating: daemon pid {daemon.pid}" in _status(cfg)
        # now `eval` and `run --once` on the same results dir, at the same time as the daemon
        env_cmd = [sys.executable, "-m", "ckpt_watch"]
        ev = subprocess.Popen([*env_cmd, "eval", "-c", str(cfg), "--base", str(watch / "checkpoint-4"),
                               str(watch / "checkpoint-6")], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        once = subprocess.Popen([*env_cmd, "run", "--once", "-c", str(cfg)], cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        ev_out, _ = ev.communicate(timeout=900)
        once_out, _ = once.communicate(timeout=900)
        assert ev.returncode == 0, ev_out
        assert once.returncode == 0, once_out
        assert "only claims pending evaluations" in ev_out + once_out
        wait_until(lambda: {s for s, _a, _e in eval_states(results).values()} == {"done"}, 600,
                   "every row done", daemon)
        time.sleep(1.5)  # let the daemon's flusher deliver the guests' queued points
        assert daemon.stop(120) == 0
    ran = _ran(daemon.output(), ev_out, once_out)
    assert set(ran) == {(s, n) for s in (0, 2, 4, 6) for n in SUITES}, ran
    points = mlflow_points(mlflow_server.uri, experiment, RUN)
    evaluated = 0
    for step in (0, 2, 4, 6):
        ok = True
        for suite in SUITES:
            rec = step_record(results, RUN, step, suite)
            reference.check(rec, step, suite)
            ok &= [(s, v) for s, v, _t in points[f"{suite}/nll"] if s == step] == [(step, rec["metrics"]["nll"])]
        evaluated += ok
    duplicated = sum(n - 1 for n in ran.values()) + json_duplicates(results, RUN) + mlflow_duplicates(points)
    fault_record(expected=4, evaluated=evaluated, duplicated=duplicated)
    assert max(ran.values()) == 1, f"evaluated twice: {[k for k, n in ran.items() if n > 1]}"
    assert duplicated == 0 and evaluated == 4


def _rewrite_weights(src: Path, dest: Path) -> None:
    """Retraining into the same folder: the trainer writes other weights over checkpoint-N."""
    time.sleep(0.05)  # a distinct mtime even on coarse clocks
    shutil.copyfile(src / "adapter_model.safetensors", dest / "adapter_model.safetensors")


def test_same_folder_new_weights_is_a_new_training_run(tmp_path, tiny_run, tiny_base, reference, fault_record):
    watch = tmp_path / "watch"
    populate(tiny_run, watch, steps=(2, 4))
    results = tmp_path / "results"
    uri = f"sqlite:///{results / 'mlflow.db'}"
    cfg = write_config(tmp_path, tiny_base, watch, mlflow=mlflow_block(uri, "retrain"))
    with DaemonProc(cfg, "--once") as first:
        assert first.wait(600) == 0, first.output()
    # a new training writes checkpoint-2 with other weights (those of the reference's step 4);
    # checkpoint-4 still holds the first training's weights
    _rewrite_weights(tiny_run / "checkpoint-4", watch / "checkpoint-2")
    with DaemonProc(cfg, "--once") as second:
        assert second.wait(600) == 0, second.output()
    out = second.output()
    assert out.count("a new training run in the same folder") == 1, out
    assert "results go to run 'run1-t2'" in out
    assert checkpoint_states(results)[4][0] in ("ready", "stale")
    # the new training reaches step 4 too (the reference's step-6 weights)
    _rewrite_weights(tiny_run / "checkpoint-6", watch / "checkpoint-4")
    with DaemonProc(cfg, "--once") as third:
        assert third.wait(600) == 0, third.output()
    assert "a new training run" not in third.output()

    new = "run1-t2"
    expected_old = {0: 0, 2: 2, 4: 4}  # step → reference step whose weights it held
    expected_new = {0: 0, 2: 4, 4: 6}
    evaluated = 0
    for run, expect in ((RUN, expected_old), (new, expected_new)):
        for step, ref_step in expect.items():
            for suite in SUITES:
                rec = step_record(results, run, step, suite)
                assert rec is not None, f"{run} step {step} {suite} missing"
                reference.check(rec, ref_step, suite)
            evaluated += 1
    # two MLflow runs, each with only its own training's points
    old_points, new_points = mlflow_points(uri, "retrain", RUN), mlflow_points(uri, "retrain", new)
    for points, expect in ((old_points, expected_old), (new_points, expected_new)):
        got = {s: v for s, v, _t in points["slow/nll"]}
        assert got == pytest.approx({s: reference.nll[(r, "slow")] for s, r in expect.items()}, abs=2e-4)
    assert mlflow_run(uri, "retrain", RUN)[1][0].info.run_id != mlflow_run(uri, "retrain", new)[1][0].info.run_id
    status = _status(cfg)
    assert "run run1-t2 — training 2 of 2 in watched run run1" in status
    assert "started because:" in status and "holds different weights" in status
    duplicated = json_duplicates(results, RUN) + json_duplicates(results, new)
    duplicated += mlflow_duplicates(old_points) + mlflow_duplicates(new_points)
    fault_record(expected=6, evaluated=evaluated, duplicated=duplicated)
    assert duplicated == 0


def test_changed_suite_setting_never_splices_a_series(tmp_path, tiny_run, tiny_base, reference, fault_record):
    watch = tmp_path / "watch"
    populate(tiny_run, watch, steps=(2, 4))
    results = tmp_path / "results"
    uri = f"sqlite:///{results / 'mlflow.db'}"
    cfg = write_config(tmp_path, tiny_base, watch, mlflow=mlflow_block(uri, "config-change"))
    with DaemonProc(cfg, "--once") as first:
        assert first.wait(600) == 0, first.output()
    shutil.rmtree(watch / "checkpoint-2")  # rotated away: only its kept snapshot can be re-evaluated
    boundary = int(time.time() * 1000)
    text = cfg.read_text()
    assert "slow: {type: heldout_loss, path:" in text
    cfg.write_text(text.replace("slow: {type: heldout_loss, path:", "slow: {type: heldout_loss, max_texts: 8, path:"))
    with DaemonProc(cfg, "--once") as second:
        assert second.wait(600) == 0, second.output()
    lines = Counter((m["step"], m["suite"]) for m in metric_lines(results, RUN))
    assert {k for k in lines if k[1] == "slow.v2"} == {(0, "slow.v2"), (2, "slow.v2"), (4, "slow.v2")}
    points = mlflow_points(uri, "config-change", RUN)
    old, new = points["slow/nll"], points["slow.v2/nll"]
    assert sorted(s for s, _v, _t in old) == [0, 2, 4] and all(t < boundary for _s, _v, t in old)
    assert sorted(s for s, _v, _t in new) == [0, 2, 4] and all(t >= boundary for _s, _v, t in new)
    evaluated = 0
    for step in (0, 2, 4):
        reference.check(step_record(results, RUN, step, "slow"), step, "slow")
        rec = step_record(results, RUN, step, "slow.v2")
        assert rec["status"] == "ok" and rec["info"]["suite_version"] == 2
        evaluated += rec["metrics"]["nll"] != step_record(results, RUN, step, "slow")["metrics"]["nll"]
    assert "suite slow config" in _status(cfg) and "results as 'slow.v2'" in _status(cfg)
    # the quick suite's configuration did not change: not re-evaluated, one series
    assert sorted(s for s, _v, _t in points["quick/nll"]) == [0, 2, 4]
    duplicated = mlflow_duplicates(points) + json_duplicates(results, RUN)
    fault_record(expected=3, evaluated=evaluated, duplicated=duplicated)
    assert duplicated == 0 and evaluated == 3


def test_second_daemon_beside_a_oneshot_waits_then_runs(tmp_path, tiny_run, tiny_base, reference, fault_record):
    """A daemon started while `run --once` holds the run's lock waits for it instead of failing."""
    watch = tmp_path / "watch"
    place_checkpoint(tiny_run / "checkpoint-2", watch, 2)
    cfg = write_config(tmp_path, tiny_base, watch)
    with DaemonProc(cfg, "--once") as once:
        once.wait_line(r"running slow", 600)
        with DaemonProc(cfg) as daemon:
            daemon.wait_line(r"waiting for it to finish", 120)
            assert once.wait(600) == 0
            wait_until(lambda: [s for s, _a, _e in eval_states(tmp_path / "results").values()] == ["done"] * 4,
                       300, "all done", daemon)
            assert daemon.stop(60) == 0
    ran = _ran(once.output(), daemon.output())
    results = tmp_path / "results"
    evaluated = 0
    for step in (0, 2):
        for suite in SUITES:
            reference.check(step_record(results, RUN, step, suite), step, suite)
        evaluated += 1
    fault_record(expected=2, evaluated=evaluated, duplicated=sum(n - 1 for n in ran.values()))
    assert set(ran) == {(s, n) for s in (0, 2) for n in SUITES} and max(ran.values()) == 1
