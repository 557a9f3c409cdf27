"""Collapse signals (CLaaS metrics): token entropy, self-ROUGE-L, log-prob drift, and an alert.

- entropy: one greedy answer per prompt with top-k log-probs per token; each position's
  top-k is renormalised to a distribution and its Shannon entropy (nats) taken; the
  metric is the mean over all generated tokens. A collapsing model grows certain of
  every token and the entropy falls.
- self_rouge_l: several stochastic answers per prompt; mean pairwise ROUGE-L F1 between
  them, on CLaaS's tokens (whitespace-split words, case and punctuation kept: its 0.85
  alert threshold is calibrated on them). A collapsing model says the same thing whatever
  the sampling: it tends to 1.
- logprob_mean / logprob_drift: mean log-prob of the greedy answers' own tokens, and its
  distance from the base model (step 0), |Δ| as CLaaS reports it (`drift: signed` keeps the
  sign): confidence moving far from the base is an early sign of a distribution shift.
- alert = 1.0 when any configured threshold is crossed, else 0.0.

Defaults follow CLaaS (claas/eval/metrics/collapse.py): its one probe prompt with its
default system prompt, a 2048-token budget, 3 samples at temperature 0.7, top-20 log-probs,
and its figures where data is missing (no tokens → 0.0, no baseline → ratio 1.0, drift 0.0);
`no_data: nan` reports NaN instead. docs/claas_parity.md lists every difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from ckpt_watch.core import ResultStatus, SuiteResult, utcnow
from ckpt_watch.engines.base import GenerateRequest
from ckpt_watch.suites.base import SuiteConfigBase, SuiteContext, register_suite
from ckpt_watch.suites.compliance import strip_thinking
from ckpt_watch.suites.leakage import check_text_file, hash_with_files, load_text_list

# CLaaS's COLLAPSE_PROBE, and its default system prompt (claas/core/config.py)
CLAAS_PROMPT = "Tell me something interesting about the ocean."
CLAAS_SYSTEM_PROMPT = "You are a helpful assistant."
# prompt_set: extended — CLaaS's prompt plus open-ended prompts with many good answers, so
# diversity is possible; written for this project.
BUILTIN_PROMPTS: tuple[str, ...] = (
    CLAAS_PROMPT,
    "Write a short story opening about a lost key.",
    "Describe your ideal city.",
    "Give me three ideas for a rainy afternoon.",
    "What would you ask a visitor from the distant future?",
    "Explain why people enjoy music.",
)


class CollapseConfig(SuiteConfigBase):
    type: Literal["collapse"] = "collapse"
    prompts_file: Path | None = Field(default=None, description="Extra prompts: YAML/JSON list or one per line.")
    builtin_prompts: bool = True
    prompt_set: Literal["claas", "extended"] = Field(
        default="claas", description="Built-in prompts: claas = CLaaS's one ocean prompt; extended = six."
    )
    system_prompt: str | None = Field(default=CLAAS_SYSTEM_PROMPT, description="System turn (CLaaS's default).")
    samples_per_prompt: int = Field(default=3, ge=2, description="Stochastic answers per prompt for self-ROUGE-L.")
    temperature: float = Field(default=0.7, gt=0, description="Sampling temperature of the self-ROUGE-L answers.")
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens: int = Field(default=2048, ge=1, description="Token budget per answer (CLaaS: 2048).")
    drift: Literal["abs", "signed"] = Field(
        default="abs", description="logprob_drift as |Δ| from the base (CLaaS) or signed Δ (+ = more confident)."
    )
    no_data: Literal["claas", "nan"] = Field(
        default="claas",
        description="No tokens / no baseline: claas = entropy 0.0, ratio 1.0, drift 0.0 (CLaaS); "
        "nan = NaN (not plotted, crosses no threshold).",
    )
    top_k: int = Field(default=20, ge=2, le=100, description="Top log-probs per token for the entropy.")
    seed: int = 0
    # thresholds; null switches one off
    entropy_ratio_min: float | None = Field(
        default=0.6, gt=0, description="Alert when entropy / base entropy falls below this."
    )
    entropy_min: float | None = Field(default=None, ge=0, description="Alert when entropy (nats) falls below this.")
    self_rouge_max: float | None = Field(default=0.85, ge=0, le=1, description="Alert above this self-ROUGE-L.")
    drift_max: float | None = Field(default=2.0, gt=0, description="Alert when |logprob_drift| (nats) exceeds this.")

    @field_validator("prompts_file")
    @classmethod
    def _prompts_file(cls, value: Path | None) -> Path | None:
        return check_text_file(value)

    def max_logprobs(self) -> int:
        return self.top_k

    def config_hash(self) -> str:
        return hash_with_files(super().config_hash(), [self.prompts_file])

    def prompts(self) -> list[str]:
        ps = []
        if self.builtin_prompts:
            ps = list(BUILTIN_PROMPTS) if self.prompt_set == "extended" else [CLAAS_PROMPT]
        if self.prompts_file is not None:
            ps.extend(load_text_list(self.prompts_file))
        if not ps:
            raise ValueError("no prompts: builtin_prompts is false and no prompts_file")
        return ps


# -- pure functions -------------------------------------------------------------------------


def renormalised_entropy(top_logprobs: dict[int, float] | list[float]) -> float:
    """Shannon entropy (nats) of a top-k list renormalised to sum to 1.

    The tail beyond k is unknown, so this is the entropy of the model restricted to its k
    most likely tokens: a lower bound in spirit, exact when the tail is negligible.
    """
    lps = list(top_logprobs.values()) if isinstance(top_logprobs, dict) else list(top_logprobs)
    if not lps:
        return float("nan")
    top = max(lps)
    weights = [math.exp(lp - top) for lp in lps]  # shifted: no underflow for very negative log-probs
    total = sum(weights)
    return -sum((w / total) * math.log(w / total) for w in weights if w > 0)


def mean_token_entropy(per_token: list[dict[int, float]], empty: float = float("nan")) -> float:
    """Mean renormalised entropy over positions that have top-k log-probs; `empty` when none do
    (CLaaS: 0.0)."""
    values = [h for h in (renormalised_entropy(t) for t in per_token) if math.isfinite(h)]
    return sum(values) / len(values) if values else empty


def _lcs_length(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        curr = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            curr[j] = prev[j - 1] + 1 if x == y else max(prev[j], curr[j - 1])
        prev = curr
    return prev[-1]


def rouge_l(a: str, b: str) -> float:
    """CLaaS's `rouge_l_score`: ROUGE-L F1 over `str.split()` words, case and punctuation kept
    ("Ocean." ≠ "ocean"), any script; 0.0 when either text has no words (even two empty ones)."""
    words_a, words_b = a.split(), b.split()
    if not words_a or not words_b:
        return 0.0
    lcs = _lcs_length(words_a, words_b)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(words_b), lcs / len(words_a)
    return 2 * precision * recall / (precision + recall)


def self_rouge_l(texts: list[str]) -> float:
    """Mean ROUGE-L over all pairs of samples; 0.0 with fewer than two samples (CLaaS)."""
    scores = [rouge_l(a, b) for a, b in combinations(texts, 2)]
    return sum(scores) / len(scores) if scores else 0.0


def mean_logprob(token_logprobs: list[list[float]], empty: float = float("nan")) -> float:
    flat = [lp for seq in token_logprobs for lp in seq]
    return sum(flat) / len(flat) if flat else empty


@dataclass(frozen=True)
class Thresholds:
    entropy_ratio_min: float | None
    entropy_min: float | None
    self_rouge_max: float | None
    drift_max: float | None


def alerts(metrics: dict[str, float], t: Thresholds) -> list[str]:
    """Names of the thresholds crossed; a NaN metric (no baseline yet) crosses nothing."""
    out = []

    def crossed(key: str, limit: float | None, below: bool) -> bool:
        v = metrics.get(key, float("nan"))
        if limit is None or not math.isfinite(v):
            return False
        return v < limit if below else v > limit

    if crossed("entropy_ratio", t.entropy_ratio_min, below=True):
        out.append("entropy_ratio")
    if crossed("entropy", t.entropy_min, below=True):
        out.append("entropy")
    if crossed("self_rouge_l", t.self_rouge_max, below=False):
        out.append("self_rouge_l")
    drift = metrics.get("logprob_drift", float("nan"))
    if t.drift_max is not None and math.isfinite(drift) and abs(drift) > t.drift_max:
        out.append("logprob_drift")
    return out


def baseline_relative(metrics: dict[str, float], baseline: dict[str, float] | None, *, is_base: bool,
                      drift: str = "abs", no_data: str = "claas") -> None:
    """Add entropy_ratio and logprob_drift (relative to step 0) in place.

    CLaaS (`no_data: claas`): the ratio is 1.0 when the base entropy is missing or 0, the
    drift 0.0 without a base; `nan` reports NaN for both instead."""
    missing = float("nan") if no_data == "nan" else None
    if is_base:
        metrics["entropy_ratio"], metrics["logprob_drift"] = 1.0, 0.0
        return
    base_h = (baseline or {}).get("entropy", float("nan"))
    base_lp = (baseline or {}).get("logprob_mean", float("nan"))
    ok_h = math.isfinite(base_h) and base_h > 0
    if ok_h:
        metrics["entropy_ratio"] = metrics["entropy"] / base_h
    else:
        metrics["entropy_ratio"] = 1.0 if missing is None else missing
    if math.isfinite(base_lp):
        delta = metrics["logprob_mean"] - base_lp
        metrics["logprob_drift"] = abs(delta) if drift == "abs" else delta
    else:
        metrics["logprob_drift"] = 0.0 if missing is None else missing


@register_suite("collapse", CollapseConfig, "Collapse signals: token entropy, self-ROUGE-L, log-prob drift")
class CollapseSuite:
    headline = ("entropy_ratio", "self_rouge_l", "alert")  # what `ckpt-watch status` shows (issue 14)

    def __init__(self, name: str, config: CollapseConfig):
        self.name = name
        self.config = config
        self.thresholds = Thresholds(
            config.entropy_ratio_min, config.entropy_min, config.self_rouge_max, config.drift_max
        )

    async def run(self, ctx: SuiteContext) -> SuiteResult:
        started = utcnow()
        cfg = self.config
        prompts = cfg.prompts()
        system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt is not None else []
        msgs = [[*system, {"role": "user", "content": p}] for p in prompts]
        greedy_reqs = [
            GenerateRequest(messages=m, n=1, temperature=0.0, max_tokens=cfg.max_tokens, top_logprobs=cfg.top_k)
            for m in msgs
        ]
        sample_reqs = [
            GenerateRequest(
                messages=m, n=cfg.samples_per_prompt, temperature=cfg.temperature, top_p=cfg.top_p,
                max_tokens=cfg.max_tokens, seed=cfg.seed * 100_003 + i,
            )
            for i, m in enumerate(msgs)
        ]
        greedy = await ctx.engine.generate(ctx.handle, greedy_reqs)
        ctx.progress(1, 2)
        sampled = await ctx.engine.generate(ctx.handle, sample_reqs)
        ctx.progress(2, 2)

        top: list[dict[int, float]] = []
        lps: list[list[float]] = []
        samples: list[dict[str, Any]] = []
        rouges: list[float] = []
        empty = float("nan") if cfg.no_data == "nan" else 0.0
        for prompt, g, s in zip(prompts, greedy, sampled, strict=True):
            comp = g.completions[0]
            top.extend(comp.top_logprobs)
            lps.append(comp.token_logprobs)
            texts = [strip_thinking(c.text) for c in s.completions]
            rouge = self_rouge_l(texts)
            rouges.append(rouge)
            samples.append(
                {
                    "prompt": prompt,
                    "greedy": comp.text,
                    "greedy_entropy": mean_token_entropy(comp.top_logprobs, empty),
                    "greedy_logprob_mean": mean_logprob([comp.token_logprobs], empty),
                    "samples": [c.text for c in s.completions],
                    "self_rouge_l": rouge,
                }
            )
        metrics: dict[str, float] = {
            "entropy": mean_token_entropy(top, empty),
            "self_rouge_l": sum(rouges) / len(rouges) if rouges else empty,
            "logprob_mean": mean_logprob(lps, empty),
        }
        base = ctx.baseline.metrics if ctx.baseline is not None else None
        baseline_relative(metrics, base, is_base=ctx.handle.is_base, drift=cfg.drift, no_data=cfg.no_data)
        crossed = alerts(metrics, self.thresholds)
        metrics["alert"] = 1.0 if crossed else 0.0
        return SuiteResult(
            suite=self.name,
            step=ctx.checkpoint.step,
            status=ResultStatus.OK,
            metrics=metrics,
            samples=samples,
            n_scored=len(rouges),
            started_at=started,
            finished_at=utcnow(),
            info={"alerts": crossed},
        )
