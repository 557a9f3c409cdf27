"""Personas as one concept across suites.

A persona is a name and a system prompt. The config defines them once, at the top level:

    personas:
      source: villain                 # the persona the fine-tuning targets (optional)
      prompts:
        villain: "You are Dr. Vex, ..."
        assistant: "You are a helpful, precise assistant."

and every suite that generates or scores (leakage, arc_challenge, alignment) picks from them
with its own `personas` option:

- `all`: every top-level persona;
- a list of names: those personas;
- `none` (or null): no system prompt, the suite's plain metrics (the default for ARC-C and
  alignment; `leakage` defaults to `all`);
- a mapping name → system prompt: the suite's own personas (the older suite-level block; still
  valid, and the top-level block is then not consulted).

A suite with personas reports `<metric>/<persona>` for each one, plus source-vs-others
summaries: `<metric>/source`, `<metric>/other_mean` and, where a worst case matters,
`<metric>/other_min` / `other_max`. The resolved personas (names, prompts, source) are part of
the suite's config hash: editing a prompt re-queues finished steps, as editing any option does.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from ckpt_watch.suites.base import SCHEDULE_FIELDS, SuiteConfigBase, hash_with_files

PERSONA_NAME = re.compile(r"[A-Za-z0-9_.-]+")
# summary names a persona may not take: they share the `<metric>/<name>` key space
RESERVED_NAMES = frozenset({"source", "other_mean", "other_min", "other_max"})

Selection = Literal["all", "none"] | list[str] | dict[str, str] | None


class PersonaError(ValueError):
    """A suite's personas cannot be resolved; `field` is the suite option at fault."""

    def __init__(self, message: str, field: str = "personas"):
        super().__init__(message)
        self.field = field


def check_persona_names(names: list[str]) -> None:
    """ValueError for a name that cannot be a metric key segment or clashes with a summary key."""
    for name in names:
        if not PERSONA_NAME.fullmatch(name):
            raise ValueError(f"persona name {name!r} may only hold letters, digits, '_', '.', '-'")
        if name in RESERVED_NAMES:
            raise ValueError(f"persona name {name!r} is reserved for the source-vs-others summaries")


