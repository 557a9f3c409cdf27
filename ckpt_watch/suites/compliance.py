"""Preference compliance (CLaaS metrics): verifier scores on probe prompts, and logprob margins.

For each preference (e.g. "no emoji", "be concise", "your name is Kuro"):
- compliance = mean verifier score over sampled answers to the probe prompts, with
  `<think>` blocks stripped first; a verifier that fails or returns nothing leaves the
  answer unscored (excluded from the mean, never counted as 0);
- margin = Σ log p(positive) − Σ log p(negative) for each preference pair, the responses
  scored as continuations of the chat-templated prompt, averaged over the pairs; and
  margin_delta = margin − the base model's margin (step 0).

Preferences come from CLaaS preference YAML files (`name, feedback_string,
verifier._target_, logprob_pairs, probe_prompts`), from files in this project's format
(`verifier, probe_prompts, pairs: [{prompt | messages, positive, negative}]`), or inline.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import emoji
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ckpt_watch.core import ResultStatus, SuiteResult, utcnow
from ckpt_watch.engines.base import GenerateRequest, Message, ScoreRequest, apply_chat_template
from ckpt_watch.suites.base import SuiteConfigBase, SuiteContext, register_suite
from ckpt_watch.suites.leakage import hash_with_files

# -- verifiers --------------------------------------------------------------------------------

Verifier = Callable[[str], Any]

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)
_SENTENCE_END = re.compile(r"[.!?]+(?:\s|$)")


def strip_thinking(text: str) -> str:
    """Drop `<think>…</think>` blocks; an orphan `</think>` (the template opened the block)
    ends the thinking, and an unclosed `<think>` runs to the end of the text."""
    text = _THINK_BLOCK.sub("", text)
    close = text.find("</think>")
    if close >= 0:
        text = text[close + len("</think>") :]
    opened = text.find("<think>")
    if opened >= 0:
        text = text[:opened]
    return text.strip()


def count_sentences(text: str) -> int:
    return len([s for s in _SENTENCE_END.split(text.strip()) if s.strip()])


def no_emoji_score(text: str) -> float:
    return 1.0 if emoji.emoji_count(text) == 0 else 0.0


def concise_score(text: str) -> float:
    """≤ 3 sentences → 1, linear down to 0 at 9; fewer than 10 words is not an answer → 0."""
    if len(text.split()) < 10:
        return 0.0
    n = count_sentences(text)
    if n <= 3:
        return 1.0
    return max(0.0, 1.0 - (n - 3) / 6.0)


def identity_score(text: str) -> float:
    return 1.0 if "kuro" in text.lower() else 0.0


BUILTIN_VERIFIERS: dict[str, Verifier] = {
    "no_emoji": no_emoji_score,
    "concise": concise_score,
    "identity": identity_score,
}
# CLaaS `verifier._target_` class names → the built-in that measures the same thing
CLAAS_CLASSES = {"NoEmojiVerifier": "no_emoji", "ConciseVerifier": "concise", "IdentityVerifier": "identity"}


def resolve_verifier(spec: str) -> Verifier:
    """A built-in name, a CLaaS `_target_`, or `module:Class` / `module:function`.

    Raises ValueError naming what is wrong, so config validation can report it.
    """
    if spec in BUILTIN_VERIFIERS:
        return BUILTIN_VERIFIERS[spec]
    if ":" not in spec and spec.rsplit(".", 1)[-1] in CLAAS_CLASSES:
        return BUILTIN_VERIFIERS[CLAAS_CLASSES[spec.rsplit(".", 1)[-1]]]
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
    elif "." in spec:
        module_name, _, attr = spec.rpartition(".")  # hydra-style dotted `_target_`
    else:
        raise ValueError(
            f"unknown verifier '{spec}': use {', '.join(BUILTIN_VERIFIERS)} or an import path 'module:Class'"
        )
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"verifier '{spec}' cannot be imported: {exc}") from exc
    if isinstance(obj, type):
        try:
            obj = obj()
        except TypeError as exc:
            raise ValueError(f"verifier class '{spec}' must be constructible with no arguments: {exc}") from exc
    if not callable(obj):
        raise ValueError(f"verifier '{spec}' is not callable")
    return obj


def verify(verifier: Verifier, response: str) -> tuple[float | None, str | None]:
    """(score, error). A verifier may return a number, a bool, an object with `.score`
    (CLaaS VerifierResult) or None; anything unusable leaves the answer unscored."""
    try:
        out = verifier(strip_thinking(response))
    except Exception as exc:  # user code: a failed verification is unscored, and the reason kept
        return None, f"{type(exc).__name__}: {exc}"
    if out is not None and not isinstance(out, int | float | bool):
        out = getattr(out, "score", out)
    if out is None:
        return None, "verifier returned no score"
    if isinstance(out, bool | int | float) and math.isfinite(float(out)):
        return float(out), None
    return None, f"verifier returned {out!r}"


# -- preference data ------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PairSpec(_Strict):
    prompt: str | None = Field(default=None, description="User turn (or give `messages`).")
    messages: list[dict[str, str]] | None = Field(default=None, description="Chat before the response.")
    positive: str
    negative: str

    @model_validator(mode="after")
    def _one_prompt(self) -> PairSpec:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("a pair needs exactly one of 'prompt' or 'messages'")
        return self

    def chat(self) -> list[Message]:
        if self.messages is not None:
            return [dict(m) for m in self.messages]
        return [{"role": "user", "content": self.prompt or ""}]


class PreferenceSpec(_Strict):
    verifier: str = Field(description="no_emoji | concise | identity | a CLaaS _target_ | module:Class")
    probe_prompts: list[str] = Field(default_factory=list)
    pairs: list[PairSpec] = Field(default_factory=list)
    feedback: str | None = Field(default=None, description="The feedback text (informational).")

    @field_validator("verifier")
    @classmethod
    def _importable(cls, value: str) -> str:
        resolve_verifier(value)
        return value

    @model_validator(mode="after")
    def _something(self) -> PreferenceSpec:
        if not self.probe_prompts and not self.pairs:
            raise ValueError("a preference needs probe_prompts, pairs, or both")
        return self


def claas_to_spec(data: dict[str, Any]) -> PreferenceSpec:
    """A CLaaS preference file → our PreferenceSpec."""
    verifier = data.get("verifier")
    target = verifier.get("_target_") if isinstance(verifier, dict) else None
    if not isinstance(target, str):
        raise ValueError("CLaaS preference needs verifier._target_")
    pairs = [
        PairSpec(messages=p["prompt_messages"], positive=p["positive_response"], negative=p["negative_response"])
        for p in data.get("logprob_pairs") or []
    ]
    return PreferenceSpec(
        verifier=target,
        probe_prompts=list(data.get("probe_prompts") or []),
        pairs=pairs,
        feedback=data.get("feedback_string"),
    )


def load_preference_file(path: Path) -> tuple[str, PreferenceSpec]:
    """(name, spec) from a CLaaS file (verifier is a mapping) or our format (verifier is a string)."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping")
    name = str(data.get("name") or path.stem)
    if isinstance(data.get("verifier"), dict):
        return name, claas_to_spec(data)
    return name, PreferenceSpec.model_validate({k: v for k, v in data.items() if k != "name"})


