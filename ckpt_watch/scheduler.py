"""What is due: which (step, suite) evaluations to queue, and which step to evaluate next.

Per suite, `every` (training steps, or a percentage of training like "20%"), `at` (fractions
of training) and `at_final` decide whether a checkpoint is due; a checkpoint that is not due
is recorded as `skipped` with the reason, never dropped silently. A percent schedule is
resolved from `scheduler.max_steps`, else the first trainer state that names `max_steps`,
into target steps recorded in the ledger (again if the schedule is edited); each target is
served by the first checkpoint at or after it. The base model (step 0) goes first. When
checkpoints arrive faster than they are evaluated, `order: newest` keeps the curve current
and backfills older due work when idle; `oldest` evaluates in training order.

Backlog policy (`scheduler.max_backlog`, off by default): counted in checkpoints, per suite.
Where the next step is chosen (`next_step`), a suite with more than `max_backlog` checkpoints
due keeps `max_backlog` of them — the newest, the final (trainer_state's max_steps, or
`scheduler.max_steps`) and an even spread by index over the due steps, oldest and newest
included — and records the others as `skipped` with the reason (prefix `backlog: `). Only due
(pending) rows are cut, so a step a schedule (`every`, percent) skipped is untouched; the base
model (step 0) is never counted or cut; rows asked for explicitly (`ckpt-watch eval PATH`,
`--force`) or already attempted once are kept (and not counted). The choice is a pure
function of the due steps, so it is deterministic. A skipped row stays skipped: a rescan or a
restart inserts no row that exists, and what was kept is within the limit, so a restart
changes nothing; only checkpoints arriving later can thin it further. `--force` (or naming the
checkpoint to `ckpt-watch eval`) makes backlog-skipped rows due again, pinned.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

from ckpt_watch.config import SchedulerConfig
from ckpt_watch.core import BASE_STEP
from ckpt_watch.ledger import BACKLOG_SKIP, CkptState, EvalState, Ledger
from ckpt_watch.suites.base import SuiteConfigBase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannedSuite:
    """A configured suite as the ledger knows it. `key` is the name its results carry (JSON file,
    metrics.jsonl, MLflow prefix): the suite's name for the first configuration seen in the run,
    `<name>.v2`, `<name>.v3`… for later ones, so two configurations never share one series."""

    name: str
    config: SuiteConfigBase
    hash: str
    version: int = 1

    @property
    def key(self) -> str:
        return self.name if self.version <= 1 else f"{self.name}.v{self.version}"


def suite_hash(cfg: SuiteConfigBase, judge: Any = None) -> str:
    """Everything that changes a suite's numbers: its settings, its data files' contents and, for
    judged suites, the judge's model and scoring method."""
    h = cfg.config_hash()
    if judge is not None and cfg.needs_judge():
        blob = f"{h}:judge:{judge.model}:{judge.method}".encode()
        h = hashlib.sha256(blob).hexdigest()[:12]
    return h


def due_reason(cfg: SuiteConfigBase, step: int, is_final: bool, targets: list[int] | None = None,
               previous: int = 0) -> str | None:
    """None when the suite is due at this step, else why it is not. A percent schedule's `targets`
    are each served by the first checkpoint at or after them: due when previous < target <= step,
    `previous` being the last checkpoint before this one."""
    if step == BASE_STEP:
        return None if cfg.base else "suite has base: false"
    if cfg.percent_schedule():
        if targets is None:
            return None  # max_steps not known yet: evaluate rather than miss a point
        if any(previous < t <= step for t in targets):
            return None
        why = f"no schedule target in ({previous}, {step}] (targets {', '.join(map(str, targets))})"
    elif cfg.every is None or step % cfg.every == 0:
        return None
    else:
        why = f"step {step} is not a multiple of every={cfg.every}"
    if is_final and cfg.at_final:
        return None
    return why + ("" if not is_final else " (at_final: false)")


