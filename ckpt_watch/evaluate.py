"""Evaluate one checkpoint: load its adapter, run its due suites, unload, hand results to sinks.

Failures travel as data: a suite that raises yields a SuiteResult with status=error that
is written like any other result and marks the ledger row failed. Only two things
propagate: cancellation (shutdown drain) and EngineUnavailable (the server died; the
daemon restarts it and the rows go back to pending for a retry).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ckpt_watch.core import (
    BASE_STEP,
    Checkpoint,
    EngineError,
    EngineUnavailable,
    ResultStatus,
    SuiteResult,
    utcnow,
)
from ckpt_watch.engines.base import Engine
from ckpt_watch.ledger import EvalState, Ledger
from ckpt_watch.scheduler import PlannedSuite
from ckpt_watch.sinks.base import Sink
from ckpt_watch.suites.base import Suite, SuiteContext, build_suite

log = logging.getLogger(__name__)


def read_result(results_dir: Path, run: str, step: int, suite: str, *, ok_only: bool = True) -> SuiteResult | None:
    """A result written earlier by the JSON sink (the step-0 baseline; or, with ok_only=False,
    a result an interrupted session already handed to the sinks)."""
    path = results_dir / run / f"step-{step}" / f"{suite}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if data.get("status") != ResultStatus.OK and ok_only:
        return None
    return SuiteResult(
        suite=suite, step=step, status=ResultStatus(data.get("status", ResultStatus.ERROR)), error=data.get("error"),
        # non-finite values are stored as null (strict JSON)
        metrics={k: float(v) for k, v in (data.get("metrics") or {}).items() if v is not None},
        samples=data.get("samples", []), n_scored=data.get("n_scored", 0), n_unscored=data.get("n_unscored", 0),
        started_at=data.get("started_at", ""), finished_at=data.get("finished_at"), info=data.get("info", {}),
    )


class Evaluator:
    def __init__(self, engine: Engine, sinks: list[Sink], ledger: Ledger, run: str, results_dir: Path,
                 max_attempts: int, judge: Any = None, cache_dir: Path | None = None):
        self.engine = engine
        self.sinks = sinks
        self.ledger = ledger
        self.run = run
        self.results_dir = results_dir
        self.max_attempts = max_attempts
        self.judge = judge
        self.cache_dir = cache_dir
        self._suites: dict[tuple[str, str], Suite] = {}
        self.progress: Callable[[str, int, int], None] = lambda label, done, total: None

    def _suite(self, planned: PlannedSuite) -> Suite:
        key = (planned.name, planned.hash)
        if key not in self._suites:
            self._suites[key] = build_suite(planned.name, planned.config)
        return self._suites[key]

    async def evaluate(self, ckpt: Checkpoint, suites: list[PlannedSuite], stopping: Callable[[], bool]) -> None:
        try:
            handle = await self.engine.load(ckpt)
        except EngineUnavailable:
            raise
        except EngineError as exc:
            log.error("%s: adapter refused by the engine: %s", ckpt.label, exc)
            for planned in suites:
                self._record(ckpt, planned, SuiteResult.failure(planned.name, ckpt.step, f"adapter load: {exc}"))
            return
        try:
            for planned in suites:
                if stopping():
                    log.info("stopping: %s/%s left pending", ckpt.label, planned.name)
                    return
                await self._run_suite(ckpt, handle, planned)
        finally:
            try:
                await self.engine.unload(handle)
            except EngineError as exc:
                log.warning("%s: unload failed (%s); the engine will drop it on restart", ckpt.label, exc)

    async def _run_suite(self, ckpt: Checkpoint, handle: Any, planned: PlannedSuite) -> None:
        row_key = (self.run, ckpt.step, planned.name, planned.hash)
        if self._redeliver(ckpt, planned):
            return
        self.ledger.set_eval(*row_key, EvalState.RUNNING)
        label = f"{ckpt.label}/{planned.name}"
        log.info("%s: running %s", ckpt.label, planned.name)
        baseline = None if ckpt.step == BASE_STEP else read_result(self.results_dir, self.run, BASE_STEP, planned.name)
        ctx = SuiteContext(
            engine=self.engine, handle=handle, checkpoint=ckpt, run_name=self.run, baseline=baseline,
            judge=self.judge, cache_dir=self.cache_dir,
            progress=lambda done, total: self.progress(label, done, total),
        )
        started = utcnow()
        try:
            result = await self._suite(planned).run(ctx)
        except asyncio.CancelledError:
            self.ledger.set_eval(*row_key, EvalState.PENDING, "interrupted by shutdown")
            raise
        except EngineUnavailable as exc:
            row = self.ledger.eval_row(*row_key)
            give_up = row is not None and row.attempts >= self.max_attempts
            self.ledger.set_eval(*row_key, EvalState.FAILED if give_up else EvalState.PENDING, f"engine: {exc}")
            if give_up:
                self._write(ckpt, SuiteResult.failure(planned.name, ckpt.step, f"engine unavailable: {exc}", started))
            raise
        except Exception as exc:  # a suite's failure is data: recorded, written, and the daemon goes on
            log.exception("%s/%s failed", ckpt.label, planned.name)
            result = SuiteResult.failure(planned.name, ckpt.step, f"{type(exc).__name__}: {exc}", started)
        self._record(ckpt, planned, result)

    def _redeliver(self, ckpt: Checkpoint, planned: PlannedSuite) -> bool:
        """A session killed after the sinks got a result but before the ledger recorded it left
        the row `running` (now pending). Recomputing would hand MLflow a second point at that
        step (new timestamp, maybe a new value); instead the result already written (same suite
        hash, begun during the interrupted attempt) is delivered again as it was: the JSON upsert
        and the outbox's (key, step, timestamp) uniqueness make that a no-op where it landed."""
        row = self.ledger.eval_row(self.run, ckpt.step, planned.name, planned.hash)
        if row is None or row.attempts == 0 or row.started_at is None:
            return False
        earlier = read_result(self.results_dir, self.run, ckpt.step, planned.name, ok_only=False)
        if earlier is None or earlier.info.get("suite_hash") != planned.hash or earlier.started_at < row.started_at:
            return False
        log.info("%s/%s: result already written by an interrupted session; delivering it again",
                 ckpt.label, planned.name)
        # counted as an attempt (and newer than `earlier`): a redelivery that fails is not retried forever
        self.ledger.set_eval(self.run, ckpt.step, planned.name, planned.hash, EvalState.RUNNING)
        self._record(ckpt, planned, earlier)
        return True

    def _record(self, ckpt: Checkpoint, planned: PlannedSuite, result: SuiteResult) -> None:
        row_key = (self.run, ckpt.step, planned.name, planned.hash)
        result.info.setdefault("suite_hash", planned.hash)  # lets _redeliver recognise it after a crash
        if result.finished_at is None:
            result.finished_at = utcnow()
        try:
            self._write(ckpt, result)
        except (OSError, sqlite3.Error) as exc:
            # e.g. disk full: the result is not on disk, so the row must stay due
            row = self.ledger.eval_row(*row_key)
            give_up = row is not None and row.attempts >= self.max_attempts
            state = EvalState.FAILED if give_up else EvalState.PENDING
            self.ledger.set_eval(*row_key, state, f"writing results failed: {exc}")
            log.error("%s/%s: writing results failed (%s); %s", ckpt.label, planned.name, exc,
                      "giving up" if give_up else "will retry")
            return
        ok = result.status is ResultStatus.OK
        self.ledger.set_eval(*row_key, EvalState.DONE if ok else EvalState.FAILED, result.error)
        if ok:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in list(result.finite_metrics().items())[:6])
            log.info("%s/%s done: %s", ckpt.label, planned.name, shown)
        else:
            log.error("%s/%s failed: %s", ckpt.label, planned.name, result.error)

    def _write(self, ckpt: Checkpoint, result: SuiteResult) -> None:
        for sink in self.sinks:
            sink.write(ckpt, result)
