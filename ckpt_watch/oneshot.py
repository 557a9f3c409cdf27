"""`ckpt-watch eval PATH...`: evaluate given checkpoint folders now, no watching.

Each folder must already be complete (same checks as the daemon, without the settle
wait). Every configured suite is due for an explicitly named checkpoint, whatever its
`every`; results land in the same ledger and sinks as the daemon's, so a later
`ckpt-watch run` does not redo them. Beside a live daemon on the same results dir and run
this process is a guest: it claims each evaluation atomically, so neither evaluates a row
the other took (see ckpt_watch/locking.py).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ckpt_watch.app import App
from ckpt_watch.checkpoints import TRAINER_STATE, Layout, Readiness, check_checkpoint
from ckpt_watch.config import Config, default_run_name
from ckpt_watch.core import BASE_STEP, Checkpoint, CheckpointError, CheckpointKind
from ckpt_watch.ledger import CkptState, EvalState
from ckpt_watch.locking import ONESHOT
from ckpt_watch.snapshot import snapshot_dir, take_snapshot, weights_sha256

log = logging.getLogger(__name__)


def step_of(path: Path, layout: Layout) -> int:
    step = layout.step_of(path.name)
    if step is not None:
        return step
    state = path / TRAINER_STATE
    if state.is_file():
        return int(json.loads(state.read_text())["global_step"])
    raise CheckpointError(f"{path}: cannot tell the step (folder name does not match the layout, no {TRAINER_STATE})")


def _checked(raw: Path, layout: Layout) -> tuple[Path, int, bool]:
    path = raw.resolve()
    if not path.is_dir():
        raise CheckpointError(f"{raw}: not a directory")
    step = step_of(path, layout)
    check = check_checkpoint(path, step, layout, path.parent)
    if check.state is not Readiness.READY:
        raise CheckpointError(f"{raw}: not a complete checkpoint: {check.reason}")
    return path, step, check.is_final


def prepare(paths: list[Path], config: Config, app: App) -> list[Checkpoint]:
    """Check and snapshot every folder; a known step with other weights starts a new training run."""
    layout = Layout(config.watch)
    checked = [_checked(raw, layout) for raw in paths]
    ledger = app.ledger
    for path, step, _final in checked:
        row = ledger.checkpoint(app.run, step)
        sha = weights_sha256(path, path.parent)
        if row is not None and row.sha256 and sha and row.sha256 != sha:
            why = (f"{path} holds other weights than the step-{step} checkpoint evaluated before "
                   f"(sha256 {row.sha256[:12]} → {sha[:12]})")
            if app.guest:  # only the run's lock holder starts a new training run
                raise CheckpointError(f"{why}: a new training run; the daemon evaluating run '{app.base_run}' "
                                      "starts it — evaluate again once it has")
            app.switch_run(why)
            break
    out = []
    for path, step, final in checked:
        snap = take_snapshot(path, path.parent, snapshot_dir(app.paths.cache, app.run, step))
        epoch = layout.epoch_of(path.name)
        ledger.set_checkpoint(app.run, step, CkptState.READY, path=str(path), snapshot=str(snap.path),
                              is_final=final, sha256=snap.sha256, weights_stat=snap.weights_stat, epoch=epoch)
        out.append(Checkpoint(app.run, step, path, snap.path, CheckpointKind.ADAPTER, final, epoch=epoch))
    return out


def _queue(app: App, targets: list[Checkpoint], force: bool) -> None:
    ledger = app.ledger
    for ckpt in targets:
        for s in app.scheduler.suites.values():
            # pinned: named explicitly, so a daemon's backlog policy (scheduler.max_backlog) keeps it
            if not ledger.add_eval(app.run, ckpt.step, s.name, s.hash, EvalState.PENDING, pinned=True):
                row = ledger.eval_row(app.run, ckpt.step, s.name, s.hash)
                if row is not None and (row.state is EvalState.SKIPPED or force):
                    ledger.requeue(app.run, ckpt.step, s.name, s.hash)  # never a row another process runs


async def evaluate_paths(config: Config, paths: list[Path], *, base: bool, force: bool) -> int:
    """Returns the number of (step, suite) evaluations that failed in this call."""
    base_run = config.run_name or (default_run_name(paths[0].resolve().parent) if paths else "base")
    app = App(config, mode=ONESHOT, base_run=base_run)
    await app.open()
    try:
        targets = prepare(paths, config, app)
        if base:
            targets.insert(0, Checkpoint(app.run, BASE_STEP, None, None, CheckpointKind.BASE))
        _queue(app, targets, force)
        for ckpt in targets:
            due = app.scheduler.pending().get(ckpt.step, [])
            if not due:
                log.info("%s: already evaluated or being evaluated by another process (use --force to redo)",
                         ckpt.label)
                continue
            evaluator = await app.start_engine()
            await evaluator.evaluate(ckpt, due, lambda: False)
    finally:
        await app.close()
    return app.failed
