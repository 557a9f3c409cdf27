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

Which code a verifier may be: model output is passed to it, so a data file (a preference file,
CLaaS's or ours) may only name a built-in verifier or one of CLaaS's classes, which map to the
built-ins without importing anything. Custom verifier code comes only from the config file
itself, as an inline preference's `verifier: module:Class`, and only with
`allow_custom_verifiers: true` on the suite; config validation (`ckpt-watch validate`) imports
the module to check that the class exists and never instantiates or calls it. The suite
instantiates it (no arguments) when it is built to run.
"""

from __future__ import annotations

import importlib
import math
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import emoji
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError, ValidationError

from ckpt_watch.core import ResultStatus, SuiteResult, utcnow
from ckpt_watch.engines.base import GenerateRequest, Message, ScoreRequest, apply_chat_template
from ckpt_watch.suites.base import SuiteConfigBase, SuiteContext, register_suite
from ckpt_watch.suites.leakage import hash_with_files

# -- verifiers --------------------------------------------------------------------------------

Verifier = Callable[[str], Any]

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)
_SENTENCE_END = re.compile(r"[.!?]+(?:\s|$)")


def strip_thinking(text: str, *, drop_unclosed: bool = False) -> str:
    """Drop `<think>…</think>` blocks; an orphan `</think>` (the template opened the block)
    ends the thinking (CLaaS's strip_thinking exactly). With `drop_unclosed`, an unclosed
    `<think>` (an answer cut off mid-thought) also runs to the end of the text; CLaaS keeps it."""
    text = _THINK_BLOCK.sub("", text)
    close = text.find("</think>")
    if close >= 0:
        text = text[close + len("</think>") :]
    opened = text.find("<think>") if drop_unclosed else -1
    if opened >= 0:
        text = text[:opened]
    return text.strip()


def count_sentences(text: str) -> int:
    return len([s for s in _SENTENCE_END.split(text.strip()) if s.strip()])


def is_emoji_char(char: str) -> bool:
    """CLaaS's `_is_emoji`: Unicode category So, or one of six pictograph/flag blocks. It also
    catches symbols such as ° © ★ ♥ and misses keycaps (1️⃣) and ‼ ⁉ (category Po)."""
    if unicodedata.category(char) == "So":
        return True
    cp = ord(char)
    return (
        0x1F600 <= cp <= 0x1F64F
        or 0x1F300 <= cp <= 0x1F5FF
        or 0x1F680 <= cp <= 0x1F6FF
        or 0x1F900 <= cp <= 0x1F9FF
        or 0x1FA00 <= cp <= 0x1FAFF
        or 0x1F1E0 <= cp <= 0x1F1FF
    )


def no_emoji_score(text: str) -> float:
    """CLaaS's NoEmojiVerifier: 1 when no character is an emoji by `is_emoji_char`."""
    return 0.0 if any(is_emoji_char(c) for c in text) else 1.0


def no_emoji_unicode_score(text: str) -> float:
    """Verifier `no_emoji_unicode`: the `emoji` package's list of Unicode emoji (sequences,
    keycaps, ‼ included; ° © ★ ♥-as-text not all). Not CLaaS's definition: opt in by name."""
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
    "no_emoji_unicode": no_emoji_unicode_score,
    "concise": concise_score,
    "identity": identity_score,
}
# CLaaS `verifier._target_` → the built-in that measures the same thing. The modules are where
# CLaaS's source defines these classes (claas/eval/metrics/verifiers.py; claas/eval/verifiers.py
# before that); a bare class name is accepted as well. Nothing of CLaaS is imported.
CLAAS_MODULES = ("claas.eval.metrics.verifiers", "claas.eval.verifiers")
CLAAS_CLASSES = {"NoEmojiVerifier": "no_emoji", "ConciseVerifier": "concise", "IdentityVerifier": "identity"}
_CUSTOM_SPEC = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_.]*")
_CUSTOM_HINT = ("custom verifier code is named in the config file only, as an inline preference's "
                "verifier 'module:Class', with allow_custom_verifiers: true on the suite")


def builtin_verifier(spec: str) -> Verifier | None:
    """The built-in for a built-in name or a CLaaS class (bare or under CLaaS's modules), else None."""
    if spec in BUILTIN_VERIFIERS:
        return BUILTIN_VERIFIERS[spec]
    module, _, cls = spec.rpartition(".")
    if cls in CLAAS_CLASSES and module in ("", *CLAAS_MODULES):
        return BUILTIN_VERIFIERS[CLAAS_CLASSES[cls]]
    return None


def check_verifier_spec(spec: str) -> None:
    """ValueError unless `spec` is a built-in, a CLaaS class, or of the form `module:Class`."""
    if builtin_verifier(spec) is None and not _CUSTOM_SPEC.fullmatch(spec):
        raise ValueError(
            f"unknown verifier '{spec}': use {', '.join(BUILTIN_VERIFIERS)} or a CLaaS class "
            f"({', '.join(CLAAS_CLASSES)}); {_CUSTOM_HINT}"
        )


