"""One watched training folder inside the daemon: its App, its discovery, and what it has due.

`ckpt-watch run --watch DIR` holds one `RunWatch`; with `watch.root` the daemon holds one per
subfolder that has a checkpoint (`find_runs`), all sharing the daemon's one engine and judge
(`App.adopt`). Each keeps what the exactly-once work gives a run: its own lock, ledger rows,
results folder, MLflow run, heartbeat, and its own identity (`<folder>-<hash>`, `-t2` for a
retraining in the same folder).

A run of a root whose adapters name another base model than the engine serves is refused
(`base_mismatch`): the daemon records its checkpoints as failed with the reason, so `status`
shows why, and evaluates nothing of it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ckpt_watch.app import App
from ckpt_watch.checkpoints import Layout, scan
from ckpt_watch.config import Config, default_run_name
from ckpt_watch.core import BASE_STEP, Checkpoint, CheckpointError, CheckpointKind
from ckpt_watch.discovery import Discovery
from ckpt_watch.engines.base import Engine
from ckpt_watch.evaluate import Evaluator
from ckpt_watch.ledger import CkptState
from ckpt_watch.scheduler import PlannedSuite
from ckpt_watch.snapshot import remove_snapshot, snapshot_dir, take_snapshot
from ckpt_watch.status import Heartbeat

log = logging.getLogger(__name__)


class RunWatch:
    """`RunWatch(config, watch_dir, mode=…)`; `await open(stopping, force=…)`; `poll()` each turn;
    `next_steps(k)` / `resolve(step)` for the work; `close()`."""

    def __init__(self, config: Config, watch_dir: Path, *, mode: str, base_run: str | None = None):
        self.config = config
        self.watch_dir = watch_dir
        self.app = App(config, mode=mode, base_run=base_run)
        self.paths = self.app.paths
        self.heartbeat = Heartbeat(self.app)
        self.discovery: Discovery | None = None
        self.stopped = False  # a guest saw a new training run: only the run's lock holder starts it

    @property
    def name(self) -> str:
        return self.app.run

    async def open(self, stopping: Callable[[], bool], *, force: bool = False, wait: bool = True,
                   judge_method: str | None = None) -> None:
        """Lock, ledger, sinks, queued work, discovery. Raises LockHeld / ConfigError like App.open."""
        self.app.judge_method = judge_method
        await self.app.open(stopping, wait=wait)
        self.open_run()
        if force:
            log.info("%s: --force: %d finished evaluation(s) are due again", self.name,
                     self.app.ledger.force(self.name))

    def open_run(self) -> None:
        """(Re)build what belongs to the current training run: queued work and discovery."""
        self.app.plan_known()
        self.discovery = Discovery(self.watch_dir, self.config.watch, self.app.ledger, self.app.scheduler,
                                   self.name, self.paths.cache, previous_runs=self.app.previous_runs())

    def adopt(self, engine: Engine, judge: Any, progress: Any) -> Evaluator:
        self.app.progress = progress
        return self.app.adopt(engine, judge)

    async def close(self) -> None:
        self.heartbeat.beat("stopped")
        await self.app.close()

    # -- each turn ---------------------------------------------------------------------------

    def poll(self) -> bool:
        """Look for checkpoints; True when a new training run in the folder was started (or, as a
        guest, when this run stops here)."""
        assert self.discovery is not None
        self.discovery.poll()
        found = self.discovery.new_training
        if found is None:
            return False
        if self.app.guest:
            log.warning("%s: a new training run in the same folder; the daemon evaluating run '%s' starts it, "
                        "this process stops here", found, self.app.base_run)
            self.stopped = True
            return True
        self.app.switch_run(str(found))
        self.open_run()
        return True

    def settling(self) -> bool:
        return self.discovery is not None and self.discovery.settling()

    def seconds_until_due(self) -> float:
        return self.discovery.seconds_until_due() if self.discovery is not None else 60.0

    def available(self) -> set[int]:
        ready = {r.step for r in self.app.ledger.checkpoints(self.name) if r.state is CkptState.READY}
        return ready | {BASE_STEP}

    def next_steps(self, k: int) -> list[int]:
        return self.app.scheduler.next_steps(self.available(), k)

    def pending(self) -> dict[int, list[PlannedSuite]]:
        return self.app.scheduler.pending()

    def backlog(self) -> int:
        return sum(len(v) for v in self.pending().values())

    def final_evaluated(self) -> int | None:
        """The final checkpoint's step once it is known and nothing due is left (called when no
        available step is due) and no folder is still being written; else None."""
        finals = [r.step for r in self.app.ledger.checkpoints(self.name)
                  if r.is_final and r.state is CkptState.READY]
        if not finals or self.settling():
            return None
        return max(finals)

    def resume(self) -> int:
        """After the ledger could not be written (disk full): what was left running is due again and
        checkpoints recorded meanwhile get their evaluations planned, as at start-up."""
        recovered = self.app.ledger.recover([self.name]) if not self.app.guest else 0
        self.app.plan_known()
        return recovered

    # -- one step ----------------------------------------------------------------------------

    def checkpoint(self, step: int) -> Checkpoint | None:
        if step == BASE_STEP:
            return Checkpoint(self.name, BASE_STEP, None, None, CheckpointKind.BASE)
        row = self.app.ledger.checkpoint(self.name, step)
        if row is None or row.path is None:
            return None
        snap = Path(row.snapshot) if row.snapshot else snapshot_dir(self.paths.cache, self.name, step)
        if not snap.is_dir():
            # dropped by keep_snapshots; a changed suite config needs it again
            again = take_snapshot(Path(row.path), self.watch_dir, snapshot_dir(self.paths.cache, self.name, step))
            if row.sha256 and again.sha256 != row.sha256:
                raise CheckpointError(f"{row.path} now holds other weights than step {step} had (a new training "
                                      "run); this run's step is not re-evaluated on them")
            snap = again.path
        return Checkpoint(self.name, step, Path(row.path), snap, CheckpointKind.ADAPTER, row.is_final,
                          epoch=row.epoch)

    def resolve(self, step: int) -> Checkpoint | None:
        """The step's checkpoint, or None after recording why it cannot be evaluated."""
        try:
            ckpt = self.checkpoint(step)
        except CheckpointError as exc:
            self.app.scheduler.skip(step, f"adapter no longer available: {exc}")
            return None
        if ckpt is None:
            self.app.scheduler.skip(step, "checkpoint unknown to the ledger")
        return ckpt

    def prune_snapshots(self) -> None:
        """Keep the newest `daemon.keep_snapshots` finished steps' snapshots (all when null)."""
        keep = self.config.daemon.keep_snapshots
        if keep is None:
            return
        pending = set(self.pending())
        rows = [r for r in self.app.ledger.checkpoints(self.name)
                if r.state is CkptState.READY and r.snapshot and r.step not in pending]
        for row in sorted(rows, key=lambda r: r.step, reverse=True)[keep:]:
            remove_snapshot(Path(row.snapshot))