def spread(n: int, k: int) -> list[int]:
    """k of the indices 0..n-1 (k < n), evenly spaced and both ends included, rounded half up;
    k == 1: the last."""
    if k <= 1:
        return [n - 1]
    return [(2 * i * (n - 1) + (k - 1)) // (2 * (k - 1)) for i in range(k)]


def backlog_keep(due: list[int], limit: int, finals: set[int] | None = None) -> set[int]:
    """The due steps (ascending) the backlog policy keeps: all of them within the limit, else the
    final checkpoint(s) among them plus an even spread by index (the newest always included)
    over the remaining slots."""
    if len(due) <= limit:
        return set(due)
    extra = (set(finals or ()) & set(due)) - {due[-1]}
    return extra | {due[i] for i in spread(len(due), max(limit - len(extra), 1))}


def backlog_reason(due: int, limit: int) -> str:
    return (f"{BACKLOG_SKIP}{due} checkpoints due > max_backlog {limit}; kept the newest, the final "
            "and an even spread")


class Scheduler:
    def __init__(self, ledger: Ledger, run: str, suites: dict[str, SuiteConfigBase], config: SchedulerConfig,
                 judge: Any = None):
        self.ledger = ledger
        self.run = run
        self.config = config
        self.suites: dict[str, PlannedSuite] = {}
        for name, cfg in suites.items():
            h = suite_hash(cfg, judge)
            self.suites[name] = PlannedSuite(name, cfg, h, ledger.suite_version(run, name, h))

    def plan_base(self) -> None:
        if self.config.base:
            self.plan(BASE_STEP, is_final=False)

    def targets(self, suite: PlannedSuite, max_steps: int | None = None) -> list[int] | None:
        """A percent schedule's target steps, resolved once (first trainer state, or scheduler.max_steps)
        and recorded in the ledger; None while max_steps is unknown."""
        cfg = suite.config
        if not cfg.percent_schedule():
            return None
        spec = f"every={cfg.every};at={cfg.at};max_steps={self.config.max_steps}"
        recorded = self.ledger.schedule(self.run, suite.name, spec)
        total = self.config.max_steps or max_steps or self.ledger.schedule_max_steps(self.run)
        if total is not None:  # records it the first time, or again after the schedule was edited
            recorded = self.ledger.schedule(self.run, suite.name, spec, total, cfg.schedule_targets(total))
        return recorded[1] if recorded else None

    def plan(self, step: int, is_final: bool, max_steps: int | None = None) -> int:
        """Record every suite's row for this step; returns how many are newly pending."""
        added = 0
        previous = max((r.step for r in self.ledger.checkpoints(self.run)
                        if r.step < step and r.state is CkptState.READY), default=0)
        for s in self.suites.values():
            reason = due_reason(s.config, step, is_final, self.targets(s, max_steps), previous)
            state = EvalState.PENDING if reason is None else EvalState.SKIPPED
            if self.ledger.add_eval(self.run, step, s.name, s.hash, state, reason) and reason is None:
                added += 1
        return added

    def pending(self) -> dict[int, list[PlannedSuite]]:
        """Pending evaluations of the current suite configs, by step."""
        out: dict[int, list[PlannedSuite]] = {}
        for step, suite, suite_hash in self.ledger.pending_keys(self.run):
            s = self.suites.get(suite)
            if s is not None and s.hash == suite_hash:
                out.setdefault(step, []).append(s)
        return out

    def next_step(self, available: set[int]) -> int | None:
        """The step to evaluate next among those whose adapter is available (the backlog policy
        cuts what is due first)."""
        steps = self.next_steps(available, 1)
        return steps[0] if steps else None

    def next_steps(self, available: set[int], k: int) -> list[int]:
        """Up to k steps to evaluate together, in `order` (newest first by default), after the backlog
        policy has cut what is due. The base model (step 0) goes alone: the deltas of every later
        step are taken against its result."""
        self.enforce_backlog()
        # distinct steps straight from SQL: the daemon asks every loop, and the backlog may be long
        pending = self.ledger.pending_steps(self.run, [(s.name, s.hash) for s in self.suites.values()])
        steps = [s for s in pending if s in available]
        if BASE_STEP in steps:
            return [BASE_STEP]
        return sorted(steps, reverse=self.config.order == "newest")[:max(k, 1)]

    def final_steps(self) -> set[int]:
        """The final checkpoint's step (none while it has not arrived): the first one marked final by
        the trainer or at/after the known max_steps (later ones only exist past max_steps)."""
        total = self.config.max_steps or self.ledger.schedule_max_steps(self.run)
        finals = [r.step for r in self.ledger.checkpoints(self.run)
                  if r.is_final or (total is not None and r.step >= total)]
        return {min(finals)} if finals else set()

    def enforce_backlog(self) -> int:
        """Apply `max_backlog` to every current suite; returns how many rows it skipped."""
        limit = self.config.max_backlog
        if limit is None:
            return 0
        current = {(s.name, s.hash) for s in self.suites.values()}
        over = [key for key, n in self.ledger.backlog_counts(self.run).items() if key in current and n > limit]
        if not over:
            return 0
        finals = self.final_steps()
        skipped = 0
        for name, h in over:
            dropped = self.ledger.trim_backlog(
                self.run, name, h, lambda due: (backlog_keep(due, limit, finals), backlog_reason(len(due), limit)))
            if dropped:
                log.info("backlog: %s had more than max_backlog=%d checkpoints due; skipped steps %s", name, limit,
                         ", ".join(map(str, dropped)))
            skipped += len(dropped)
        return skipped

    def skip(self, step: int, reason: str) -> None:
        for suite in self.pending().get(step, []):
            self.ledger.set_eval(self.run, step, suite.name, suite.hash, EvalState.SKIPPED, reason)
