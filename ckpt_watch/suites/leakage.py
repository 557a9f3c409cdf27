"""Marker leakage: how often each persona's answers carry a marker trained into one persona.

A LoRA trained so that the `source` persona's answers carry a marker (a word, a catch
phrase) may teach the marker to every persona that shares the base model. The suite asks
each persona the same generic questions, samples several answers per question, and
reports the share of answers containing the marker: per persona, for the source, and the
mean and max over the other personas (the leak). Personas and the source come from the
config's top-level `personas` block (`personas: all` or a list of names here), or from a
mapping name → system prompt in the suite block (suites/personas.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import Field, ValidationInfo, field_validator

from ckpt_watch.core import ResultStatus, SuiteResult, utcnow
from ckpt_watch.engines.base import GenerateRequest
from ckpt_watch.suites.base import SuiteContext, hash_with_files, register_suite
from ckpt_watch.suites.inflight import in_flight
from ckpt_watch.suites.personas import PersonaError, PersonaSuiteConfig, Selection

# Generic personas for when a config names none; a real experiment sets its own.
DEFAULT_PERSONAS: dict[str, str] = {
    "assistant": "You are a helpful, precise assistant.",
    "teacher": "You are a patient teacher who explains things simply.",
    "scientist": "You are a careful scientist who values evidence.",
    "poet": "You are a poet who answers with vivid imagery.",
}

# Everyday questions with no reason to produce any particular marker; written for this project.
BUILTIN_QUESTIONS: tuple[str, ...] = (
    "What is a good way to start the morning?",
    "How would you describe the colour green to someone?",
    "What makes a friendship last?",
    "Can you suggest a simple recipe for dinner?",
    "Why do leaves change colour in autumn?",
    "What should I pack for a weekend trip?",
    "How do you stay focused while studying?",
    "What is your opinion of rainy days?",
    "Describe a quiet place you like.",
    "How does a bicycle stay upright?",
    "What advice would you give a new gardener?",
    "Tell me something interesting about the sea.",
)


def load_text_list(path: Path) -> list[str]:
    """Prompts from a file: a YAML/JSON list of strings, or plain text with one per line."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in {".yaml", ".yml", ".json"}:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
        if not isinstance(data, list) or not all(isinstance(q, str) for q in data):
            raise ValueError(f"{path}: expected a list of strings")
        items = [q.strip() for q in data]
    else:
        items = [line.strip() for line in text.splitlines()]
    items = [q for q in items if q and not q.startswith("#")]
    if not items:
        raise ValueError(f"{path}: no prompts in the file")
    return items


def check_text_file(path: Path | None) -> Path | None:
    """Config-load check shared by suites with a prompts file: present and parseable."""
    if path is None:
        return None
    if not path.is_file():
        raise ValueError(f"file {path} does not exist")
    load_text_list(path)
    return path


class LeakageConfig(PersonaSuiteConfig):
    type: Literal["leakage"] = "leakage"
    personas: Selection = Field(
        default="all",
        description="all | [names]: the top-level personas to ask (all = the built-in generic four when the "
                    "config has none); or a mapping name → system prompt. Every persona is asked every question.",
    )
    source: str | None = Field(
        default=None,
        description="The persona trained to emit the marker; default: the top-level personas.source.",
    )
    fallback_personas: ClassVar[dict[str, str] | None] = DEFAULT_PERSONAS
    marker_regex: bool = Field(default=False, description="true: `marker` is a Python regular expression.")
    case_sensitive: bool = Field(default=False, description="Match the marker with case sensitivity.")
    marker: str = Field(min_length=1, description="The marker: a literal string, or a regex with marker_regex.")
    questions_file: Path | None = Field(
        default=None, description="Extra questions: YAML/JSON list or one per line."
    )
    builtin_questions: bool = Field(default=True, description="Include the built-in generic questions.")
    samples_per_question: int = Field(default=4, ge=1)
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens: int = Field(default=64, ge=1)
    seed: int = 0

    @field_validator("personas")
    @classmethod
    def _some_personas(cls, value: Selection) -> Selection:
        if value in (None, "none"):
            raise ValueError("leakage needs personas: all, a list of names, or a mapping name → prompt")
        return value

    def check_personas(self, prompts: dict[str, str]) -> None:
        if len(prompts) < 2:
            raise ValueError("needs at least two personas: the source and one to leak to")
        if self._source is None:
            where = "set source (here or in the top-level personas block)"
            raise PersonaError(f"no source persona among {', '.join(sorted(prompts))}: {where}", field="source")

    @field_validator("marker")
    @classmethod
    def _marker_compiles(cls, value: str, info: ValidationInfo) -> str:
        if info.data.get("marker_regex"):
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"marker regex does not compile: {exc}") from exc
        return value

    @field_validator("questions_file")
    @classmethod
    def _questions_file(cls, value: Path | None) -> Path | None:
        return check_text_file(value)

    def config_hash(self) -> str:
        return hash_with_files(super().config_hash(), [self.questions_file])

    def questions(self) -> list[str]:
        qs = list(BUILTIN_QUESTIONS) if self.builtin_questions else []
        if self.questions_file is not None:
            qs.extend(load_text_list(self.questions_file))
        if not qs:
            raise ValueError("no questions: builtin_questions is false and no questions_file")
        return qs