# -- a root of runs ------------------------------------------------------------------------------


def find_runs(root: Path, layout: Layout) -> list[Path]:
    """The subfolders of `root` holding at least one checkpoint-looking folder, by name (hidden
    folders and anything else are not runs)."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except FileNotFoundError:
        return []
    return [Path(e.path) for e in entries
            if not e.name.startswith(".") and e.is_dir(follow_symlinks=False) and scan(Path(e.path), layout)]


def run_name_of(run_dir: Path) -> str:
    """A root's subfolder is named as if it were watched alone (`<folder>-<hash>`), so switching
    between `--watch` and `--root` keeps its ledger rows, results and MLflow run."""
    return default_run_name(run_dir)


def adapter_bases(run_dir: Path, layout: Layout) -> set[str] | None:
    """`base_model_name_or_path` of the run's adapters (those that name one; a null one counts as
    ''); None while no checkpoint has a readable adapter_config.json yet (PEFT writes it after the
    weights)."""
    bases: set[str] | None = None
    for path in scan(run_dir, layout).values():
        try:
            data = json.loads((path / "adapter_config.json").read_text())
        except (OSError, ValueError):
            continue  # not written yet, or being written: looked at again at the next rescan
        if not isinstance(data, dict):
            continue
        bases = bases if bases is not None else set()
        bases.add(str(data.get("base_model_name_or_path") or ""))
    return bases


class NotYetKnown(Exception):
    """A root's subfolder whose adapters cannot be read yet: not a run until they can."""


def base_mismatch(run_dir: Path, layout: Layout, served: list[str]) -> str | None:
    """Why a root's run cannot be served by this daemon's engine, or None. Raises NotYetKnown while
    none of its adapter configs is readable."""
    from ckpt_watch.engines.vllm_protocol import same_model

    bases = adapter_bases(run_dir, layout)
    if bases is None:
        raise NotYetKnown(run_dir)
    other = sorted(b for b in bases if b and not same_model(b, served))  # '' (null): nothing to compare
    if not other:
        return None
    return (f"run {run_dir.name}: its adapters were trained on {', '.join(map(repr, other))} but this daemon's "
            f"engine serves {served[0]!r}; not evaluated (start another ckpt-watch for that base model)")
