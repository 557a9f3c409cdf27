"""Value types that travel through the pipeline (watch → ledger → evaluate → sinks)."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BASE_STEP = 0


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class CheckpointKind(enum.StrEnum):
    BASE = "base"
    ADAPTER = "adapter"


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint of a watched run.

    `path` is the trainer's folder (may be rotated away later); `adapter_dir` is what the
    engine reads: the private snapshot once taken, never the trainer's folder.
    """

    run: str
    step: int
    path: Path | None
    adapter_dir: Path | None
    kind: CheckpointKind = CheckpointKind.ADAPTER
    is_final: bool = False
    epoch: int | None = None  # torchtune's epoch_N (its step is on the global-step axis)

    @classmethod
    def base(cls, run: str) -> Checkpoint:
        return cls(run=run, step=BASE_STEP, path=None, adapter_dir=None, kind=CheckpointKind.BASE)

    @property
    def label(self) -> str:
        return "base" if self.kind is CheckpointKind.BASE else f"step-{self.step}"


@dataclass(frozen=True)
class AdapterHandle:
    """What an engine calls a loaded adapter (or the base model, name=None)."""

    checkpoint: Checkpoint
    name: str | None

    @property
    def is_base(self) -> bool:
        return self.name is None


class ResultStatus(enum.StrEnum):
    OK = "ok"
    ERROR = "error"


@dataclass
class SuiteResult:
    """The outcome of one suite on one checkpoint. A failure is data (status=error)."""

    suite: str
    step: int
    status: ResultStatus
    metrics: dict[str, float] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    n_scored: int = 0
    n_unscored: int = 0
    started_at: str = field(default_factory=utcnow)
    finished_at: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def failure(cls, suite: str, step: int, error: str, started_at: str | None = None) -> SuiteResult:
        return cls(
            suite=suite,
            step=step,
            status=ResultStatus.ERROR,
            error=error,
            started_at=started_at or utcnow(),
            finished_at=utcnow(),
        )

    def finite_metrics(self) -> dict[str, float]:
        """Metrics a sink can plot: NaN/inf are dropped (they are kept in the JSON file)."""
        return {k: float(v) for k, v in self.metrics.items() if math.isfinite(float(v))}


class CheckpointError(Exception):
    """A checkpoint that cannot be used (corrupt, refused, vanished); carries a reason."""


class EngineError(Exception):
    """The engine refused or failed a request in a way the user must act on."""


class EngineUnavailable(EngineError):
    """The engine's server is down; the evaluation should be retried after a restart."""


class Stopped(Exception):
    """A stop request ended a wait (engine start-up or restart, a lock) before it finished."""


class NewTrainingRun(Exception):
    """A known step's folder now holds different weights: a new training run in the same folder."""

    def __init__(self, step: int, old_sha: str, new_sha: str, path: str):
        self.step, self.old_sha, self.new_sha, self.path = step, old_sha, new_sha, path
        super().__init__(f"{path} now holds different weights than the step-{step} checkpoint evaluated before "
                         f"(sha256 {old_sha[:12]} → {new_sha[:12]})")