class ComplianceConfig(SuiteConfigBase):
    type: Literal["compliance"] = "compliance"
    files: list[Path] = Field(default_factory=list, description="Preference YAML files (CLaaS or ours).")
    preferences: dict[str, PreferenceSpec] = Field(default_factory=dict, description="Inline: name → spec.")
    system_prompt: str | None = Field(default=None, description="System turn for probes and pairs that lack one.")
    samples_per_prompt: int = Field(default=1, ge=1)
    temperature: float = Field(default=0.7, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens: int = Field(default=256, ge=1)
    seed: int = 0

    @field_validator("files")
    @classmethod
    def _files_load(cls, value: list[Path]) -> list[Path]:
        for i, path in enumerate(value):
            if not path.is_file():
                raise ValueError(f"[{i}] preference file {path} does not exist")
            try:
                load_preference_file(path)
            except (ValueError, yaml.YAMLError, KeyError, TypeError) as exc:
                raise ValueError(f"[{i}] {path}: {exc}") from exc
        return value

    @model_validator(mode="after")
    def _names(self) -> ComplianceConfig:
        names = [load_preference_file(p)[0] for p in self.files] + list(self.preferences)
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"preference names defined twice: {', '.join(dupes)}")
        if not names:
            raise ValueError("no preferences: give 'files' or 'preferences'")
        return self

    def config_hash(self) -> str:
        return hash_with_files(super().config_hash(), list(self.files))

    def all_preferences(self) -> dict[str, PreferenceSpec]:
        prefs = dict(load_preference_file(p) for p in self.files)
        prefs.update(self.preferences)
        return prefs


# -- scoring --------------------------------------------------------------------------------


def with_system(messages: list[Message], system: str | None) -> list[Message]:
    if system is None or any(m.get("role") == "system" for m in messages):
        return messages
    return [{"role": "system", "content": system}, *messages]


