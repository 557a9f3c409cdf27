"""What is due: which (step, suite) evaluations to queue, and which step to evaluate next.

Per suite, `every` (training steps) and `at_final` decide whether a checkpoint is due; a
checkpoint that is not due is recorded as `skipped` with the reason, never dropped
silently. The base model (step 0) goes first. When checkpoints arrive faster than they
are evaluated, `order: newest` keeps the curve current and backfills older due work
when idle; `oldest` evaluates in training order.
"""

from __future__ import annotations

from dataclasses import dataclass

from ckpt_watch.config import SchedulerConfig
from ckpt_watch.core import BASE_STEP
from ckpt_watch.ledger import EvalState, Ledger
from ckpt_watch.suites.base import SuiteConfigBase


@dataclass(frozen=True)
class PlannedSuite:
    name: str
    config: SuiteConfigBase
    hash: str


def due_reason(cfg: SuiteConfigBase, step: int, is_final: bool) -> str | None:
    """None when the suite is due at this step, else why it is not."""
    if step == BASE_STEP:
        return None if cfg.base else "suite has base: false"
    if cfg.every is None or step % cfg.every == 0:
        return None
    if is_final and cfg.at_final:
        return None
    return f"step {step} is not a multiple of every={cfg.every}" + ("" if not is_final else " (at_final: false)")


class Scheduler:
    def __init__(self, ledger: Ledger, run: str, suites: dict[str, SuiteConfigBase], config: SchedulerConfig):
        self.ledger = ledger
        self.run = run
        self.config = config
        self.suites = {name: PlannedSuite(name, cfg, cfg.config_hash()) for name, cfg in suites.items()}

    def plan_base(self) -> None:
        if self.config.base:
            self.plan(BASE_STEP, is_final=False)

    def plan(self, step: int, is_final: bool) -> int:
        """Record every suite's row for this step; returns how many are newly pending."""
        added = 0
        for s in self.suites.values():
            reason = due_reason(s.config, step, is_final)
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
