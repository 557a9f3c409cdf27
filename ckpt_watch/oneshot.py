"""`ckpt-watch eval PATH...`: evaluate given checkpoint folders now, no watching.

Each folder must already be complete (same checks as the daemon, without the settle
wait). Every configured suite is due for an explicitly named checkpoint, whatever its
`every`; results land in the same ledger and sinks as the daemon's, so a later
`ckpt-watch run` does not redo them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ckpt_watch.checkpoints import TRAINER_STATE, Layout, Readiness, check_checkpoint
from ckpt_watch.config import Config
from ckpt_watch.core import BASE_STEP, Checkpoint, CheckpointError, CheckpointKind
from ckpt_watch.daemon import Paths, build_sinks, judge_for, run_params
from ckpt_watch.engines.factory import make_engine
from ckpt_watch.evaluate import Evaluator
from ckpt_watch.ledger import CkptState, EvalState, Ledger
from ckpt_watch.scheduler import Scheduler
from ckpt_watch.snapshot import snapshot_dir, take_snapshot

log = logging.getLogger(__name__)


def step_of(path: Path, layout: Layout) -> int:
    step = layout.step_of(path.name)
    if step is not None:
        return step
    state = path / TRAINER_STATE
    if state.is_file():
        return int(json.loads(state.read_text())["global_step"])
    raise CheckpointError(f"{path}: cannot tell the step (folder name does not match the layout, no {TRAINER_STATE})")


def prepare(paths: list[Path], config: Config, ledger: Ledger, run: str, cache: Path) -> list[Checkpoint]:
    layout = Layout(config.watch)
    out = []
    for raw in paths:
        path = raw.resolve()
        if not path.is_dir():
            raise CheckpointError(f"{raw}: not a directory")
        step = step_of(path, layout)
        check = check_checkpoint(path, step, layout, path.parent)
        if check.state is not Readiness.READY:
            raise CheckpointError(f"{raw}: not a complete checkpoint: {check.reason}")
        snap = take_snapshot(path, path.parent, snapshot_dir(cache, run, step))
        ledger.set_checkpoint(run, step, CkptState.READY, path=str(path), snapshot=str(snap), is_final=check.is_final)
        out.append(Checkpoint(run, step, path, snap, CheckpointKind.ADAPTER, check.is_final))
    return out


async def evaluate_paths(config: Config, paths: list[Path], *, base: bool, force: bool) -> int:
    """Returns the number of (step, suite) evaluations that failed."""
    run = config.run_name or (paths[0].resolve().parent.name if paths else "base")
    dirs = Paths.of(config)
    ledger = Ledger(dirs.ledger)
    ledger.recover()
    scheduler = Scheduler(ledger, run, config.suites, config.scheduler)
    targets = prepare(paths, config, ledger, run, dirs.cache)
    if base:
        targets.insert(0, Checkpoint(run, BASE_STEP, None, None, CheckpointKind.BASE))
    for ckpt in targets:
        for s in scheduler.suites.values():
            if not ledger.add_eval(run, ckpt.step, s.name, s.hash, EvalState.PENDING):
                row = ledger.eval_row(run, ckpt.step, s.name, s.hash)
                if row is not None and (force or row.state is EvalState.SKIPPED):
                    ledger.set_eval(run, ckpt.step, s.name, s.hash, EvalState.PENDING)
    sinks = build_sinks(config, dirs)
    for sink in sinks:
        sink.start(run, run_params(config))
    engine = make_engine(config, dirs.results)
    judge = None
    try:
        await engine.start()
        judge = judge_for(config, dirs)
        evaluator = Evaluator(engine, sinks, ledger, run, dirs.results, config.daemon.max_suite_attempts,
                              judge=judge, cache_dir=dirs.cache)
        for ckpt in targets:
            due = scheduler.pending().get(ckpt.step, [])
            if not due:
                log.info("%s: already evaluated (use --force to redo)", ckpt.label)
                continue
            await evaluator.evaluate(ckpt, due, lambda: False)
    finally:
        if judge is not None:
            await judge.aclose()
        await engine.close()
        for sink in sinks:
            sink.close()
    steps = {c.step for c in targets}
    failed = [r for r in ledger.evals(run, EvalState.FAILED) if r.step in steps]
    ledger.close()
    return len(failed)
