"""Discovery: turn folders under the watch dir into complete, snapshotted checkpoints.

Each poll looks at the folders named by watcher events (and all of them on a rescan),
waits until a folder has been unchanged for `settle_seconds`, checks it, snapshots it and
records it in the ledger, where the scheduler queues its due suites. A folder that is
still being written is simply looked at again later; one that is stable but invalid
counts an attempt and is marked failed after `max_attempts`; one rotated away before its
snapshot is recorded as vanished. Nothing here raises for a bad checkpoint.

Fingerprints: each snapshot records the SHA-256 of the adapter weights and the trainer's
file (size, mtime). A known step whose file changes is hashed again; different weights mean
a new training run in the same folder: `new_training` is set and the daemon starts a new run.
In a new run, a folder whose weights equal an earlier run's checkpoint at the same step is a
leftover of that training (recorded `stale`, not evaluated again).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ckpt_watch.checkpoints import (
    Fingerprint,
    Layout,
    Readiness,
    adapter_weights,
    check_checkpoint,
    fingerprint,
    scan,
)
from ckpt_watch.config import WatchConfig
from ckpt_watch.core import CheckpointError, NewTrainingRun
from ckpt_watch.ledger import CkptRow, CkptState, Ledger
from ckpt_watch.scheduler import Scheduler
from ckpt_watch.snapshot import (
    CheckpointRefused,
    CheckpointVanished,
    snapshot_dir,
    stat_key,
    take_snapshot,
    weights_sha256,
)

log = logging.getLogger(__name__)


@dataclass
class _Tracked:
    path: Path
    fp: Fingerprint
    since: float  # monotonic time this fingerprint was first seen
    last_reason: str = ""
    waiting: bool = True  # settling (True) or incomplete/invalid awaiting change (False)


class Discovery:
    def __init__(self, watch_dir: Path, config: WatchConfig, ledger: Ledger, scheduler: Scheduler, run: str,
                 cache_root: Path, previous_runs: list[str] | None = None):
        self.watch_dir = watch_dir
        self.previous_runs = list(previous_runs or [])
        self.new_training: NewTrainingRun | None = None
        self.config = config
        self.layout = Layout(config)
        self.ledger = ledger
        self.scheduler = scheduler
        self.run = run
        self.cache_root = cache_root
        self._hints: set[str] = set()
        self._rescan_requested = True
        self._lock = threading.Lock()
        self._tracked: dict[int, _Tracked] = {}
        self._last_rescan = float("-inf")

    # called from the watcher thread: O(1), no filesystem work
    def hint(self, name: str | None) -> None:
        with self._lock:
            if name is None:
                self._rescan_requested = True
            elif self.layout.step_of(name) is not None:
                self._hints.add(name)

    def settling(self) -> bool:
        """Some folder is waiting out its settle time (so --once should wait for it)."""
        return any(t.waiting for t in self._tracked.values())

    def seconds_until_due(self) -> float:
        now = time.monotonic()
        waits = [self._last_rescan + self.config.rescan_seconds - now]
        waits += [t.since + self.config.settle_seconds - now for t in self._tracked.values() if t.waiting]
        waits += [self.config.settle_seconds for t in self._tracked.values() if not t.waiting]
        return max(0.05, min(waits))

    def poll(self) -> list[int]:
        """Look at what changed; returns the steps that became ready (snapshotted) now."""
        now = time.monotonic()
        with self._lock:
            hints, self._hints = self._hints, set()
            rescan = self._rescan_requested or now - self._last_rescan >= self.config.rescan_seconds
            self._rescan_requested = False
        candidates: dict[int, Path] = {}
        if rescan:
            self._last_rescan = now
            candidates = scan(self.watch_dir, self.layout)
            for step in set(self._tracked) - set(candidates):
                self._vanished(step, self._tracked.pop(step).path)
        for name in hints:
            step = self.layout.step_of(name)
            if step is not None:
                candidates[step] = self.watch_dir / name
        for step, t in self._tracked.items():
            candidates.setdefault(step, t.path)
        ready = []
        for step, path in sorted(candidates.items()):
            if self.new_training is not None:
                break  # the daemon switches runs before anything else is looked at
            if self._consider(step, path, forced=step in {self.layout.step_of(h) for h in hints}):
                ready.append(step)
        return ready

    def _unchanged(self, row: CkptRow, path: Path) -> bool:
        """A snapshotted step whose trainer file is as it was (or gone: rotation) needs no look."""
        weights = adapter_weights(path) if path.is_dir() else None
        return weights is None or row.weights_stat is None or stat_key(weights) == row.weights_stat

    def _consider(self, step: int, path: Path, forced: bool) -> bool:
        row = self.ledger.checkpoint(self.run, step)
        if row is not None and (row.state is CkptState.VANISHED or (
                row.state in (CkptState.READY, CkptState.STALE) and self._unchanged(row, path))):
            self._tracked.pop(step, None)
            return False
        if not path.is_dir():
            if step in self._tracked:
                self._vanished(step, self._tracked.pop(step).path)
            return False
        fp, newest = fingerprint(path)
        now = time.monotonic()
        tracked = self._tracked.get(step)
        if tracked is None or tracked.fp != fp:
            if row is not None and row.state is CkptState.FAILED and tracked is None and not forced:
                return False  # failed before; only an event (the folder changed) re-opens it
            tracked = self._tracked[step] = _Tracked(path, fp, now)
        settle = self.config.settle_seconds
        # old files count as settled at first sight (start-up rescan); after a failed look,
        # the next look waits a full settle period
        settled = now - tracked.since >= settle or (tracked.waiting and time.time() - newest >= settle)
        if not settled:
            tracked.waiting = True
            return False
        check = check_checkpoint(path, step, self.layout, self.watch_dir)
        if check.state is Readiness.INCOMPLETE:
            tracked.waiting, tracked.last_reason = False, check.reason
            if row is None:
                self.ledger.set_checkpoint(self.run, step, CkptState.SEEN, path=str(path), error=check.reason)
            return False
        if check.state is Readiness.INVALID:
            return self._invalid(step, path, tracked, check.reason)
        if row is not None and row.state is CkptState.READY:
            return self._recheck(step, path, row)
        try:
            snap = take_snapshot(path, self.watch_dir, snapshot_dir(self.cache_root, self.run, step))
        except CheckpointVanished as exc:
            self._tracked.pop(step, None)
            self.ledger.set_checkpoint(self.run, step, CkptState.VANISHED, path=str(path), error=str(exc))
            log.warning("step %d: %s", step, exc)
            return False
        except CheckpointRefused as exc:
            return self._invalid(step, path, tracked, str(exc), final=True)
        except CheckpointError as exc:
            tracked.since, tracked.waiting = now, True  # changed under us: settle again
            log.info("step %d: %s; will look again", step, exc)
            return False
        except OSError as exc:
            # our side failed (e.g. disk full under results_dir), not the checkpoint: try again later
            tracked.since, tracked.waiting = now, True
            log.error("step %d: cannot snapshot %s: %s; will try again", step, path, exc)
            return False
        self._tracked.pop(step, None)
        epoch = self.layout.epoch_of(path.name)
        earlier = self.ledger.find_by_sha(self.previous_runs, step, snap.sha256)
        if earlier is not None:
            self.ledger.set_checkpoint(self.run, step, CkptState.STALE, path=str(path), snapshot=str(snap.path),
                                       sha256=snap.sha256, weights_stat=snap.weights_stat, epoch=epoch,
                                       error=f"same weights as run '{earlier.run}' step {step}: left over from "
                                             "that training, not evaluated again")
            log.info("step %d: %s still holds run '%s''s weights; not part of this training", step, path,
                     earlier.run)
            return False
        self.ledger.set_checkpoint(self.run, step, CkptState.READY, path=str(path), snapshot=str(snap.path),
                                   is_final=check.is_final, sha256=snap.sha256, weights_stat=snap.weights_stat,
                                   epoch=epoch)
        queued = self.scheduler.plan(step, check.is_final, max_steps=check.max_steps)
        log.info("checkpoint step %d complete%s; %d suite(s) due", step, " (final)" if check.is_final else "",
                 queued)
        return True

    def _recheck(self, step: int, path: Path, row: CkptRow) -> bool:
        """A snapshotted step's weights file changed: same bytes (touched, copied) or a new training."""
        self._tracked.pop(step, None)
        try:
            sha = weights_sha256(path, self.watch_dir)
        except (OSError, CheckpointError) as exc:
            log.info("step %d: cannot re-read %s (%s); will look again", step, path, exc)
            return False
        weights = adapter_weights(path)
        if sha is None or row.sha256 is None or sha == row.sha256:
            self.ledger.set_checkpoint(self.run, step, CkptState.READY,
                                       weights_stat=stat_key(weights) if weights else None, sha256=sha)
            return False
        self.new_training = NewTrainingRun(step, row.sha256, sha, str(path))
        return False

    def _invalid(self, step: int, path: Path, tracked: _Tracked, reason: str, final: bool = False) -> bool:
        row = self.ledger.checkpoint(self.run, step)
        attempts = (row.attempts if row else 0) + 1
        tracked.since, tracked.waiting, tracked.last_reason = time.monotonic(), False, reason
        if final or attempts >= self.config.max_attempts:
            self._tracked.pop(step, None)
            self.ledger.set_checkpoint(self.run, step, CkptState.FAILED, path=str(path), attempts=attempts,
                                       error=reason)
            log.error("step %d: checkpoint failed after %d attempt(s): %s", step, attempts, reason)
        else:
            self.ledger.set_checkpoint(self.run, step, CkptState.SEEN, path=str(path), attempts=attempts,
                                       error=reason)
            log.warning("step %d: not usable yet (attempt %d/%d): %s", step, attempts, self.config.max_attempts,
                        reason)
        return False

    def _vanished(self, step: int, path: Path) -> None:
        row = self.ledger.checkpoint(self.run, step)
        if row is None or row.state is CkptState.SEEN:
            self.ledger.set_checkpoint(self.run, step, CkptState.VANISHED, path=str(path),
                                       error="folder removed before it was complete and snapshotted")
            log.warning("step %d: %s vanished before it was complete", step, path)
