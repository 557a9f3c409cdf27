"""Evaluate one checkpoint: claim → evaluate → commit.

1. **claim** (ledger): each due suite is taken with one atomic `pending → running` update, so
   of several processes on one ledger (a daemon and `ckpt-watch eval`) exactly one runs it.
2. **evaluate** (engine, suites): the adapter is loaded, the canary checks it took effect
   (canary.py), the claimed suites run one after another, the adapter is unloaded.
3. **commit** (sinks, then ledger): each result goes to the sinks, then its row is marked
   done / failed. A crash in between is repaired by re-delivering the written result.

Failures travel as data: a suite (or the canary) that raises yields a SuiteResult with
status=error that is written like any other result and marks the ledger row failed. Only
cancellation (shutdown drain: unfinished rows go back to pending, the attempt not counted)
and EngineUnavailable (the server died; the daemon restarts it) propagate. Every attempt is
counted when the row is claimed, before the adapter is loaded, so an adapter that crashes
the server while loading — or a process that dies on a step every time — is tried at most
`max_suite_attempts` times and then failed with the reason, never looped on.

With watch.root the runs share one base model on one engine: a run's step 0 takes the result
another run of the same daemon already has for that suite configuration (`_shared_base`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ckpt_watch.core import (
    BASE_STEP,
    AdapterHandle,
    Checkpoint,
    CheckpointKind,
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


async def run_together(coros: list[Coroutine[Any, Any, None]]) -> None:
    """Run every coroutine at once; none stops another. Each records its own outcome (a suite its
    row, an evaluation its suites' rows), so this only re-raises: a full disk first (the daemon
    waits for space), then the engine's death (it restarts the engine), else the first error.
    Cancelled, it cancels them all and waits for them."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    if errors:  # a full disk first (the daemon waits for space, then recovers what was left running)
        raise min(errors, key=lambda e: 0 if isinstance(e, (OSError, sqlite3.Error)) else
                  1 if isinstance(e, EngineUnavailable) else 2)


@dataclass(frozen=True)
class Claimed:
    """A suite this process took for one checkpoint, with when its previous attempt began."""

    planned: PlannedSuite
    previous_start: str | None
    previous_attempts: int