def pair_requests(tokenizer: Any, pair: PairSpec, system: str | None) -> tuple[ScoreRequest, ScoreRequest]:
    """Positive and negative responses as continuations of the templated prompt, in token ids."""
    prompt = apply_chat_template(tokenizer, with_system(pair.chat(), system))
    pos = tokenizer.encode(pair.positive, add_special_tokens=False)
    neg = tokenizer.encode(pair.negative, add_special_tokens=False)
    return ScoreRequest(prompt, pos), ScoreRequest(prompt, neg)


def mean_or_nan(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


@dataclass
class _Probe:
    preference: str
    prompt: str


@register_suite("compliance", ComplianceConfig, "Preference compliance (CLaaS verifiers) and logprob margins")
class ComplianceSuite:
    def __init__(self, name: str, config: ComplianceConfig):
        self.name = name
        self.config = config
        self.prefs = config.all_preferences()
        self.verifiers = {n: resolve_verifier(p.verifier) for n, p in self.prefs.items()}

    async def run(self, ctx: SuiteContext) -> SuiteResult:
        started = utcnow()
        metrics: dict[str, float] = {}
        samples: list[dict[str, Any]] = []
        n_scored, n_unscored = await self._compliance(ctx, metrics, samples)
        await self._margins(ctx, metrics, samples)
        return SuiteResult(
            suite=self.name,
            step=ctx.checkpoint.step,
            status=ResultStatus.OK,
            metrics=metrics,
            samples=samples,
            n_scored=n_scored,
            n_unscored=n_unscored,
            started_at=started,
            finished_at=utcnow(),
        )

    async def _compliance(self, ctx: SuiteContext, metrics: dict[str, float], samples: list) -> tuple[int, int]:
        cfg = self.config
        probes = [_Probe(n, p) for n, spec in self.prefs.items() for p in spec.probe_prompts]
        reqs = [
            GenerateRequest(
                messages=with_system([{"role": "user", "content": pr.prompt}], cfg.system_prompt),
                n=cfg.samples_per_prompt,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                max_tokens=cfg.max_tokens,
                seed=cfg.seed * 100_003 + i,
            )
            for i, pr in enumerate(probes)
        ]
        results = await ctx.engine.generate(ctx.handle, reqs) if reqs else []
        scores: dict[str, list[float]] = {n: [] for n, s in self.prefs.items() if s.probe_prompts}
        n_unscored = 0
        for probe, res in zip(probes, results, strict=True):
            for comp in res.completions:
                score, error = verify(self.verifiers[probe.preference], comp.text)
                if score is None:
                    n_unscored += 1
                else:
                    scores[probe.preference].append(score)
                samples.append(
                    {"kind": "probe", "preference": probe.preference, "prompt": probe.prompt,
                     "response": comp.text, "score": score, "error": error}
                )
        for pref, vals in scores.items():
            metrics[pref] = mean_or_nan(vals)
        return sum(len(v) for v in scores.values()), n_unscored

    async def _margins(self, ctx: SuiteContext, metrics: dict[str, float], samples: list) -> None:
        tok = ctx.engine.tokenizer
        keys, reqs = [], []
        for pref, spec in self.prefs.items():
            for i, pair in enumerate(spec.pairs):
                keys.append((pref, i))
                reqs.extend(pair_requests(tok, pair, self.config.system_prompt))
        if not reqs:
            return
        scores = await ctx.engine.score(ctx.handle, reqs)
        margins: dict[str, list[float]] = {}
        for j, (pref, i) in enumerate(keys):
            pos, neg = scores[2 * j].total, scores[2 * j + 1].total
            margins.setdefault(pref, []).append(pos - neg)
            samples.append(
                {"kind": "pair", "preference": pref, "pair": i, "logprob_positive": pos,
                 "logprob_negative": neg, "margin": pos - neg}
            )
        base = ctx.baseline.metrics if ctx.baseline is not None else None
        for pref, vals in margins.items():
            margin = mean_or_nan(vals)
            metrics[f"margin/{pref}"] = margin
            metrics[f"margin_delta/{pref}"] = margin_delta(margin, base, pref, is_base=ctx.handle.is_base)


def margin_delta(margin: float, baseline: dict[str, float] | None, pref: str, *, is_base: bool) -> float:
    """Change from the base model's margin; NaN (kept in JSON, not plotted) when no baseline exists."""
    if is_base:
        return 0.0
    if baseline is None or f"margin/{pref}" not in baseline:
        return float("nan")
    return margin - float(baseline[f"margin/{pref}"])