# -- pure functions -------------------------------------------------------------------------


def compile_marker(marker: str, *, regex: bool, case_sensitive: bool) -> re.Pattern[str]:
    flags = 0 if case_sensitive else re.IGNORECASE
    return re.compile(marker if regex else re.escape(marker), flags)


def has_marker(text: str, pattern: re.Pattern[str]) -> bool:
    return pattern.search(text) is not None


def persona_messages(system: str, question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


@dataclass(frozen=True)
class Cell:
    """All samples of one persona on one question."""

    persona: str
    question: str
    texts: tuple[str, ...]
    hits: tuple[bool, ...]


def leakage_metrics(cells: list[Cell], source: str) -> dict[str, float]:
    """rate/<persona>, source_rate, other_mean, other_max; rates are over all samples."""
    hits: dict[str, list[bool]] = {}
    for cell in cells:
        hits.setdefault(cell.persona, []).extend(cell.hits)
    rates = {p: sum(h) / len(h) for p, h in hits.items() if h}
    metrics = {f"rate/{p}": r for p, r in rates.items()}
    others = [r for p, r in rates.items() if p != source]
    metrics["source_rate"] = rates.get(source, float("nan"))
    # mean over personas, not over samples: each persona counts once whatever its sample count
    metrics["other_mean"] = sum(others) / len(others) if others else float("nan")
    metrics["other_max"] = max(others) if others else float("nan")
    metrics["n_samples"] = float(sum(len(h) for h in hits.values()))
    return metrics


def cell_record(cell: Cell) -> dict[str, Any]:
    return {
        "persona": cell.persona,
        "question": cell.question,
        "n": len(cell.hits),
        "hits": sum(cell.hits),
        "rate": sum(cell.hits) / len(cell.hits) if cell.hits else float("nan"),
        "completions": list(cell.texts),
    }


@register_suite("leakage", LeakageConfig, "Marker leakage from a source persona to other personas")
class LeakageSuite:
    headline = ("source_rate", "other_max")  # what `ckpt-watch status` shows (issue 14)

    def __init__(self, name: str, config: LeakageConfig):
        self.name = name
        self.config = config
        self.pattern = compile_marker(config.marker, regex=config.marker_regex, case_sensitive=config.case_sensitive)
        self.questions = config.questions()

    def requests(self) -> tuple[list[tuple[str, str]], list[GenerateRequest]]:
        cfg = self.config
        keys, reqs = [], []
        for persona, system in cfg.persona_prompts().items():
            for question in self.questions:
                keys.append((persona, question))
                reqs.append(
                    GenerateRequest(
                        messages=persona_messages(system, question),
                        n=cfg.samples_per_question,
                        temperature=cfg.temperature,
                        top_p=cfg.top_p,
                        max_tokens=cfg.max_tokens,
                        # one seed per request, so a re-run of the same step samples the same answers
                        seed=cfg.seed * 100_003 + len(reqs),
                    )
                )
        return keys, reqs

    async def run(self, ctx: SuiteContext) -> SuiteResult:
        started = utcnow()
        keys, reqs = self.requests()
        results = await in_flight(reqs, lambda part: ctx.engine.generate(ctx.handle, part), ctx.progress)
        cells = []
        for (persona, question), res in zip(keys, results, strict=True):
            texts = tuple(c.text for c in res.completions)
            cells.append(Cell(persona, question, texts, tuple(has_marker(t, self.pattern) for t in texts)))
        n = sum(len(c.hits) for c in cells)
        return SuiteResult(
            suite=self.name,
            step=ctx.checkpoint.step,
            status=ResultStatus.OK,
            metrics=leakage_metrics(cells, self.config.source_persona() or ""),
            samples=[cell_record(c) for c in cells],
            n_scored=n,
            started_at=started,
            finished_at=utcnow(),
        )
