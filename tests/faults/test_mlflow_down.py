"""The MLflow server goes down for a while, then comes back: evaluation never waits for it, and
once it is back every point is there exactly once.

MLflow is a real `mlflow server` subprocess on loopback (SQLite backend), stopped and started
again on the same port; what it holds is read back with `MlflowClient.get_metric_history`.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from tests.faults.harness import (
    SUITES,
    DaemonProc,
    json_duplicates,
    metric_lines,
    mlflow_block,
    mlflow_duplicates,
    mlflow_points,
    mlflow_tables,
    populate,
    step_record,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.slow

RUN = "run1"
EXPERIMENT = "faults-mlflow-down"
STEPS = (0, 2, 4, 6)
KEYS = [f"{suite}/{metric}" for suite in SUITES for metric in ("nll", "ppl", "tokens")]


def _undelivered(results: Path) -> int:
    with sqlite3.connect(results / RUN / "mlflow-outbox.sqlite") as db:
        return db.execute("SELECT count(*) FROM outbox WHERE sent_at IS NULL AND failed IS NULL").fetchone()[0]


def _refused(results: Path) -> int:
    with sqlite3.connect(results / RUN / "mlflow-outbox.sqlite") as db:
        return db.execute("SELECT count(*) FROM outbox WHERE failed IS NOT NULL").fetchone()[0]


def _steps_of(uri: str) -> dict[str, list[int]]:
    try:
        return {k: [s for s, _, _ in v] for k, v in mlflow_points(uri, EXPERIMENT, RUN).items()}
    except AssertionError:  # no run yet
        return {}


def test_mlflow_server_down_then_up(tmp_path, tiny_run, tiny_base, reference, mlflow_server, fault_record):
    watch = tmp_path / "watch"
    watch.mkdir()
    results = tmp_path / "results"
    uri = mlflow_server.uri
    cfg = write_config(tmp_path, tiny_base, watch, mlflow=mlflow_block(uri, EXPERIMENT, 0.5))
    with DaemonProc(cfg) as daemon:
        wait_until(lambda: all(_steps_of(uri).get(k) == [0] for k in KEYS), 180, "the base model's points in MLflow",
                   daemon)
        mlflow_server.stop()
        try:
            populate(tiny_run, watch, (2, 4, 6))
            t0 = time.monotonic()
            wait_until(lambda: {(s, n) for s in STEPS for n in SUITES} <= {
                (m["step"], m["suite"]) for m in metric_lines(results, RUN)}, 180, "checkpoints evaluated", daemon)
            evaluated_in = time.monotonic() - t0
            daemon.wait_line(r"MLflow flush to .* failed \(points stay queued\)", 60)
            queued_while_down = _undelivered(results)
        finally:
            mlflow_server.start()
        wait_until(lambda: all(_steps_of(uri).get(k) == list(STEPS) for k in KEYS) and _undelivered(results) == 0,
                   180, "every point delivered after MLflow came back", daemon)
        time.sleep(1.5)  # a few more flush periods: nothing may arrive twice
        code = daemon.stop()
        out = daemon.output()
    assert code == 0, out

    points = mlflow_points(uri, EXPERIMENT, RUN)
    evaluated = 0
    for step in STEPS:
        ok = True
        for suite in SUITES:
            record = step_record(results, RUN, step, suite)
            ok = ok and record is not None and all(
                [v for s, v, _ in points[f"{suite}/{m}"] if s == step] == [record["metrics"][m]]
                for m in ("nll", "ppl", "tokens"))
            if record is not None:
                reference.check(record, step, suite)
        evaluated += ok
    duplicated = mlflow_duplicates(points) + json_duplicates(results, RUN)
    fault_record(expected=len(STEPS), evaluated=evaluated, duplicated=duplicated)
    # evaluation went on at its own pace while MLflow was down (3 checkpoints × ~3 s of suites)
    assert evaluated_in < 60, evaluated_in
    # 3 checkpoints × 2 suites × (3 metrics + a samples table) were held back, then delivered
    assert queued_while_down >= 3 * 2 * 3, queued_while_down
    assert _undelivered(results) == 0 and _refused(results) == 0
    assert evaluated == len(STEPS)
    assert duplicated == 0
    for suite in SUITES:
        assert mlflow_tables(uri, EXPERIMENT, RUN, suite) == [f"samples/{suite}/step-{s}.json" for s in STEPS]