def import_verifier_class(spec: str) -> type:
    """Import `module:Class` and return the class, never instantiating it (what validation does)."""
    if not _CUSTOM_SPEC.fullmatch(spec):
        raise ValueError(f"custom verifier '{spec}' must be written 'module:Class'")
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"verifier '{spec}' cannot be imported: {exc}") from exc
    if not isinstance(obj, type):
        raise ValueError(f"verifier '{spec}' is not a class: give 'module:Class' (instantiated with no arguments)")
    return obj


def resolve_verifier(spec: str, *, allow_custom: bool = False) -> Verifier:
    """The callable for a built-in name or CLaaS class; with `allow_custom`, an instance of the
    `module:Class` it names (the only place a custom verifier is instantiated).

    Raises ValueError naming what is wrong, so config validation can report it.
    """
    builtin = builtin_verifier(spec)
    if builtin is not None:
        return builtin
    if not allow_custom:
        raise ValueError(f"verifier '{spec}' is not a built-in verifier or a CLaaS class; {_CUSTOM_HINT}")
    cls = import_verifier_class(spec)
    try:
        obj = cls()
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
    verifier: str = Field(
        description="no_emoji | concise | identity | a CLaaS class | module:Class (config only, see "
                    "allow_custom_verifiers)"
    )
    probe_prompts: list[str] = Field(default_factory=list)
    pairs: list[PairSpec] = Field(default_factory=list)
    feedback: str | None = Field(default=None, description="The feedback text (informational).")

    @field_validator("verifier")
    @classmethod
    def _known_form(cls, value: str) -> str:
        check_verifier_spec(value)  # never imports: whether custom code may run is the suite's call
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
    if builtin_verifier(target) is None:
        raise ValueError(f"verifier._target_: '{target}' is not a CLaaS class ({', '.join(CLAAS_CLASSES)}) "
                         f"or a built-in verifier; a data file cannot name code: {_CUSTOM_HINT}")
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
    verifier = data.get("verifier")
    if isinstance(verifier, str) and builtin_verifier(verifier) is None:
        raise ValueError(f"verifier: '{verifier}' is not a built-in verifier ({', '.join(BUILTIN_VERIFIERS)}) "
                         f"or a CLaaS class; a data file cannot name code: {_CUSTOM_HINT}")
    return name, PreferenceSpec.model_validate({k: v for k, v in data.items() if k != "name"})


CLAAS_SYSTEM_PROMPT = "You are a helpful assistant."


def probe_subset(prompts: list[str], limit: int | None) -> list[str]:
    """The probe prompts a preference is scored on: the first `limit` (CLaaS: 3), or all."""
    return list(prompts if limit is None else prompts[:limit])


class ComplianceConfig(SuiteConfigBase):
    type: Literal["compliance"] = "compliance"
    files: list[Path] = Field(
        default_factory=list, description="Preference YAML files (CLaaS or ours); built-in verifiers only."
    )
    allow_custom_verifiers: bool = Field(
        default=False, description="Let inline preferences name verifier code as 'module:Class' (run on model output)."
    )
    preferences: dict[str, PreferenceSpec] = Field(default_factory=dict, description="Inline: name → spec.")
    system_prompt: str | None = Field(
        default=CLAAS_SYSTEM_PROMPT,
        description="System turn for probes and pairs that lack one (CLaaS's default); null = none.",
    )
    probes_per_preference: int | None = Field(
        default=3, ge=1, description="Probe prompts scored per preference: CLaaS takes the first 3; null = all."
    )
    samples_per_prompt: int = Field(default=1, ge=1)
    temperature: float = Field(default=0.0, ge=0, description="CLaaS probes greedily (0).")
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens: int = Field(default=2048, ge=1, description="CLaaS's budget; lower it for short-context models.")
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

    @field_validator("preferences")
    @classmethod
    def _custom_verifiers(cls, value: dict[str, PreferenceSpec], info: ValidationInfo) -> dict[str, PreferenceSpec]:
        allowed = bool(info.data.get("allow_custom_verifiers"))
        errors = []
        for name, spec in value.items():
            if builtin_verifier(spec.verifier) is not None:
                continue
            try:
                if not allowed:
                    raise ValueError(f"'{spec.verifier}' is custom code: set allow_custom_verifiers: true "
                                     "on this suite to run it on model output")
                import_verifier_class(spec.verifier)  # imported, never instantiated here
            except ValueError as exc:
                errors.append(InitErrorDetails(type=PydanticCustomError("verifier", "{reason}", {"reason": str(exc)}),
                                               loc=(name, "verifier"), input=spec.verifier))
        if errors:  # raised as a ValidationError so each error keeps its own dotted path
            raise ValidationError.from_exception_data(cls.__name__, errors)
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
        allow = config.allow_custom_verifiers  # files hold built-ins only (checked when they load)
        self.verifiers = {n: resolve_verifier(p.verifier, allow_custom=allow) for n, p in self.prefs.items()}

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
        probes = [_Probe(n, p) for n, spec in self.prefs.items()
                  for p in probe_subset(spec.probe_prompts, cfg.probes_per_preference)]
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
