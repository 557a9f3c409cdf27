"""Suite protocol, per-suite config base and the registry of suite types.

A suite is a factory registered by name (inspect_ai's habit): `type` in YAML picks the
factory and its pydantic config model. Prompt building and scoring live in pure
functions inside each suite module; `run` only wires them to the engine.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ckpt_watch.core import AdapterHandle, Checkpoint, SuiteResult
from ckpt_watch.engines.base import Engine

# Fields that say *when* a suite runs, not *what* it measures: changing them must not
# invalidate results already in the ledger.
SCHEDULE_FIELDS = frozenset({"every", "at", "at_final", "base"})
_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


def hash_with_files(config_hash: str, paths: list[Path | None]) -> str:
    """Mix the content of the data files into a config hash: editing a questions or
    preference file must re-queue finished steps just as editing the YAML does."""
    h = hashlib.sha256(config_hash.encode())
    for path in paths:
        if path is not None and path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()[:12]


class SuiteConfigBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str
    every: int | str | None = Field(
        default=None,
        description="Evaluate checkpoints whose step is a multiple of this (steps), or every 'P%' of training "
                    "(the first checkpoint at or after each P% of max_steps); null = every checkpoint.",
    )
    at: list[float] | None = Field(
        default=None,
        description="Fractions of training (e.g. [0.25, 0.5, 1.0]): the first checkpoint at or after each.",
    )
    at_final: bool = Field(default=True, description="Always evaluate the run's final checkpoint.")
    base: bool = Field(default=True, description="Evaluate the base model as step 0.")

    @field_validator("every")
    @classmethod
    def _every(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, str):
            m = _PERCENT.match(value)
            if not m or not 0 < float(m.group(1)) <= 100:
                raise ValueError(f"every must be a step count or a percentage like '20%', not {value!r}")
            return f"{float(m.group(1)):g}%"
        if isinstance(value, int) and value < 1:
            raise ValueError("every must be at least 1 step")
        return value

    @field_validator("at")
    @classmethod
    def _at(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (not value or not all(0 < f <= 1 for f in value)):
            raise ValueError("at: fractions of training in (0, 1], e.g. [0.25, 0.5, 1.0]")
        return sorted(set(value)) if value else value

    @model_validator(mode="after")
    def _one_schedule(self) -> SuiteConfigBase:
        if self.at is not None and isinstance(self.every, int):
            raise ValueError("give either every: N (steps) or at: [fractions], not both "
                             "(every: 'P%' and at combine)")
        return self

    def percent_schedule(self) -> bool:
        """Whether this suite's due steps depend on the run's max_steps."""
        return self.at is not None or isinstance(self.every, str)

    def schedule_targets(self, max_steps: int) -> list[int]:
        """The training steps a percent schedule aims at (each served by the first checkpoint at or after)."""
        fractions = list(self.at or [])
        if isinstance(self.every, str):
            p = float(self.every.rstrip("%")) / 100
            fractions += [k * p for k in range(1, int(1 / p + 1e-9) + 1)]
        return sorted({max(1, round(f * max_steps)) for f in fractions})

    # Path fields whose file *contents* are inputs too (editing the data re-queues finished steps)
    hashed_files: ClassVar[tuple[str, ...]] = ()

    def config_hash(self) -> str:
        """Stable hash of what the suite measures; a change re-queues finished steps."""
        payload = self.model_dump(mode="json", exclude=set(SCHEDULE_FIELDS))
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        plain = hashlib.sha256(blob).hexdigest()[:12]
        files = [getattr(self, name) for name in self.hashed_files]
        return hash_with_files(plain, files) if any(f is not None for f in files) else plain

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
