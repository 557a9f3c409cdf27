"""Suite protocol, per-suite config base and the registry of suite types.

A suite is a factory registered by name (inspect_ai's habit): `type` in YAML picks the
factory and its pydantic config model. Prompt building and scoring live in pure
functions inside each suite module; `run` only wires them to the engine.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, Field

from ckpt_watch.core import AdapterHandle, Checkpoint, SuiteResult
from ckpt_watch.engines.base import Engine

# Fields that say *when* a suite runs, not *what* it measures: changing them must not
# invalidate results already in the ledger.
SCHEDULE_FIELDS = frozenset({"every", "at_final", "base"})


class SuiteConfigBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str
    every: int | None = Field(
        default=None,
        ge=1,
        description="Evaluate checkpoints whose step is a multiple of this; null = every checkpoint.",
    )
    at_final: bool = Field(default=True, description="Always evaluate the run's final checkpoint.")
    base: bool = Field(default=True, description="Evaluate the base model as step 0.")

    def config_hash(self) -> str:
        """Stable hash of what the suite measures; a change re-queues finished steps."""
        payload = self.model_dump(mode="json", exclude=set(SCHEDULE_FIELDS))
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def needs_judge(self) -> bool:
        return False

    def max_logprobs(self) -> int:
        """Largest top-k log-probs this suite asks of the engine (vLLM's --max-logprobs)."""
        return 0


Progress = Callable[[int, int], None]  # (done, total)


@dataclass
class SuiteContext:
    """Everything a suite may use while it runs on one checkpoint."""

    engine: Engine
    handle: AdapterHandle
    checkpoint: Checkpoint
    run_name: str
    # this suite's result on the base model (step 0), when it exists; for drift / margin change
    baseline: SuiteResult | None = None
    judge: Any = None
    cache_dir: Path | None = None
    progress: Progress = field(default=lambda done, total: None)


class Suite(Protocol):
    name: str
    config: SuiteConfigBase

    async def run(self, ctx: SuiteContext) -> SuiteResult: ...


SuiteFactory = Callable[[str, Any], Suite]


@dataclass(frozen=True)
class SuiteType:
    type: str
    config_model: type[SuiteConfigBase]
    factory: SuiteFactory
    summary: str


class _Registry:
    types: ClassVar[dict[str, SuiteType]] = {}


def register_suite(type_name: str, config_model: type[SuiteConfigBase], summary: str):
    """Class decorator: `@register_suite("arc_challenge", ArcConfig, "...")`."""

    def deco(cls):
        _Registry.types[type_name] = SuiteType(type_name, config_model, cls, summary)
        return cls

    return deco


def suite_types() -> dict[str, SuiteType]:
    # importing the package registers every built-in suite
    import ckpt_watch.suites  # noqa: F401

    return dict(_Registry.types)


def build_suite(name: str, config: SuiteConfigBase) -> Suite:
    return suite_types()[config.type].factory(name, config)
