"""The daemon's lifecycle: discover → schedule → evaluate → sinks, until told to stop.

It watches one training folder (`watch.dir`) or a root of them (`watch.root`, each subfolder a
run, found when its first checkpoint appears): every run is a `RunWatch` (runwatch.py) with its
own lock, ledger rows, results and MLflow run, and all share one engine and judge. Work is
taken round-robin across runs (newest first within a run, the scheduler's order), up to
`engine.max_adapters_in_flight` checkpoints at once, so no run waits for another to finish.

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
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from ckpt_watch import notify
from ckpt_watch.app import App, Paths, build_engine, build_sinks, judge_for, run_params  # noqa: F401 (re-exported)
from ckpt_watch.checkpoints import Layout, scan
from ckpt_watch.config import Config
from ckpt_watch.core import BASE_STEP, Checkpoint, EngineUnavailable, Stopped
from ckpt_watch.engines.base import Engine
from ckpt_watch.errors import ConfigError
from ckpt_watch.evaluate import run_together
from ckpt_watch.ledger import CkptState, Ledger
from ckpt_watch.locking import DAEMON, ONESHOT, LockHeld, RunLock
from ckpt_watch.progress import LogProgress, RichProgress, make_progress
from ckpt_watch.runwatch import NotYetKnown, RunWatch, base_mismatch, find_runs, run_name_of
from ckpt_watch.scheduler import PlannedSuite
from ckpt_watch.status import HEARTBEAT_SECONDS
from ckpt_watch.watcher import Watcher

log = logging.getLogger(__name__)
T = TypeVar("T")

START_EXTEND_SECONDS = 60.0  # EXTEND_TIMEOUT_USEC granted per message while the engine starts


class Daemon:
    def __init__(self, config: Config, *, once: bool = False, force: bool = False, exit_after_final: bool = False,
                 engine_factory: Callable[[Config, Path], Engine] | None = None):
        if config.watch.dir is None and config.watch.root is None:
            raise ValueError("no watch directory: set watch.dir (or watch.root) or pass --watch")
        self.config = config
        self.once = once
        self.force = force
        self.exit_after_final = exit_after_final  # a Job's sidecar: done once the final checkpoint is
        self._finished = False  # ... and everything due before it is evaluated (then exit like --once)
        self.root = Path(config.watch.root).resolve() if config.watch.root is not None else None
        self.watch_dir = self.root or Path(config.watch.dir).resolve()
        self.mode = ONESHOT if once else DAEMON
        self.paths = Paths.of(config)
        self._engine_factory = engine_factory
        self.runs: list[RunWatch] = []
        self._closing: list[RunWatch] = []  # runs a guest left (closed at teardown)
        self._by_folder: dict[str, RunWatch] = {}  # a root's subfolder name → its run (watcher hints)
        self._unreadable: set[Path] = set()  # a root's subfolders with checkpoints but no adapter config yet
        self._refused: dict[Path, str] = {}  # a root's subfolders not served (another base model, a lock held)
        self._root_ledger: Ledger | None = None  # records why a root's run is refused (for `status`)
        self._root_rescan = True
        self._last_root_scan = float("-inf")
        self._rr = 0  # round-robin: the run served first next turn
        self._shared_base: dict[str, tuple[str, Any]] = {}  # watch.root: suite hash → (run, its step-0 result)
        self.engine: Engine | None = None
        self.judge = None
        self._judge_method: str | None = None
        self._engine_ready = False
        self._last_status = ""
        self._progress: LogProgress | RichProgress | None = None
        self._stop = False
        self._signals = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._watcher: Watcher | None = None

    @property
    def run_name(self) -> str | None:
        """The (first) run's name."""
        return self.runs[0].name if self.runs else None

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
        beats = asyncio.create_task(self._beat_every())  # --- status (issue 14) ---
        try:
            await self._open_runs()
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
            self._beat("stopping")
            await self._teardown()
        return self._exit_code()

    def _exit_code(self) -> int:
        if not (self.once or self._finished):
            return 0
        failed = sum(run.app.failed for run in [*self.runs, *self._closing])
        log.info("run %s: %s", "--once" if self.once else "--exit-after-final",
                 f"{failed} evaluation(s) failed" if failed else "all due evaluations succeeded")
        return 1 if failed else 0

    # -- runs --------------------------------------------------------------------------------

    async def _open_runs(self) -> None:
        """The watched folder's run; or, with watch.root, every subfolder that has a checkpoint."""
        if self.root is None:
            await self._add_run(self.watch_dir, wait=True)
            return
        self._root_ledger = Ledger(self.paths.ledger)
        await self._find_runs()

    async def _add_run(self, folder: Path, *, wait: bool, base_run: str | None = None) -> RunWatch:
        run = RunWatch(self.config, folder, mode=self.mode, base_run=base_run)
        if self.root is not None:  # one base model on one engine: step 0 is evaluated once for all runs
            run.app.shared_base = self._shared_base
        try:
            await run.open(lambda: self._stop, force=self.force, wait=wait, judge_method=self._judge_method)
        except BaseException:
            await run.close()
            raise
        self._judge_method = self._judge_method or run.app.judge_method
        self.runs.append(run)
        self._by_folder[folder.name] = run
        if self._engine_ready:
            run.adopt(self.engine, self.judge, self._progress)
        elif self.engine is not None:
            run.app.use_engine(self.engine)
        return run

    async def _find_runs(self) -> None:
        """A root's rescan: every subfolder with a checkpoint becomes a run (once); one whose adapters
        name another base model, or that another daemon evaluates, is refused with the reason."""
        self._root_rescan, self._last_root_scan = False, time.monotonic()
        known = {run.watch_dir for run in [*self.runs, *self._closing]}
        layout = Layout(self.config.watch)
        for folder in find_runs(self.root, layout):
            if folder in known or self._stop:
                continue
            try:
                why = base_mismatch(folder, layout, self._served())
            except NotYetKnown:
                if folder not in self._unreadable:  # a save under way, or not a LoRA run (no adapter config)
                    log.info("%s: no readable adapter_config.json yet; not a run until one is", folder)
                    self._unreadable.add(folder)
                continue  # the next rescan looks again
            if why:
                self._refuse(folder, why)
                continue
            try:
                run = await self._add_run(folder, wait=False, base_run=run_name_of(folder))
            except LockHeld as held:
                self._refuse(folder, f"{held}; looked at again at the next rescan", record=False)
                continue
            self._refused.pop(folder, None)
            log.info("run %s: found in %s (%s)", run.name, self.root, folder.name)

    def _served(self) -> list[str]:
        from ckpt_watch.models import resolve_base_model

        names = [self.config.base_model]
        with contextlib.suppress(OSError, ValueError):  # e.g. the bundled model not installed: the engine says so
            names.append(resolve_base_model(self.config.base_model))
        return names

    def _refuse(self, folder: Path, why: str, *, record: bool = True) -> None:
        """Log why a root's subfolder is not served; record it on its checkpoints (for `status`) under
        the run's lock, so a daemon that serves that base model on the same results dir is never
        overwritten (its lock held: nothing recorded; its rows: left as they are)."""
        if self._refused.get(folder) != why:
            log.error("%s", why)
            self._refused[folder] = why
        if not record or self._root_ledger is None:
            return
        base_run = run_name_of(folder)
        try:
            lock = RunLock.acquire(self.paths.results, base_run, self.mode, peek=True)
        except LockHeld:
            return  # another process evaluates it
        try:
            name = self._root_ledger.current_run(base_run)
            for step, path in sorted(scan(folder, Layout(self.config.watch)).items()):
                row = self._root_ledger.checkpoint(name, step)
                if row is None or (row.state is not CkptState.READY and row.error != why):
                    self._root_ledger.set_checkpoint(name, step, CkptState.FAILED, path=str(path), error=why)
        finally:
            lock.release()

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        def hint(rel: str | None) -> None:  # the watcher thread: O(1)
            if self.root is None:
                if self.runs:
                    self.runs[0].discovery.hint(rel)
            else:
                folder, _, child = (rel or "").partition("/")
                run = self._by_folder.get(folder) if folder else None
                if run is None:
                    if self.root / folder not in self._refused:  # refused: periodic rescans only
                        self._root_rescan = True
                elif run.discovery is not None:
                    run.discovery.hint(child or None)
            loop.call_soon_threadsafe(self._wake.set)

        if not self.once:
            self._watcher = Watcher(self.watch_dir, self.config.watch, hint, depth=1 if self.root is None else 2)
            self._watcher.start()

    # -- the loop ----------------------------------------------------------------------------

    async def _loop(self) -> None:
        full_wait = 0.0  # > 0 while the disk under results_dir is full: seconds until the next try
        while not self._stop:
            try:
                if full_wait:
                    self._resume()  # raises again while the disk is still full
                    full_wait = 0.0
                if await self._step():
                    continue
                if self.once and not self._settling():
                    break
                timeout = self._seconds_until_due()
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

    def _settling(self) -> bool:
        return any(run.settling() for run in self.runs)

    def _seconds_until_due(self) -> float:
        waits = [run.seconds_until_due() for run in self.runs]
        if self.root is not None:
            waits.append(self._last_root_scan + self.config.watch.rescan_seconds - time.monotonic())
        return max(0.05, min(waits, default=self.config.watch.rescan_seconds))

    def _root_due(self) -> bool:
        return self.root is not None and (
            self._root_rescan or time.monotonic() - self._last_root_scan >= self.config.watch.rescan_seconds)

    async def _step(self) -> bool:
        """One turn: look for runs and checkpoints, evaluate the next due step(s). True if work was done."""
        if self._root_due():
            await self._find_runs()
        if self._poll_runs():
            return True
        work = self._next_work()
        if not work:
            return self._idle()
        await self._start_engine()
        await self._evaluate_steps(work)
        return True

    def _poll_runs(self) -> bool:
        """Every run's discovery; True when one started a new training run (or a guest stopped)."""
        changed = False
        for run in list(self.runs):
            if not run.poll():
                continue
            changed = True
            if run.stopped:
                if self.root is None:
                    self._stop = True
                else:
                    self.runs.remove(run)
                    self._closing.append(run)
        return changed

    def _next_work(self) -> list[tuple[RunWatch, int]]:
        """Up to engine.adapters_in_flight() steps, taken round-robin across runs (each run's own order
        within it); the next turn starts with the run after the first one served now."""
        k = self.config.engine.adapters_in_flight()
        n = len(self.runs)
        order = [self.runs[(self._rr + i) % n] for i in range(n)]
        queues = [(run, run.next_steps(k)) for run in order]
        bases = [q for _, q in queues if q == [BASE_STEP]]
        for q in bases[1:]:
            q.clear()  # one run's base model at a time: the others then share its result (evaluate.py)
        work: list[tuple[RunWatch, int]] = []
        while len(work) < k and any(q for _, q in queues):
            for run, q in queues:
                if q and len(work) < k:
                    work.append((run, q.pop(0)))
        if work:
            self._rr = (self.runs.index(work[0][0]) + 1) % n
        return work

    def _idle(self) -> bool:
        recovered = sum(run.app.recover_orphans() for run in self.runs)
        if recovered:
            log.info("%d evaluation(s) left running by a process that is gone are pending again", recovered)
            return True
        backlog = sum(run.backlog() for run in self.runs)
        if self.exit_after_final and (final := self._final_evaluated()) is not None:
            log.info("the final checkpoint (step %s) and every due checkpoint before it are evaluated; "
                     "exiting (--exit-after-final)", final)
            self._finished = self._stop = True
            return False
        self._status(f"idle; {backlog} evaluation(s) waiting for checkpoints")
        return False

    def _final_evaluated(self) -> str | None:
        """Every run's final step once each is known and evaluated (see RunWatch.final_evaluated)."""
        finals = [(run.name, run.final_evaluated()) for run in self.runs]
        if not finals or any(step is None for _, step in finals):
            return None
        return ", ".join(f"{step}" if self.root is None else f"{name}: {step}" for name, step in finals)

    async def _teardown(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
        if self._progress is not None:
            self._progress.close()
        try:
            try:
                if self.judge is not None:
                    await self.judge.aclose()
            finally:
                if self.engine is not None:
                    await self.engine.close()
        finally:
            for run in [*self.runs, *self._closing]:
                try:
                    await run.close()
                except Exception as exc:  # the others' sinks and locks still close
                    log.error("run %s: closing failed: %s", run.name, exc)
            if self._root_ledger is not None:
                self._root_ledger.close()
        log.info("stopped")

    def _resume(self) -> None:
        recovered = sum(run.resume() for run in self.runs)
        log.info("disk space is back; %d interrupted evaluation(s) pending again", recovered)

    def _status(self, text: str) -> None:
        if text != self._last_status:  # the loop wakes often; systemd needs only changes
            self._last_status = text
            notify.status(text)
            self._beat(text)  # --- status (issue 14) ---

    def _beat(self, text: str | None = None) -> None:
        for run in self.runs:
            run.heartbeat.beat(text)

    async def _beat_every(self) -> None:
        while True:
            self._beat()
            await asyncio.sleep(HEARTBEAT_SECONDS)

    async def _watchdog_pings(self, every: float | None) -> None:
        """systemd's WATCHDOG=1, from its own task: suites run off the event loop, so a
        long evaluation keeps the pings going while a hung loop stops them."""
        while every:
            notify.watchdog()
            await asyncio.sleep(every)

    # -- engine ----------------------------------------------------------------------------

    async def _start_engine(self) -> None:
        """The one engine (and judge) every run shares."""
        if self._engine_ready:
            return
        self._status(f"starting the {self.config.engine.kind} engine")
        if self.engine is None:
            self.engine = build_engine(self.config, self.paths, self._engine_factory)
        for run in self.runs:
            run.app.use_engine(self.engine)  # the heartbeat shows it starting (a vLLM server's log)
        log.info("starting the %s engine for %s", self.engine.name, self.config.base_model)
        await self._cancellable(self.engine.start())
        if self.judge is None:
            self.judge = judge_for(self.config, self.paths, self._judge_method)
        self._progress = self._progress or make_progress()
        for run in self.runs:
            run.adopt(self.engine, self.judge, self._progress)
        self._engine_ready = True

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

    async def _evaluate_steps(self, steps: list[tuple[RunWatch, int]]) -> None:
        """Evaluate one step, or several at once (catch-up, or several runs: engine.max_adapters_in_flight
        adapters loaded together, each with its own suites); every one is drained, or released, alike."""
        pending = {id(run): run.pending() for run, _ in steps}
        retried = [(run, s) for run, s in steps if run.app.evaluator.retried(s, pending[id(run)].get(s, []))]
        if len(steps) > 1 and retried:
            steps = retried[:1]  # alone, suites in turn: what crashed is found without charging the others
        work = [(run, ckpt, pending[id(run)].get(step, [])) for run, step in steps
                if (ckpt := run.resolve(step)) is not None]
        if not work:
            return
        backlog = sum(len(v) for p in pending.values() for v in p.values())
        shown = ", ".join(ckpt.label for _, ckpt, _ in work)
        self._status(f"evaluating {shown} ({sum(len(s) for *_, s in work)} suite(s)); backlog {backlog}")
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
        for run in {id(run): run for run, _, _ in work}.values():
            run.prune_snapshots()

    async def _evaluate_all(self, work: list[tuple[RunWatch, Checkpoint, list[PlannedSuite]]]) -> None:
        if len(work) == 1:
            (run, ckpt, suites), = work
            await run.app.evaluator.evaluate(ckpt, suites, lambda: self._stop)
            return
        prepare = getattr(self.engine, "prepare", None)  # vLLM: a guessed LoRA rank grown once, up front
        if prepare is not None:
            await prepare([c for _, c, _ in work])
        # cancelled (the drain is over), each evaluation releases its own rows
        await run_together([run.app.evaluator.evaluate(c, s, lambda: self._stop) for run, c, s in work])

    async def _drain(self, task: asyncio.Task) -> None:
        """Wait for the task while still snapshotting new checkpoints of every run (rotation may delete
        them before the current evaluation ends); once stopping, give it drain_seconds."""
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
                await asyncio.wait({task, waiter}, timeout=self._seconds_until_due(),
                                   return_when=asyncio.FIRST_COMPLETED)
                if waiter.done():
                    self._wake.clear()
                    waiter = asyncio.ensure_future(self._wake.wait())
                if not self._stop:
                    await self._look_while_draining()
        finally:
            waiter.cancel()
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            raise exc

    async def _look_while_draining(self) -> None:
        """New runs and checkpoints while an evaluation runs (rotation may delete them before it ends).
        A failure here (a full disk, a judge that cannot be decided for a new run) is logged and left
        to the main loop: raised, it would abandon the running evaluation to a second claim."""
        try:
            if self._root_due():
                await self._find_runs()
            for run in self.runs:
                if run.discovery.new_training is None:
                    run.discovery.poll()
        except (OSError, sqlite3.Error, ConfigError, Stopped) as exc:
            log.warning("looking for checkpoints while evaluating failed (%s); looked at again after it", exc)

    async def _recover_engine(self, exc: EngineUnavailable) -> None:
        log.error("engine unavailable: %s", exc)
        restart = getattr(self.engine, "restart", None)
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
