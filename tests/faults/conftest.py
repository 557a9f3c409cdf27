"""Fixtures for the fault suite and the summary table printed at the end of the session.

Each scenario calls `fault_record(...)` with what it counted:

- expected:   checkpoints (the base model is step 0) that must end with a correct result;
- evaluated:  those whose every suite result is present, `ok` and equal to the independent
              reference (or, where a scenario says so, carries the error it must carry);
- duplicated: result lines / MLflow points beyond one per (step, suite[, metric]);
- faulty:     checkpoints fed in broken (partial, corrupt, wrong base…) and how many of them were
              handled as they must be (never evaluated, or failed with the reason recorded).

A scenario passes when its test passed, evaluated == expected and duplicated == 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.faults.harness import Reference, build_reference, write_slow_texts


@dataclass
class FaultRow:
    scenario: str
    expected: int | None = None
    evaluated: int | None = None
    duplicated: int | None = None
    faulty_handled: int = 0
    faulty_total: int = 0
    outcome: str = "not run"


_ROWS: dict[str, FaultRow] = {}


def _scenario_name(item: pytest.Item) -> str:
    return item.name.removeprefix("test_")


@pytest.fixture
def fault_record(request: pytest.FixtureRequest) -> Callable[..., None]:
    """Record this scenario's counts for the session summary (call before the final asserts)."""

    def record(*, expected: int, evaluated: int, duplicated: int, faulty: tuple[int, int] = (0, 0)) -> None:
        row = _ROWS.setdefault(request.node.nodeid, FaultRow(_scenario_name(request.node)))
        row.expected, row.evaluated, row.duplicated = expected, evaluated, duplicated
        row.faulty_handled, row.faulty_total = faulty

    return record


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    row = _ROWS.setdefault(item.nodeid, FaultRow(_scenario_name(item)))
    if rep.when == "call" or (rep.when == "setup" and (rep.failed or rep.skipped)):
        row.outcome = "skipped" if rep.skipped else ("passed" if rep.passed else "failed")
    elif rep.when == "teardown" and rep.failed:
        row.outcome = "failed"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    rows = [r for r in _ROWS.values() if r.outcome != "not run"]
    if not rows:
        return
    tr = terminalreporter
    tr.section("fault-injection summary")
    header = f"{'scenario':<44} {'expected':>8} {'evaluated':>9} {'duplicated':>10} {'faulty handled':>14}  result"
    tr.write_line(header)
    tr.write_line("-" * len(header))

    def show(v: int | None) -> str:
        return "-" if v is None else str(v)

    for r in rows:
        ok = r.outcome == "passed" and r.expected is not None and r.evaluated == r.expected and r.duplicated == 0
        result = "SKIP" if r.outcome == "skipped" else ("PASS" if ok else "FAIL")
        faulty = f"{r.faulty_handled}/{r.faulty_total}" if r.faulty_total else "-"
        tr.write_line(f"{r.scenario:<44} {show(r.expected):>8} {show(r.evaluated):>9} {show(r.duplicated):>10} "
                      f"{faulty:>14}  {result}")
    ran = [r for r in rows if r.outcome != "skipped"]
    tr.write_line(f"scenarios run: {len(ran)}; checkpoints expected {sum(r.expected or 0 for r in ran)}, "
                  f"evaluated {sum(r.evaluated or 0 for r in ran)}, "
                  f"duplicated {sum(r.duplicated or 0 for r in ran)}")


@pytest.fixture(scope="session")
def slow_texts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_slow_texts(tmp_path_factory.mktemp("texts") / "slow_texts.txt")


@pytest.fixture(scope="session")
def reference(tiny_run: Path, tiny_base: Path, slow_texts: Path) -> Reference:
    """Independent held-out NLL of the tiny run's base (step 0) and checkpoints 2, 4, 6."""
    return build_reference(tiny_base, tiny_run, slow_texts)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real `mlflow server` on loopback (SQLite backend) shared by the MLflow scenarios; a
    scenario may stop and start it (same port, same store)."""
    from tests.test_sinks_mlflow import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
