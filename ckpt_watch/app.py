"""The application: config → run identity, lock, ledger, scheduler, sinks, engine, judge, evaluator.

One object wires them for the daemon (`ckpt-watch run`) and the one-shot commands (`eval`,
`run --once`) alike, and tears them down in the reverse order. A step's way through it is
claim (ledger) → evaluate (engine, suites) → commit (sinks, then ledger); see evaluate.py.

Run identity: a watched folder has a base run name (`run_name`, or the folder's name plus a
short hash of its path). Each training run seen in that folder is its own run in the ledger,
the JSON results and MLflow: the first keeps the base name, a retraining into the same folder
(a known step whose adapter fingerprint changed) becomes `<base>-t2`, and so on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckpt_watch.config import Config
from ckpt_watch.core import Stopped
from ckpt_watch.engines.base import Engine
from ckpt_watch.evaluate import Evaluator
from ckpt_watch.ledger import CkptState, Ledger
from ckpt_watch.locking import DAEMON, ONESHOT, LockHeld, OwnerMark, RunLock, owner_alive
from ckpt_watch.redact import redact_text
from ckpt_watch.scheduler import Scheduler
from ckpt_watch.sinks.base import Sink

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
    if config.wandb.enabled:  # --- wandb-alerts (issue 14) ---
        from ckpt_watch.sinks.wandb import WandbSink

        sinks.append(WandbSink(config.wandb, paths.results))
    return sinks


def needs_judge(config: Config) -> bool:
    return config.judge is not None and any(s.needs_judge() for s in config.suites.values())


def judge_for(config: Config, paths: Paths, method: str | None = None) -> Any:
    """The LLM judge when a configured suite needs one; `method` as decided at start-up."""
    if not needs_judge(config):
        return None
    from ckpt_watch.judge import build_judge

    return build_judge(config.judge, paths.cache / "judge", method=method)


def build_engine(config: Config, paths: Paths, factory: Callable[[Config, Path], Engine] | None = None) -> Engine:
    """The engine the config asks for (not started); `factory` replaces the choice (tests, benches)."""
    if factory is not None:
        return factory(config, paths.results)
    from ckpt_watch.engines.factory import make_engine

    return make_engine(config, paths.results)


def run_params(config: Config) -> dict[str, str]:
    """Run-level params for the sinks; a value holding a URL with credentials is redacted."""
    params = {"engine": config.engine.kind, "base_model": redact_text(config.base_model)}
    for name, suite in config.suites.items():
        for key, value in suite.model_dump(mode="json").items():
            params[f"{name}.{key}"] = redact_text(str(value))[:500]
    if config.personas is not None:
        params["personas.source"] = str(config.personas.source)
        for persona, prompt in config.personas.prompts.items():
            params[f"personas.{persona}"] = redact_text(str(prompt))[:500]
    return params


class App:
    """`App(config, mode)`; `await open(stopping)`; `switch_run(run)`; `await start_engine()` (or
    `adopt(engine, judge)`: one engine shared by the runs of a `watch.root`, closed by whoever made
    it); `await close()`. `run` is the current training run's name; `failed` counts (step, suite)
    evaluations this process recorded as failed."""

    def __init__(self, config: Config, *, mode: str, base_run: str | None = None,
                 engine_factory: Callable[[Config, Path], Engine] | None = None):
        self.config = config
        self.mode = mode
        self.paths = Paths.of(config)
        self.base_run = base_run or config.resolved_run_name()
        self._engine_factory = engine_factory
        self.lock: RunLock | None = None
        self.owner: OwnerMark | None = None
        self.ledger: Ledger | None = None
        self.run = self.base_run
        self.scheduler: Scheduler | None = None
        self.sinks: list[Sink] = []
        self.engine: Engine | None = None
        self.judge: Any = None
        self.evaluator: Evaluator | None = None
        self.progress: Callable[[str, int, int], None] | None = None
        self.judge_method: str | None = None
        self.owns_engine = True  # False once adopt()ed: the engine and judge are closed by their maker
        self.shared_base: dict[str, Any] | None = None  # watch.root: step-0 results the runs share (evaluate.py)

    @property
    def guest(self) -> bool:
        """True beside a live daemon: rows are only claimed, never recovered."""
        return self.lock is None

    # -- opening -----------------------------------------------------------------------------

    async def open(self, stopping: Callable[[], bool] = lambda: False, *, wait: bool = True) -> None:
        """Raises LockHeld (another daemon evaluates this run) or ConfigError (e.g. a judge whose
        scoring method cannot be decided): both mean exit 2, before anything is evaluated. With
        wait=False a daemon does not wait for a one-shot holder either (LockHeld at once). A preset
        `judge_method` (the daemon's other runs decided it) is not detected again."""
        if self.judge_method is None:
            await self._resolve_judge()
        await self._take_lock(stopping, wait)
        self.owner = OwnerMark.acquire(self.paths.results)
        self.ledger = Ledger(self.paths.ledger)
        self.run = self.ledger.current_run(self.base_run)
        if recovered := self.recover_orphans():
            log.info("%d evaluation(s) left running by an earlier session are pending again", recovered)
        self._bind_run(self.run)

    def recover_orphans(self) -> int:
        """The lock holder puts back to pending what processes that are gone left `running` (a
        crash of this daemon, a killed `eval` beside it); rows of live processes stay theirs."""
        if self.lock is None or self.ledger is None:
            return 0
        runs = [r for _g, r, _why in self.ledger.trainings(self.base_run)]
        dead = [o for o in self.ledger.running_owners(runs) if not owner_alive(self.paths.results, o)]
        return self.ledger.recover(runs, dead)

    async def _resolve_judge(self) -> None:
        """`judge.method: auto` is decided once, here: undecidable is a config error at start-up,
        not a failure at every step. An unreachable judge only defers the decision."""
        if not needs_judge(self.config):
            return
        from ckpt_watch.judge import JudgeUnavailable, detect_judge_method

        try:
            self.judge_method, how = await detect_judge_method(self.config.judge)
            log.info("judge %s: scoring method %s (%s)", self.config.judge.model, self.judge_method, how)
        except JudgeUnavailable as exc:
            log.warning("judge not reachable at start-up (%s); its scoring method is decided at the first "
                        "judgement", exc)

    async def _take_lock(self, stopping: Callable[[], bool], wait: bool = True) -> None:
        mode = DAEMON if self.mode == DAEMON else ONESHOT
        waited = False
        for attempt in range(10**9):
            try:
                self.lock = RunLock.acquire(self.paths.results, self.base_run, mode)
                return
            except LockHeld as held:
                if not held.holder and attempt < 10:
                    await asyncio.sleep(0.2)  # a `status` peeking at the lock, or a holder just killed
                    continue
                if mode == ONESHOT:
                    log.info("%s: this process only claims pending evaluations (atomically) and leaves "
                             "interrupted ones to it", held)
                    return
                if stopping():
                    raise Stopped() from None
                if held.by_daemon or not wait:
                    raise
                if not waited:
                    log.info("%s: waiting for it to finish", held)
                    waited = True
                await asyncio.sleep(1.0)

    def _bind_run(self, run: str) -> None:
        """Everything that belongs to one training run: scheduler, sinks (one MLflow run each)."""
        assert self.ledger is not None
        self.run = run
        self.scheduler = Scheduler(self.ledger, run, self.config.suites, self.config.scheduler, self.config.judge)
        self.sinks = build_sinks(self.config, self.paths)
        for sink in self.sinks:
            if self.guest and hasattr(sink, "finish_on_close"):
                sink.finish_on_close = False  # the daemon beside us still logs into this MLflow run
            if run != self.base_run and getattr(sink, "attach_run_id", None):
                log.warning("training run '%s' is logged to its own MLflow run, not to the attached run %s "
                            "(two trainings never share one run)", run, sink.attach_run_id)
                sink.attach_run_id = None
            elif self.config.watch.root is not None and getattr(sink, "attach_run_id", None):
                log.warning("run '%s' of watch.root is logged to its own run, not to the attached run %s from "
                            "the environment (the runs of a root never share one)", run, sink.attach_run_id)
                sink.attach_run_id = None
            sink.start(run, {**run_params(self.config), "training_run": run, "watched_run": self.base_run})
        if self.engine is not None:
            self.evaluator = self._make_evaluator()

    def previous_runs(self) -> list[str]:
        assert self.ledger is not None
        return [r for _g, r, _why in self.ledger.trainings(self.base_run)][:-1]

    def switch_run(self, reason: str) -> str:
        """A new training run in the same folder: its own run name, sinks and MLflow run. Work
        still pending for the old one is recorded as skipped (its folders now hold new weights)."""
        assert self.ledger is not None
        old = self.run
        new = self.ledger.new_training(self.base_run, reason, after=old)
        skipped = self.ledger.skip_pending(old, f"superseded by a new training run in the same folder ({new})")
        log.warning("%s: a new training run in the same folder; its results go to run '%s' (a new MLflow run); "
                    "%d pending evaluation(s) of '%s' skipped", reason, new, skipped, old)
        self._close_sinks()
        self._bind_run(new)
        return new

    def plan_known(self) -> None:
        """Queue what is due for the base model and every snapshotted checkpoint (start-up, or a
        new suite configuration re-queueing old checkpoints)."""
        assert self.scheduler is not None and self.ledger is not None
        self.scheduler.plan_base()
        for row in self.ledger.checkpoints(self.run):
            if row.state is CkptState.READY:
                self.scheduler.plan(row.step, row.is_final)

    # -- engine ------------------------------------------------------------------------------

    async def start_engine(self) -> Evaluator:
        if self.evaluator is not None:
            return self.evaluator
        if self.engine is None:
            self.engine = build_engine(self.config, self.paths, self._engine_factory)
        log.info("starting the %s engine for %s", self.engine.name, self.config.base_model)
        await self.engine.start()
        if self.judge is None:
            self.judge = judge_for(self.config, self.paths, self.judge_method)
        self.evaluator = self._make_evaluator()
        return self.evaluator

    def use_engine(self, engine: Engine) -> None:
        """Someone else's engine, not started yet: shown by the heartbeat while it starts, closed by
        its maker."""
        self.engine, self.owns_engine = engine, False

    def adopt(self, engine: Engine, judge: Any) -> Evaluator:
        """Use an engine (and judge) started by someone else — the daemon's one engine for every run
        of a watch.root; close() leaves both to their maker."""
        self.engine, self.judge, self.owns_engine = engine, judge, False
        self.evaluator = self._make_evaluator()
        return self.evaluator

    def _make_evaluator(self) -> Evaluator:
        assert self.engine is not None and self.ledger is not None
        evaluator = Evaluator(self.engine, self.sinks, self.ledger, self.run, self.paths.results,
                              self.config.daemon.max_suite_attempts, judge=self.judge, cache_dir=self.paths.cache,
                              canary=self.config.daemon.canary, owner=self.owner.owner if self.owner else None,
                              concurrent_suites=self.config.engine.concurrent_suites, shared_base=self.shared_base)
        if self.progress is not None:
            evaluator.progress = self.progress
        if self.evaluator is not None:
            evaluator.failed = self.evaluator.failed  # the process's count, across runs
        if self.config.alerts is not None:  # --- wandb-alerts (issue 14) ---
            from ckpt_watch.alerts import Alerts

            evaluator.alerts = Alerts(self.config.alerts, self.paths.results, self.run, self.sinks)
        return evaluator

    @property
    def failed(self) -> int:
        return self.evaluator.failed if self.evaluator is not None else 0

    # -- teardown ----------------------------------------------------------------------------

    def _close_sinks(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []

    async def close(self) -> None:
        """Judge, engine (a managed server is stopped), sinks, ledger, locks — each even if one before failed."""
        try:
            if self.judge is not None and self.owns_engine:
                await self.judge.aclose()
        finally:
            try:
                if self.engine is not None and self.owns_engine:
                    await self.engine.close()
            finally:
                self._close_sinks()
                if self.ledger is not None:
                    self.ledger.close()
                if self.owner is not None:
                    self.owner.release(self.paths.results)
                if self.lock is not None:
                    self.lock.release()
