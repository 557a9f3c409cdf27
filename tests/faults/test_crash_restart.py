"""SIGKILL of the daemon mid-evaluation, then restarts: no point twice in MLflow or JSON, no step missed.

MLflow is a real `mlflow server` subprocess on loopback (SQLite backend); what it holds is read
back with `MlflowClient.get_metric_history`. Two kills:

1. in the middle of a suite (its ledger row says `running`);
2. in the worst window: the result has reached the JSON files and MLflow, but the ledger has not
   recorded it yet. To stop the daemon exactly there, this test holds the ledger's SQLite write
   lock from another connection (as a second writer would) while the suite finishes; the daemon
   blocks on its `done` update and is killed while blocked.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from tests.faults.harness import (
    SUITES,
    DaemonProc,
    Reference,
    eval_states,
    json_duplicates,
    metric_lines,
    mlflow_block,
    mlflow_duplicates,
    mlflow_points,
    mlflow_run,
    mlflow_tables,
    populate,
    step_record,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.slow

RUN = "run1"
EXPERIMENT = "faults-sigkill"
STEPS = (0, 2, 4, 6)
KEYS = [f"{suite}/{metric}" for suite in SUITES for metric in ("nll", "ppl", "tokens")]


def _has_point(uri: str, key: str, step: int) -> bool:
    try:
        return any(s == step for s, _, _ in mlflow_points(uri, EXPERIMENT, RUN).get(key, []))
    except AssertionError:  # the run is not there yet
        return False


def _steps_in_mlflow_equal_json(points: dict, results: Path, reference: Reference) -> int:
    """Steps whose every suite is in JSON (equal to the reference) and in MLflow exactly once with
    the JSON values."""
    good = 0
    for step in STEPS:
        try:
            for suite in SUITES:
                record = step_record(results, RUN, step, suite)
                assert record is not None
                reference.check(record, step, suite)
                for metric in ("nll", "ppl", "tokens"):
                    at_step = [v for s, v, _ in points.get(f"{suite}/{metric}", []) if s == step]
                    assert at_step == [record["metrics"][metric]], (suite, metric, step, at_step)
        except AssertionError:
            continue
        good += 1
    return good


def test_sigkill_mid_eval_then_restart(tmp_path, tiny_run, tiny_base, reference, mlflow_server, fault_record):
    watch = tmp_path / "watch"
    results = tmp_path / "results"
    populate(tiny_run, watch, (2, 4, 6))
    uri = mlflow_server.uri
    cfg = write_config(tmp_path, tiny_base, watch, order="newest", mlflow=mlflow_block(uri, EXPERIMENT, 0.2))

    # 1. killed in the middle of a suite
    with DaemonProc(cfg) as first:
        first.wait_line(r"step-6: running slow", 180)
        time.sleep(0.5)
        running_when_killed = eval_states(results)[(6, "slow")][0]
        first.sigkill()
    assert running_when_killed == "running"

    # 2. killed after the sinks got the result, before the ledger recorded it
    with DaemonProc(cfg) as second:
        second.wait_line(r"1 evaluation\(s\) left running by an earlier session are pending again", 120)
        second.wait_line(r"step-4: running slow", 180)
        lock = sqlite3.connect(results / "ledger.sqlite", isolation_level=None, timeout=30)
        lock.execute("BEGIN IMMEDIATE")
        try:
            wait_until(lambda: step_record(results, RUN, 4, "slow") is not None, 60, "step 4 slow in JSON", second)
            wait_until(lambda: _has_point(uri, "slow/nll", 4), 60, "step 4 slow/nll in MLflow", second)
            second.sigkill()
        finally:
            lock.execute("ROLLBACK")
            lock.close()
    assert eval_states(results)[(4, "slow")][0] == "running"  # the ledger never heard of that result

    # 3. a last start finishes what is due and exits
    with DaemonProc(cfg, "--once") as last:
        code = last.wait(300)
        out = last.output()
    assert code == 0, out
    # the result the second session wrote was delivered again, not recomputed into a second point
    assert "step-4/slow: result already written by an interrupted session; delivering it again" in out

    points = mlflow_points(uri, EXPERIMENT, RUN)
    duplicated = mlflow_duplicates(points) + json_duplicates(results, RUN)
    evaluated = _steps_in_mlflow_equal_json(points, results, reference)
    fault_record(expected=len(STEPS), evaluated=evaluated, duplicated=duplicated)
    assert mlflow_duplicates(points) == 0, {k: v for k, v in points.items() if k.startswith("slow/")}
    assert json_duplicates(results, RUN) == 0
    assert {(m["step"], m["suite"]) for m in metric_lines(results, RUN)} == {(s, n) for s in STEPS for n in SUITES}
    for key in KEYS:
        assert [s for s, _, _ in points[key]] == list(STEPS), (key, points[key])
    assert evaluated == len(STEPS)
    assert len(mlflow_run(uri, EXPERIMENT, RUN)[1]) == 1  # restarts found the same run again
    for suite in SUITES:
        assert mlflow_tables(uri, EXPERIMENT, RUN, suite) == [f"samples/{suite}/step-{s}.json" for s in STEPS]
    assert {v[0] for v in eval_states(results).values()} == {"done"}