class Evaluator:
    def __init__(self, engine: Engine, sinks: list[Sink], ledger: Ledger, run: str, results_dir: Path,
                 max_attempts: int, judge: Any = None, cache_dir: Path | None = None, canary: bool = True,
                 owner: str | None = None, concurrent_suites: bool = True,
                 shared_base: dict[str, tuple[str, SuiteResult]] | None = None):
        self.engine = engine
        self.sinks = sinks
        self.ledger = ledger
        self.run = run
        self.results_dir = results_dir
        self.max_attempts = max_attempts
        self.judge = judge
        self.cache_dir = cache_dir
        self.canary = canary
        self.owner = owner  # this process, as written into the rows it claims
        self.concurrent_suites = concurrent_suites  # a checkpoint's suites share the engine at once
        # watch.root: suite hash → (run, result) of the base model (step 0) as evaluated by this process
        # for one run of the root, shared by the others (one dict for all the daemon's evaluators)
        self.shared_base = shared_base
        self.failed = 0  # (step, suite) evaluations this process recorded as failed
        self._suites: dict[tuple[str, str], Suite] = {}
        self.progress: Callable[[str, int, int], None] = lambda label, done, total: None
        self.alerts: Any = None  # ckpt_watch.alerts.Alerts: checked on each committed result (issue 14)

    def _suite(self, planned: PlannedSuite) -> Suite:
        key = (planned.name, planned.hash)
        if key not in self._suites:
            self._suites[key] = build_suite(planned.name, planned.config)
        return self._suites[key]

    def _key(self, step: int, planned: PlannedSuite) -> tuple[str, int, str, str]:
        return (self.run, step, planned.name, planned.hash)

    # -- claim ---------------------------------------------------------------------------------

    def claim(self, ckpt: Checkpoint, suites: list[PlannedSuite]) -> list[Claimed]:
        claimed = []
        for planned in suites:
            before = self.ledger.eval_row(*self._key(ckpt.step, planned))
            if not self.ledger.claim(*self._key(ckpt.step, planned), owner=self.owner):
                continue  # another process took it
            c = Claimed(planned, before.started_at if before else None, before.attempts if before else 0)
            if c.previous_attempts >= self.max_attempts and not self._redeliver(ckpt, c):
                # every earlier attempt ended with the process gone (killed, OOM, crash) mid-way
                self._record(ckpt, planned, SuiteResult.failure(
                    planned.key, ckpt.step, f"interrupted {c.previous_attempts} time(s): the evaluating process "
                    "died during each attempt (killed, out of memory, or crashed); use --force to try again"))
                continue
            claimed.append(c)
        return claimed

    def retried(self, step: int, suites: list[PlannedSuite]) -> bool:
        """Whether an earlier attempt at one of these evaluations ended without a result (the engine
        died, the process was killed): the daemon then evaluates this step alone."""
        return any((row := self.ledger.eval_row(*self._key(step, p))) is not None and row.attempts > 0
                   for p in suites)

    # -- evaluate ------------------------------------------------------------------------------

    async def evaluate(self, ckpt: Checkpoint, suites: list[PlannedSuite], stopping: Callable[[], bool]) -> None:
        claimed = self.claim(ckpt, suites)
        if not claimed:
            return
        try:
            handle, canary = await self._load(ckpt, claimed)
        except (asyncio.CancelledError, EngineUnavailable):
            raise
        except EngineError:
            return  # recorded as every claimed suite's failure
        # a retry runs its suites in turn: when suites ran together, an engine crash or a killed process
        # charged an attempt to every one of them; one at a time, only the suite that crashes is charged again
        retry = any(c.previous_attempts > 0 for c in claimed)
        try:
            if self.concurrent_suites and not retry:
                await self._run_together(ckpt, handle, claimed, canary, stopping)
            else:
                await self._run_in_turn(ckpt, handle, claimed, canary, stopping)
        finally:
            try:
                await self.engine.unload(handle)
            except EngineError as exc:
                log.warning("%s: unload failed (%s); the engine will drop it on restart", ckpt.label, exc)

    async def _run_in_turn(self, ckpt: Checkpoint, handle: AdapterHandle, claimed: list[Claimed],
                           canary: dict | None, stopping: Callable[[], bool]) -> None:
        current = 0
        try:
            for current, c in enumerate(claimed):
                if stopping():
                    log.info("stopping: %s/%s left pending", ckpt.label, c.planned.key)
                    self._release(ckpt, claimed[current:])
                    return
                await self._run_suite(ckpt, handle, c, canary)
        except BaseException:
            self._release(ckpt, claimed[current + 1:])  # never started: back to pending, not counted
            raise

    async def _run_together(self, ckpt: Checkpoint, handle: AdapterHandle, claimed: list[Claimed],
                            canary: dict | None, stopping: Callable[[], bool]) -> None:
        """Every claimed suite at once, sharing the engine's request pool; each result is committed
        as its suite finishes, a failing suite is recorded without touching the others, and a
        cancellation (the drain is over) sends each unfinished suite's row back to pending."""
        if stopping():
            log.info("stopping: %s left pending", ckpt.label)
            self._release(ckpt, claimed)
            return
        started: set[str] = set()

        async def one(c: Claimed) -> None:
            started.add(c.planned.key)
            await self._run_suite(ckpt, handle, c, canary)

        try:
            await run_together([one(c) for c in claimed])
        except BaseException:
            self._release(ckpt, [c for c in claimed if c.planned.key not in started])  # cancelled before starting
            raise

    def _release(self, ckpt: Checkpoint, claimed: list[Claimed]) -> None:
        for c in claimed:
            self.ledger.release(*self._key(ckpt.step, c.planned), "interrupted by shutdown", c.previous_start)

    async def _load(self, ckpt: Checkpoint, claimed: list[Claimed]) -> tuple[AdapterHandle, dict | None]:
        try:
            handle = await self.engine.load(ckpt)
        except asyncio.CancelledError:
            self._release(ckpt, claimed)
            raise
        except EngineUnavailable as exc:
            # counted: the rows were claimed (attempts + 1) before the load
            self._engine_down(ckpt, claimed, f"adapter load: {exc}")
            raise
        except EngineError as exc:
            log.error("%s: adapter refused by the engine: %s", ckpt.label, exc)
            self._fail_all(ckpt, claimed, f"adapter load: {exc}")
            raise
        if not self.canary or ckpt.kind is CheckpointKind.BASE or ckpt.adapter_dir is None:
            return handle, None
        try:
            return handle, await self._canary(ckpt, handle)
        except asyncio.CancelledError:
            await asyncio.shield(self._quiet_unload(handle))
            self._release(ckpt, claimed)
            raise
        except EngineUnavailable as exc:
            await self._quiet_unload(handle)
            self._engine_down(ckpt, claimed, f"canary: {exc}")
            raise
        except Exception as exc:  # AdapterNoEffect / AdapterMismatch, or the probe itself failed
            log.error("%s: canary: %s", ckpt.label, exc)
            await self._quiet_unload(handle)
            found = getattr(exc, "result", None)
            what = str(exc) if isinstance(exc, EngineError) else f"{type(exc).__name__}: {exc}"
            self._fail_all(ckpt, claimed, f"canary: {what}", {"canary": found.as_dict()} if found else None)
            raise EngineError(what) from exc

    async def _canary(self, ckpt: Checkpoint, handle: AdapterHandle) -> dict:
        from ckpt_watch.canary import run_canary

        base = AdapterHandle(checkpoint=Checkpoint.base(ckpt.run), name=None)
        result = await run_canary(self.engine, handle, base, ckpt.adapter_dir)
        info = result.as_dict() if hasattr(result, "as_dict") else dict(result)
        log.info("%s: canary %s (max |Δ log-prob| %.3g)", ckpt.label, info.get("status"),
                 float(info.get("max_abs_delta") or 0.0))
        return info

    async def _quiet_unload(self, handle: AdapterHandle) -> None:
        with contextlib.suppress(EngineError):  # the server is down or restarting: it forgets it anyway
            await self.engine.unload(handle)

    def _engine_down(self, ckpt: Checkpoint, claimed: list[Claimed], error: str) -> None:
        """The engine died under this step: rows with tries left go back to pending, the rest fail."""
        for c in claimed:
            key = self._key(ckpt.step, c.planned)
            row = self.ledger.eval_row(*key)
            if row is not None and row.attempts >= self.max_attempts:
                msg = f"engine unavailable after {row.attempts} attempt(s): {error}"
                self._record(ckpt, c.planned, SuiteResult.failure(c.planned.key, ckpt.step, msg))
            else:
                self.ledger.release(*key, f"engine: {error}", c.previous_start, count_attempt=True)

    def _fail_all(self, ckpt: Checkpoint, claimed: list[Claimed], error: str, info: dict | None = None) -> None:
        for c in claimed:
            failure = SuiteResult.failure(c.planned.key, ckpt.step, error)
            failure.info.update(info or {})
            self._record(ckpt, c.planned, failure)

    async def _run_suite(self, ckpt: Checkpoint, handle: AdapterHandle, claimed: Claimed,
                         canary: dict | None) -> None:
        planned = claimed.planned
        if self._redeliver(ckpt, claimed):
            return
        if (shared := self._shared_base(ckpt, planned)) is not None:
            self._record(ckpt, planned, shared)
            return
        label = f"{ckpt.label}/{planned.key}"
        log.info("%s: running %s", ckpt.label, planned.key)
        ctx = SuiteContext(
            engine=self.engine, handle=handle, checkpoint=ckpt, run_name=self.run,
            baseline=self._baseline(ckpt, planned), judge=self.judge, cache_dir=self.cache_dir,
            progress=lambda done, total: self.progress(label, done, total),
        )
        started = utcnow()
        try:
            result = await self._suite(planned).run(ctx)
        except asyncio.CancelledError:
            self._release(ckpt, [claimed])  # shutdown: pending again, the attempt not counted
            raise
        except EngineUnavailable as exc:
            self._engine_down(ckpt, [claimed], str(exc))
            raise
        except Exception as exc:  # a suite's failure is data: recorded, written, and the daemon goes on
            log.exception("%s/%s failed", ckpt.label, planned.key)
            result = SuiteResult.failure(planned.key, ckpt.step, f"{type(exc).__name__}: {exc}", started)
        if canary is not None:
            result.info.setdefault("canary", canary)
        self._record(ckpt, planned, result)

    def _baseline(self, ckpt: Checkpoint, planned: PlannedSuite) -> SuiteResult | None:
        """The base model's result for this very configuration (same suite hash), else None: a
        delta against another configuration's baseline would be meaningless."""
        if ckpt.step == BASE_STEP:
            return None
        base = read_result(self.results_dir, self.run, BASE_STEP, planned.key)
        if base is None or base.info.get("suite_hash") != planned.hash:
            return None
        return base

    def _shared_base(self, ckpt: Checkpoint, planned: PlannedSuite) -> SuiteResult | None:
        """With watch.root, the runs share one base model on one engine: the base model (step 0) is
        evaluated once per suite configuration by this process, and the other runs record that result
        as their own step 0 (`info.base_from` names the run that evaluated it). None when this process
        has not evaluated it yet (results of earlier sessions are never taken: their engine or base
        model may have been another; `--force` evaluates it again, once)."""
        if ckpt.step != BASE_STEP or self.shared_base is None or planned.hash not in self.shared_base:
            return None
        run, found = self.shared_base[planned.hash]
        info = {k: v for k, v in found.info.items() if k not in ("suite_version", "epoch")}
        info["base_from"] = run
        log.info("%s/%s: the base model's result evaluated for run '%s' (same configuration, same engine)",
                 ckpt.label, planned.key, run)
        return replace(found, suite=planned.key, metrics=dict(found.metrics), samples=list(found.samples),
                       started_at=utcnow(), finished_at=None, info=info)

    def _redeliver(self, ckpt: Checkpoint, claimed: Claimed) -> bool:
        """A session killed after the sinks got a result but before the ledger recorded it left
        the row `running` (now pending). Recomputing would hand MLflow a second point at that
        step (new timestamp, maybe a new value); instead the result already written (same suite
        hash, begun during the interrupted attempt) is delivered again as it was: the JSON upsert
        and the outbox's (key, step, timestamp) uniqueness make that a no-op where it landed."""
        planned = claimed.planned
        if claimed.previous_attempts == 0 or claimed.previous_start is None:
            return False
        earlier = read_result(self.results_dir, self.run, ckpt.step, planned.key, ok_only=False)
        if (earlier is None or earlier.info.get("suite_hash") != planned.hash
                or earlier.started_at < claimed.previous_start):
            return False
        log.info("%s/%s: result already written by an interrupted session; delivering it again",
                 ckpt.label, planned.key)
        self._record(ckpt, planned, earlier)
        return True

    # -- commit --------------------------------------------------------------------------------

    def _record(self, ckpt: Checkpoint, planned: PlannedSuite, result: SuiteResult) -> None:
        key = self._key(ckpt.step, planned)
        result.suite = planned.key  # the versioned result name: one series per configuration
        result.info.setdefault("suite_hash", planned.hash)  # lets _redeliver recognise it after a crash
        result.info.setdefault("suite_version", planned.version)
        if ckpt.epoch is not None:
            result.info.setdefault("epoch", ckpt.epoch)
        if result.finished_at is None:
            result.finished_at = utcnow()
        result.info.setdefault("suite_type", planned.config.type)  # for summary.json
        try:
            self._write(ckpt, result)
            from ckpt_watch.summary import write_summary

            write_summary(self.results_dir / self.run)  # summary.json; a failure there is only logged
        except (OSError, sqlite3.Error) as exc:
            # e.g. disk full: the result is not on disk, so the row must stay due
            row = self.ledger.eval_row(*key)
            give_up = row is not None and row.attempts >= self.max_attempts
            state = EvalState.FAILED if give_up else EvalState.PENDING
            self.ledger.set_eval(*key, state, f"writing results failed: {exc}")
            log.error("%s/%s: writing results failed (%s); %s", ckpt.label, planned.key, exc,
                      "giving up" if give_up else "will retry")
            self.failed += give_up
            return
        ok = result.status is ResultStatus.OK
        self.ledger.set_eval(*key, EvalState.DONE if ok else EvalState.FAILED, result.error)
        if ok and ckpt.step == BASE_STEP and self.shared_base is not None and "base_from" not in result.info:
            self.shared_base[planned.hash] = (self.run, result)  # the root's other runs take it
        if ok:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in list(result.finite_metrics().items())[:6])
            log.info("%s/%s done: %s", ckpt.label, planned.key, shown)
            if self.alerts is not None:  # --- wandb-alerts (issue 14): never raises ---
                self.alerts.check(ckpt, planned, result)
        else:
            self.failed += 1
            log.error("%s/%s failed: %s", ckpt.label, planned.key, result.error)

    def _write(self, ckpt: Checkpoint, result: SuiteResult) -> None:
        for sink in self.sinks:
            sink.write(ckpt, result)
