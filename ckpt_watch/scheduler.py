"""What is due: which (step, suite) evaluations to queue, and which step to evaluate next.

Per suite, `every` (training steps, or a percentage of training like "20%"), `at` (fractions
of training) and `at_final` decide whether a checkpoint is due; a checkpoint that is not due
is recorded as `skipped` with the reason, never dropped silently. A percent schedule is
resolved from `scheduler.max_steps`, else the first trainer state that names `max_steps`,
into target steps recorded in the ledger (again if the schedule is edited); each target is
served by the first checkpoint at or after it. The base model (step 0) goes first. When
checkpoints arrive faster than they are evaluated, `order: newest` keeps the curve current
and backfills older due work when idle; `oldest` evaluates in training order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from ckpt_watch.config import SchedulerConfig
from ckpt_watch.core import BASE_STEP
from ckpt_watch.ledger import CkptState, EvalState, Ledger
from ckpt_watch.suites.base import SuiteConfigBase


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
        """The step to evaluate next among those whose adapter is available."""
        # distinct steps straight from SQL: the daemon asks every loop, and the backlog may be long
        pending = self.ledger.pending_steps(self.run, [(s.name, s.hash) for s in self.suites.values()])
        steps = [s for s in pending if s in available]
        if not steps:
            return None
        if BASE_STEP in steps:
            return BASE_STEP
        return max(steps) if self.config.order == "newest" else min(steps)

    def skip(self, step: int, reason: str) -> None:
        for suite in self.pending().get(step, []):
            self.ledger.set_eval(self.run, step, suite.name, suite.hash, EvalState.SKIPPED, reason)
