"""The daemon's lifecycle: discover → schedule → evaluate → sinks, until told to stop.

Signal handlers only set flags (uvicorn's habit). On the first SIGTERM/SIGINT the running
suites — of one checkpoint, or of the `engine.max_adapters_in_flight` checkpoints evaluated
together — or the engine's start-up may finish within `drain_seconds`; past that they are
cancelled (a managed vLLM server being started is terminated) and their rows go back to
pending. A second SIGINT cancels at once. Then adapters are unloaded, a managed vLLM is
stopped, sinks are flushed, the run's lock is released, and the process exits 0. Under
systemd (NOTIFY_SOCKET) it reports READY once the engine answers (EXTEND_TIMEOUT_USEC
keeps a slow start alive, WATCHDOG pings run from the start), STATUS, and STOPPING.

`run --once` evaluates what is due now and returns 1 when any evaluation it made failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from ckpt_watch import notify
from ckpt_watch.app import App, Paths, build_sinks, judge_for, run_params  # noqa: F401 (re-exported)
from ckpt_watch.config import Config
from ckpt_watch.core import BASE_STEP, Checkpoint, CheckpointError, CheckpointKind, EngineUnavailable, Stopped
from ckpt_watch.discovery import Discovery
from ckpt_watch.engines.base import Engine
from ckpt_watch.evaluate import run_together
from ckpt_watch.ledger import CkptState
from ckpt_watch.locking import DAEMON, ONESHOT
from ckpt_watch.progress import LogProgress, RichProgress, make_progress
from ckpt_watch.snapshot import remove_snapshot, snapshot_dir, take_snapshot
from ckpt_watch.status import Heartbeat  # --- status (issue 14): status.json for `ckpt-watch status` ---
from ckpt_watch.watcher import Watcher

log = logging.getLogger(__name__)
T = TypeVar("T")

START_EXTEND_SECONDS = 60.0  # EXTEND_TIMEOUT_USEC granted per message while the engine starts


class Daemon:
    def __init__(self, config: Config, *, once: bool = False, force: bool = False, exit_after_final: bool = False,
                 engine_factory: Callable[[Config, Path], Engine] | None = None):
        if config.watch.dir is None:
            raise ValueError("no watch directory: set watch.dir or pass --watch")
        self.config = config
        self.once = once
        self.force = force
        self.exit_after_final = exit_after_final  # a Job's sidecar: done once the final checkpoint is
        self._finished = False  # ... and everything due before it is evaluated (then exit like --once)
        self.watch_dir = Path(config.watch.dir).resolve()
        self.app = App(config, mode=ONESHOT if once else DAEMON, engine_factory=engine_factory)
        self.paths = self.app.paths
        self._last_status = ""
        self._progress: LogProgress | RichProgress | None = None
        self._stop = False
        self._signals = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._discovery: Discovery | None = None
        self._watcher: Watcher | None = None
        self._heartbeat = Heartbeat(self.app)  # --- status (issue 14) ---

    @property
    def run_name(self) -> str:
        return self.app.run

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
        """0 when stopped (or, with --once, when everything it evaluated succeeded), 1 when
        --once recorded a failure. LockHeld (another daemon on this run) propagates: exit 2."""
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        pinger = asyncio.create_task(self._watchdog_pings(notify.watchdog_interval()))
        extender = asyncio.create_task(self._extend_start_timeout())  # until READY: lock wait, judge, engine
        beats = asyncio.create_task(self._heartbeat.every())  # --- status (issue 14) ---
        try:
            await self.app.open(lambda: self._stop)
            self._open_run()
            if self.force:
                log.info("--force: %d finished evaluation(s) are due again", self.app.ledger.force(self.run_name))
            self._watch(loop)
            if not self.once and not self._stop:
                await self._start_engine()  # READY=1 only once the engine answers
            extender.cancel()
            if not self._stop:
                notify.ready(f"watching {self.watch_dir}")
                await self._loop()
        except Stopped:
            log.info("stop requested while starting up")
        finally:
            extender.cancel()
            pinger.cancel()
            notify.stopping("shutting down")
            beats.cancel()  # --- status (issue 14) ---
            self._heartbeat.beat("stopping")
            await self._teardown()
            self._heartbeat.beat("stopped")  # --- end status ---
        return self._exit_code()

    def _exit_code(self) -> int:
        if not (self.once or self._finished):
            return 0
        failed = self.app.failed
        log.info("run %s: %s", "--once" if self.once else "--exit-after-final",
                 f"{failed} evaluation(s) failed" if failed else "all due evaluations succeeded")
        return 1 if failed else 0

    def _open_run(self) -> None:
        """(Re)build what belongs to the current training run: queued work and discovery."""
        self.app.plan_known()
        self._discovery = Discovery(self.watch_dir, self.config.watch, self.app.ledger, self.app.scheduler,
                                    self.run_name, self.paths.cache, previous_runs=self.app.previous_runs())

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        def hint(name: str | None) -> None:
            if self._discovery is not None:
                self._discovery.hint(name)
            loop.call_soon_threadsafe(self._wake.set)

        if not self.once:
            self._watcher = Watcher(self.watch_dir, self.config.watch, hint)
            self._watcher.start()

    async def _loop(self) -> None:
        full_wait = 0.0  # > 0 while the disk under results_dir is full: seconds until the next try
        while not self._stop:
            try:
                if full_wait:
                    self._resume()  # raises again while the disk is still full
                    full_wait = 0.0
                if await self._step():
                    continue
                if self.once and not self._discovery.settling():
                    break
                timeout = self._discovery.seconds_until_due()
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

    async def _step(self) -> bool:
        """One turn: look for checkpoints, evaluate the next due step. True if work was done."""
        self._discovery.poll()
        if self._discovery.new_training is not None:
            self._new_training()
            return True
        steps = self.app.scheduler.next_steps(self._available(), self.config.engine.adapters_in_flight())
        if not steps:
            if recovered := self.app.recover_orphans():
                log.info("%d evaluation(s) left running by a process that is gone are pending again", recovered)
                return True
            backlog = sum(len(v) for v in self.app.scheduler.pending().values())
            if self.exit_after_final and (final := self._final_evaluated()) is not None:
                log.info("the final checkpoint (step %d) and every due checkpoint before it are evaluated; "
                         "exiting (--exit-after-final)", final)
                self._finished = self._stop = True
                return False
            self._status(f"idle; {backlog} evaluation(s) waiting for checkpoints")
            return False
        await self._start_engine()
        await self._evaluate_steps(steps)
        return True

    def _new_training(self) -> None:
        found = self._discovery.new_training
        if self.app.guest:
            # only the run's lock holder starts a new run (else two processes could start two)
            log.warning("%s: a new training run in the same folder; the daemon evaluating this run starts it, "
                        "this process stops here", found)
            self._stop = True
            return
        self.app.switch_run(str(found))
        self._open_run()

    async def _teardown(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
        if self._progress is not None:
            self._progress.close()
        await self.app.close()
        log.info("stopped")

    def _resume(self) -> None:
        """After the ledger could not be written (disk full): what was left running is due again and
        checkpoints recorded meanwhile get their evaluations planned, as at start-up."""
        recovered = self.app.ledger.recover([self.run_name]) if not self.app.guest else 0
        self.app.plan_known()
        log.info("disk space is back; %d interrupted evaluation(s) pending again", recovered)

    def _status(self, text: str) -> None:
        if text != self._last_status:  # the loop wakes often; systemd needs only changes
            self._last_status = text
            notify.status(text)
            self._heartbeat.beat(text)  # --- status (issue 14) ---

    async def _watchdog_pings(self, every: float | None) -> None:
        """systemd's WATCHDOG=1, from its own task: suites run off the event loop, so a
        long evaluation keeps the pings going while a hung loop stops them."""
        while every:
            notify.watchdog()
            await asyncio.sleep(every)

    def _final_evaluated(self) -> int | None:
        """The final checkpoint's step once it is known and nothing due is left (called when no
        available step is due) and no folder is still being written; else None."""
        finals = [r.step for r in self.app.ledger.checkpoints(self.run_name)
                  if r.is_final and r.state is CkptState.READY]
        if not finals or self._discovery.settling():
            return None
        return max(finals)

    def _available(self) -> set[int]:
        ready = {r.step for r in self.app.ledger.checkpoints(self.run_name) if r.state is CkptState.READY}
        return ready | {BASE_STEP}

    # -- engine ----------------------------------------------------------------------------

    async def _start_engine(self) -> None:
        if self.app.evaluator is not None:
            return
        self._status(f"starting the {self.config.engine.kind} engine")
        await self._cancellable(self.app.start_engine())
        self._progress = self._progress or make_progress()
        self.app.progress = self._progress
        self.app.evaluator.progress = self._progress

    async def _extend_start_timeout(self) -> None:
        """Under systemd, keep TimeoutStartSec from killing a slow (minutes-long) vLLM start."""
        while True:
            notify.notify(f"EXTEND_TIMEOUT_USEC={int(START_EXTEND_SECONDS * 2 * 1_000_000)}")
            await asyncio.sleep(START_EXTEND_SECONDS)

    async def _cancellable(self, aw: Awaitable[T]) -> T:
        """Await `aw` (engine start-up or restart) as a task a stop request can end: it gets
        drain_seconds to finish, then it is cancelled (a starting server is terminated) and
        Stopped is raised. The 'cancellable' marker: nothing long runs outside such a task."""
        task = asyncio.ensure_future(aw)
        self._task = task
        try:
            while not task.done():
                waiter = asyncio.ensure_future(self._wake.wait())
                await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if self._stop and not task.done():
                    try:
                        return await asyncio.wait_for(asyncio.shield(task), self.config.daemon.drain_seconds)
                    except (TimeoutError, asyncio.CancelledError):  # drain over, or a second Ctrl-C
                        task.cancel()
                        await asyncio.gather(task, return_exceptions=True)
                        raise Stopped() from None
                if not self._stop:
                    self._wake.clear()
            if task.cancelled():
                raise Stopped()
            return task.result()
        finally:
            self._task = None

    # -- one step ----------------------------------------------------------------------------

    def _checkpoint(self, step: int) -> Checkpoint | None:
        if step == BASE_STEP:
            return Checkpoint(self.run_name, BASE_STEP, None, None, CheckpointKind.BASE)
        row = self.app.ledger.checkpoint(self.run_name, step)
        if row is None or row.path is None:
            return None
        snap = Path(row.snapshot) if row.snapshot else snapshot_dir(self.paths.cache, self.run_name, step)
        if not snap.is_dir():
            # dropped by keep_snapshots; a changed suite config needs it again
            again = take_snapshot(Path(row.path), self.watch_dir, snapshot_dir(self.paths.cache, self.run_name, step))
            if row.sha256 and again.sha256 != row.sha256:
                raise CheckpointError(f"{row.path} now holds other weights than step {step} had (a new training "
                                      "run); this run's step is not re-evaluated on them")
            snap = again.path
        return Checkpoint(self.run_name, step, Path(row.path), snap, CheckpointKind.ADAPTER, row.is_final,
                          epoch=row.epoch)

    def _resolve(self, step: int) -> Checkpoint | None:
        """The step's checkpoint, or None after recording why it cannot be evaluated."""
        try:
            ckpt = self._checkpoint(step)
        except CheckpointError as exc:
            self.app.scheduler.skip(step, f"adapter no longer available: {exc}")
            return None
        if ckpt is None:
            self.app.scheduler.skip(step, "checkpoint unknown to the ledger")
        return ckpt

    async def _evaluate_steps(self, steps: list[int]) -> None:
        """Evaluate one step, or several at once (catch-up: engine.max_adapters_in_flight adapters
        loaded together, each with its own suites); every one is drained, or released, alike."""
        pending = self.app.scheduler.pending()
        retried = [s for s in steps if self.app.evaluator.retried(s, pending.get(s, []))]
        if len(steps) > 1 and retried:
            steps = retried[:1]  # alone, suites in turn: what crashed is found without charging the others
        work = [(ckpt, pending.get(ckpt.step, [])) for ckpt in map(self._resolve, steps) if ckpt is not None]
        if not work:
            return
        backlog = sum(len(v) for v in pending.values())
        shown = ", ".join(ckpt.label for ckpt, _ in work)
        self._status(f"evaluating {shown} ({sum(len(s) for _, s in work)} suite(s)); backlog {backlog}")
        self._task = asyncio.create_task(self._evaluate_all(work))
        try:
            await self._drain(self._task)
        except EngineUnavailable as exc:
            await self._recover_engine(exc)
            return
        except asyncio.CancelledError:
            if not self._stop:
                raise
            return
        finally:
            self._task = None
        self._prune_snapshots()

    async def _evaluate_all(self, work: list[tuple[Checkpoint, list]]) -> None:
        evaluator = self.app.evaluator
        if len(work) == 1:
            (ckpt, suites), = work
            await evaluator.evaluate(ckpt, suites, lambda: self._stop)
            return
        prepare = getattr(self.app.engine, "prepare", None)  # vLLM: a guessed LoRA rank grown once, up front
        if prepare is not None:
            await prepare([c for c, _ in work])
        # cancelled (the drain is over), each evaluation releases its own rows
        await run_together([evaluator.evaluate(c, s, lambda: self._stop) for c, s in work])

    def _prune_snapshots(self) -> None:
        """Keep the newest `daemon.keep_snapshots` finished steps' snapshots (all when null)."""
        keep = self.config.daemon.keep_snapshots
        if keep is None:
            return
        pending = set(self.app.scheduler.pending())
        rows = [r for r in self.app.ledger.checkpoints(self.run_name)
                if r.state is CkptState.READY and r.snapshot and r.step not in pending]
        for row in sorted(rows, key=lambda r: r.step, reverse=True)[keep:]:
            remove_snapshot(Path(row.snapshot))

    async def _drain(self, task: asyncio.Task) -> None:
        """Wait for the task while still snapshotting new checkpoints (rotation may delete
        them before the current evaluation ends); once stopping, give it drain_seconds."""
        discovery = self._discovery
        waiter = asyncio.ensure_future(self._wake.wait())
        try:
            while not task.done():
                if self._stop:
                    try:
                        await asyncio.wait_for(asyncio.shield(task), timeout=self.config.daemon.drain_seconds)
                    except TimeoutError:
                        log.warning("drain time (%.0f s) over: the running suites are left pending",
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
                if not self._stop and discovery.new_training is None:
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
        restart = getattr(self.app.engine, "restart", None)
        delay = 5.0
        while not self._stop:
            try:
                if restart is not None:
                    await self._cancellable(restart())
                    return
                await self._sleep(delay)
                return
            except Stopped:
                return
            except EngineUnavailable as again:
                log.error("engine still unavailable (%s); retrying in %.0f s", again, delay)
                await self._sleep(delay)
                delay = min(delay * 2, 120.0)

    async def _sleep(self, seconds: float) -> None:
        """Sleep that a stop request ends at once."""
        self._wake.clear()
        if not self._stop:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=seconds)


def _disk_full(exc: BaseException) -> bool:
    """ENOSPC / EDQUOT from a file write, or SQLite's "database or disk is full" (the ledger and
    the MLflow outbox live under results_dir too)."""
    if isinstance(exc, sqlite3.OperationalError):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
