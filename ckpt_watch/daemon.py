"""The daemon's lifecycle: discover → schedule → evaluate → sinks, until told to stop.

Signal handlers only set flags (uvicorn's habit). On the first SIGTERM/SIGINT the
current suite may finish within `drain_seconds`; past that it is cancelled and its row
goes back to pending. A second SIGINT cancels at once. Then adapters are unloaded, a
managed vLLM is stopped, sinks are flushed, and the process exits 0. Under systemd
(NOTIFY_SOCKET) it reports READY, STATUS, WATCHDOG and STOPPING.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckpt_watch import notify
from ckpt_watch.config import Config
from ckpt_watch.core import BASE_STEP, Checkpoint, CheckpointError, CheckpointKind, EngineUnavailable
from ckpt_watch.discovery import Discovery
from ckpt_watch.engines.base import Engine
from ckpt_watch.evaluate import Evaluator
from ckpt_watch.ledger import CkptState, Ledger
from ckpt_watch.progress import LogProgress, RichProgress, make_progress
from ckpt_watch.scheduler import Scheduler
from ckpt_watch.sinks.base import Sink
from ckpt_watch.snapshot import remove_snapshot, snapshot_dir, take_snapshot
from ckpt_watch.watcher import Watcher

log = logging.getLogger(__name__)


@dataclass
class Paths:
    results: Path
    ledger: Path
    cache: Path

    @classmethod
    def of(cls, config: Config) -> Paths:
        root = config.results_dir.resolve()
        return cls(results=root, ledger=root / "ledger.sqlite", cache=root / ".cache")


def build_sinks(config: Config, paths: Paths) -> list[Sink]:
    from ckpt_watch.sinks.jsonfiles import JsonSink

    sinks: list[Sink] = [JsonSink(paths.results)]
    if config.mlflow.enabled:
        from ckpt_watch.sinks.mlflow import MlflowSink

        sinks.append(MlflowSink(config.mlflow, paths.results))
    return sinks


def judge_for(config: Config, paths: Paths) -> Any:
    """The LLM judge when a configured suite needs one (built lazily: it may probe the endpoint)."""
    if config.judge is None or not any(s.needs_judge() for s in config.suites.values()):
        return None
    from ckpt_watch.judge import build_judge

    return build_judge(config.judge, paths.cache / "judge")


def run_params(config: Config) -> dict[str, str]:
    params = {"engine": config.engine.kind, "base_model": config.base_model}
    for name, suite in config.suites.items():
        for key, value in suite.model_dump(mode="json").items():
            params[f"{name}.{key}"] = str(value)[:500]
    return params


class Daemon:
    def __init__(self, config: Config, *, once: bool = False, force: bool = False,
                 engine_factory: Callable[[Config, Path], Engine] | None = None):
        if config.watch.dir is None:
            raise ValueError("no watch directory: set watch.dir or pass --watch")
        self.config = config
        self.once = once
        self.force = force
        self.run_name = config.resolved_run_name()
        self.watch_dir = Path(config.watch.dir).resolve()
        self.paths = Paths.of(config)
        self._engine_factory = engine_factory
        self._engine: Engine | None = None
        self._judge: Any = None
        self._last_status = ""
        self._progress: LogProgress | RichProgress | None = None
        self._stop = False
        self._signals = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    # -- signals ---------------------------------------------------------------------------

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        self._stop = True
        if self._wake is not None:
            self._wake.set()
        if self._signals >= 2 and signum == signal.SIGINT and self._task is not None:
            self._task.cancel()  # second Ctrl-C: no drain

    def request_stop(self) -> None:
        self._on_signal(signal.SIGTERM)

    # -- main loop -------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        ledger = Ledger(self.paths.ledger)
        recovered = ledger.recover()
        if recovered:
            log.info("%d evaluation(s) left running by an earlier session are pending again", recovered)
        if self.force:
            log.info("--force: %d finished evaluation(s) are due again", ledger.force(self.run_name))
        scheduler = Scheduler(ledger, self.run_name, self.config.suites, self.config.scheduler)
        scheduler.plan_base()
        for row in ledger.checkpoints(self.run_name):
            if row.state is CkptState.READY:
                scheduler.plan(row.step, row.is_final)  # new suite configs queue old checkpoints
        discovery = Discovery(self.watch_dir, self.config.watch, ledger, scheduler, self.run_name, self.paths.cache)

        def hint(name: str | None) -> None:
            discovery.hint(name)
            loop.call_soon_threadsafe(self._wake.set)

        watcher = None if self.once else Watcher(self.watch_dir, self.config.watch, hint)
        if watcher is not None:
            watcher.start()
        sinks = build_sinks(self.config, self.paths)
        for sink in sinks:
            sink.start(self.run_name, run_params(self.config))
        evaluator: Evaluator | None = None
        notify.ready(f"watching {self.watch_dir}")
        pinger = asyncio.create_task(self._watchdog_pings(notify.watchdog_interval()))
        full_wait = 0.0  # > 0 while the disk under results_dir is full: seconds until the next try
        try:
            while not self._stop:
                try:
                    if full_wait:
                        self._resume(ledger, scheduler)  # raises again while the disk is still full
                        full_wait = 0.0
                    discovery.poll()
                    step = scheduler.next_step(self._available(ledger))
                    if step is not None:
                        evaluator = evaluator or await self._evaluator(ledger, sinks)
                        await self._evaluate_step(step, ledger, scheduler, evaluator, discovery)
                        continue
                    backlog = sum(len(v) for v in scheduler.pending().values())
                    self._status(f"idle; {backlog} evaluation(s) waiting for checkpoints")
                    if self.once and not discovery.settling():
                        break
                    timeout = discovery.seconds_until_due()
                except (sqlite3.OperationalError, OSError) as exc:
                    if not _disk_full(exc):
                        raise
                    full_wait = min(max(2 * full_wait, 2.0), 60.0)
                    log.error("disk full under %s (%s): waiting for space, next try in %.0f s",
                              self.paths.results, exc, full_wait)
                    self._status(f"disk full under {self.paths.results}; waiting for space")
                    timeout = full_wait
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=timeout)
        finally:
            pinger.cancel()
            notify.stopping("shutting down")
            if watcher is not None:
                watcher.stop()
            if self._progress is not None:
                self._progress.close()
            if self._judge is not None:
                await self._judge.aclose()
            if self._engine is not None:
                await self._engine.close()
            for sink in sinks:
                sink.close()
            ledger.close()
            log.info("stopped")
        return 0

    def _resume(self, ledger: Ledger, scheduler: Scheduler) -> None:
        """After the ledger could not be written (disk full): what was left running is due again and
        checkpoints recorded meanwhile get their evaluations planned, as at start-up."""
        recovered = ledger.recover()
        scheduler.plan_base()
        for row in ledger.checkpoints(self.run_name):
            if row.state is CkptState.READY:
                scheduler.plan(row.step, row.is_final)
        log.info("disk space is back; %d interrupted evaluation(s) pending again", recovered)

    def _status(self, text: str) -> None:
        if text != self._last_status:  # the loop wakes often; systemd needs only changes
            self._last_status = text
            notify.status(text)

    async def _watchdog_pings(self, every: float | None) -> None:
        """systemd's WATCHDOG=1, from its own task: suites run off the event loop, so a
        long evaluation keeps the pings going while a hung loop stops them."""
        while every:
            notify.watchdog()
            await asyncio.sleep(every)

    def _available(self, ledger: Ledger) -> set[int]:
        ready = {r.step for r in ledger.checkpoints(self.run_name) if r.state is CkptState.READY}
        return ready | {BASE_STEP}

    async def _evaluator(self, ledger: Ledger, sinks: list[Sink]) -> Evaluator:
        if self._engine_factory is not None:
            engine = self._engine_factory(self.config, self.paths.results)
        else:
            from ckpt_watch.engines.factory import make_engine

            engine = make_engine(self.config, self.paths.results)
        self._engine = engine
        log.info("starting the %s engine for %s", engine.name, self.config.base_model)
        await engine.start()
        judge = self._judge = judge_for(self.config, self.paths)
        evaluator = Evaluator(engine, sinks, ledger, self.run_name, self.paths.results,
                              self.config.daemon.max_suite_attempts, judge=judge, cache_dir=self.paths.cache)
        self._progress = make_progress()
        evaluator.progress = self._progress
        return evaluator

    def _checkpoint(self, step: int, ledger: Ledger) -> Checkpoint | None:
        if step == BASE_STEP:
            return Checkpoint(self.run_name, BASE_STEP, None, None, CheckpointKind.BASE)
        row = ledger.checkpoint(self.run_name, step)
        if row is None or row.path is None:
            return None
        snap = Path(row.snapshot) if row.snapshot else snapshot_dir(self.paths.cache, self.run_name, step)
        if not snap.is_dir():
            # snapshots are removed once a step is finished; a changed suite config needs it again
            snap = take_snapshot(Path(row.path), self.watch_dir, snapshot_dir(self.paths.cache, self.run_name, step))
        return Checkpoint(self.run_name, step, Path(row.path), snap, CheckpointKind.ADAPTER, row.is_final)

    async def _evaluate_step(
        self, step: int, ledger: Ledger, scheduler: Scheduler, evaluator: Evaluator, discovery: Discovery
    ) -> None:
        suites = scheduler.pending().get(step, [])
        try:
            ckpt = self._checkpoint(step, ledger)
        except CheckpointError as exc:
            scheduler.skip(step, f"adapter no longer available: {exc}")
            return
        if ckpt is None:
            scheduler.skip(step, "checkpoint unknown to the ledger")
            return
        backlog = sum(len(v) for v in scheduler.pending().values())
        self._status(f"evaluating {ckpt.label} ({len(suites)} suite(s)); backlog {backlog}")
        self._task = asyncio.create_task(evaluator.evaluate(ckpt, suites, lambda: self._stop))
        try:
            await self._drain(self._task, discovery)
        except EngineUnavailable as exc:
            await self._recover_engine(exc)
            return
        except asyncio.CancelledError:
            if not self._stop:
                raise
            return
        finally:
            self._task = None
        if not scheduler.pending().get(step) and ckpt.adapter_dir is not None:
            remove_snapshot(ckpt.adapter_dir)

    async def _drain(self, task: asyncio.Task, discovery: Discovery) -> None:
        """Wait for the task while still snapshotting new checkpoints (rotation may delete
        them before the current evaluation ends); once stopping, give it drain_seconds."""
        waiter = asyncio.ensure_future(self._wake.wait())
        try:
            while not task.done():
                if self._stop:
                    try:
                        await asyncio.wait_for(asyncio.shield(task), timeout=self.config.daemon.drain_seconds)
                    except TimeoutError:
                        log.warning("drain time (%.0f s) over: the current suite is left pending",
                                    self.config.daemon.drain_seconds)
                        task.cancel()
                        await asyncio.gather(task, return_exceptions=True)
                        return
                    break
                await asyncio.wait({task, waiter}, timeout=discovery.seconds_until_due(),
                                   return_when=asyncio.FIRST_COMPLETED)
                if waiter.done():
                    self._wake.clear()
                    waiter = asyncio.ensure_future(self._wake.wait())
                if not self._stop:
                    discovery.poll()
        finally:
            waiter.cancel()
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            raise exc

    async def _recover_engine(self, exc: EngineUnavailable) -> None:
        log.error("engine unavailable: %s", exc)
        restart = getattr(self._engine, "restart", None)
        delay = 5.0
        while not self._stop:
            try:
                if restart is not None:
                    await restart()
                    return
                await asyncio.sleep(delay)
                return
            except EngineUnavailable as again:
                log.error("engine still unavailable (%s); retrying in %.0f s", again, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 120.0)


def _disk_full(exc: BaseException) -> bool:
    """ENOSPC / EDQUOT from a file write, or SQLite's "database or disk is full" (the ledger and
    the MLflow outbox live under results_dir too)."""
    if isinstance(exc, sqlite3.OperationalError):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