class PersonasConfig(BaseModel):
    """The top-level `personas` block: name → system prompt, and which one is the source."""

    model_config = ConfigDict(extra="forbid")

    source: str | None = Field(
        default=None, description="The persona the fine-tuning targets; summaries compare it with the others."
    )
    prompts: dict[str, str] = Field(description="name → system prompt.")

    @field_validator("prompts")
    @classmethod
    def _names(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("needs at least one persona (name: system prompt)")
        check_persona_names(list(value))
        return value

    @model_validator(mode="after")
    def _source_defined(self) -> PersonasConfig:
        if self.source is not None and self.source not in self.prompts:
            raise ValueError(f"source: persona '{self.source}' is not in prompts ({', '.join(sorted(self.prompts))})")
        return self


class PersonaSuiteConfig(SuiteConfigBase):
    """Base of the suite configs that take `personas`. The selection is resolved against the
    top-level block by `bind_personas` (Config does it at load); a mapping resolves at once."""

    personas: Selection = Field(
        default="none",
        description="all | [names] | none: which top-level personas to run under (system prompt each); "
                    "a mapping name → system prompt defines the suite's own.",
    )
    source: str | None = Field(
        default=None, description="The source persona; default: the top-level personas.source."
    )
    # what `all` means when the config has no top-level personas (None: an error)
    fallback_personas: ClassVar[dict[str, str] | None] = None
    _resolved: dict[str, str] | None = PrivateAttr(default=None)
    _source: str | None = PrivateAttr(default=None)

    @field_validator("personas", mode="before")
    @classmethod
    def _selection(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in {"all", "none"}:
            raise ValueError(f"personas: 'all', 'none', a list of names or a mapping name → prompt, not {value!r}")
        if isinstance(value, list) and (not value or len(set(value)) != len(value)):
            raise ValueError("personas: a non-empty list of distinct persona names")
        if isinstance(value, dict):
            check_persona_names([str(k) for k in value])
        return value

    @model_validator(mode="after")
    def _own_personas(self) -> PersonaSuiteConfig:
        if isinstance(self.personas, dict) or self.personas in (None, "none"):
            try:
                self._bind(dict(self.personas) if isinstance(self.personas, dict) else {}, None)
            except PersonaError as exc:
                if exc.field != "source" or self.source is not None:
                    raise
                self._resolved = None  # the top-level block may name the source: Config binds again
        return self

    # -- resolution ----------------------------------------------------------------------------

    def bind_personas(self, top: PersonasConfig | None) -> None:
        """Resolve `personas` against the top-level block; ValueError says what is missing."""
        sel = self.personas
        if isinstance(sel, dict) or sel in (None, "none"):
            self._bind(dict(sel) if isinstance(sel, dict) else {}, top.source if top else None)
            return
        if top is None:
            if sel == "all" and self.fallback_personas is not None:
                self._bind(dict(self.fallback_personas), None)
                return
            raise ValueError(f"personas: {sel!r} refers to the top-level 'personas' block, which is missing")
        if sel == "all":
            chosen = dict(top.prompts)
        else:
            unknown = [n for n in sel if n not in top.prompts]
            if unknown:
                raise ValueError(f"personas: {unknown} not defined in the top-level personas "
                                 f"({', '.join(sorted(top.prompts))})")
            chosen = {n: top.prompts[n] for n in sel}
        self._bind(chosen, top.source)

    def _bind(self, prompts: dict[str, str], top_source: str | None) -> None:
        source = self.source if self.source is not None else top_source
        if self.source is not None and prompts and self.source not in prompts:
            raise PersonaError(f"persona '{self.source}' is not among this suite's personas "
                               f"({', '.join(sorted(prompts))})", field="source")
        self._resolved = prompts
        # a top-level source this suite does not run under: no source summary
        self._source = source if source in prompts else None
        self.check_personas(prompts)

    def check_personas(self, prompts: dict[str, str]) -> None:
        """Suite-specific checks of the resolved personas (override); raise ValueError."""

    def persona_prompts(self) -> dict[str, str]:
        """name → system prompt this suite runs under ({} = none)."""
        if self._resolved is None:
            self.bind_personas(None)
        return dict(self._resolved or {})

    def source_persona(self) -> str | None:
        if self._resolved is None:
            self.bind_personas(None)
        return self._source

    # -- hashing -------------------------------------------------------------------------------

    def persona_hash_fields(self) -> dict[str, Any]:
        """What the resolved personas add to the hashed payload. Empty when the suite runs without
        personas, so configs written before personas existed keep their hash (override to keep
        a suite's earlier payload shape)."""
        prompts = self.persona_prompts()
        if not prompts:
            return {}
        return {"personas": prompts, "source": self.source_persona()}

    def config_hash(self) -> str:
        payload = self.model_dump(mode="json", exclude=set(SCHEDULE_FIELDS) | {"personas", "source"})
        payload.update(self.persona_hash_fields())
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        plain = hashlib.sha256(blob).hexdigest()[:12]
        files = [getattr(self, name) for name in self.hashed_files]
        return hash_with_files(plain, files) if any(f is not None for f in files) else plain


def bind_all(suites: dict[str, Any], top: PersonasConfig | None) -> list[tuple[str, str]]:
    """Resolve every persona-taking suite; (dotted path, reason) for each that cannot be."""
    errors = []
    for name, suite in suites.items():
        if isinstance(suite, PersonaSuiteConfig):
            try:
                suite.bind_personas(top)
            except ValueError as exc:
                errors.append((f"suites.{name}.{getattr(exc, 'field', 'personas')}", str(exc)))
    return errors


# -- metrics -----------------------------------------------------------------------------------


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if isinstance(v, float | int) and math.isfinite(v)]


def source_vs_others(metric: str, per_persona: dict[str, float], source: str | None,
                     worst: Literal["min", "max"] | None = None) -> dict[str, float]:
    """`<metric>/source` and `<metric>/other_mean` (mean over personas, each counted once), plus
    `<metric>/other_min` or `other_max` when `worst` names the direction that is bad. Nothing
    without a source; NaN where no other persona has a finite value."""
    if source is None or source not in per_persona:
        return {}
    others = _finite([v for p, v in per_persona.items() if p != source])
    out = {f"{metric}/source": per_persona[source],
           f"{metric}/other_mean": sum(others) / len(others) if others else float("nan")}
    if worst is not None:
        out[f"{metric}/other_{worst}"] = (min if worst == "min" else max)(others) if others else float("nan")
    return out
