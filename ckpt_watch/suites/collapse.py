"""Collapse signals (CLaaS metrics): token entropy, self-ROUGE-L, log-prob drift, and an alert.

- entropy: one greedy answer per prompt with top-k log-probs per token; each position's
  top-k is renormalised to a distribution and its Shannon entropy (nats) taken; the
  metric is the mean over all generated tokens. A collapsing model grows certain of
  every token and the entropy falls.
- self_rouge_l: several stochastic answers per prompt; mean pairwise ROUGE-L F1 between
  them. A collapsing model says the same thing whatever the sampling: it tends to 1.
- logprob_mean / logprob_drift: mean log-prob of the greedy answers' own tokens, and its
  change from the base model (step 0): confidence moving far from the base is an early
  sign of a distribution shift.
- alert = 1.0 when any configured threshold is crossed, else 0.0.
"""

from __future__ import annotations

import functools
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

# Open-ended prompts with many good answers, so diversity is possible; written for this project.
BUILTIN_PROMPTS: tuple[str, ...] = (
    "Tell me something interesting about the ocean.",
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
    samples_per_prompt: int = Field(default=3, ge=2, description="Stochastic answers per prompt for self-ROUGE-L.")
    temperature: float = Field(default=0.7, gt=0, description="Sampling temperature of the self-ROUGE-L answers.")
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens: int = Field(default=128, ge=1)
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
        ps = list(BUILTIN_PROMPTS) if self.builtin_prompts else []
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


def mean_token_entropy(per_token: list[dict[int, float]]) -> float:
    values = [h for h in (renormalised_entropy(t) for t in per_token) if math.isfinite(h)]
    return sum(values) / len(values) if values else float("nan")


@functools.cache
def _rouge() -> tuple[Any, Any]:
    """(scorer, its tokenizer), built on first use: rouge_score pulls in nltk and scikit-learn,
    ~250 MiB the daemon should not carry unless a collapse suite actually runs."""
    from rouge_score import rouge_scorer, tokenizers

    # the scorer's own default tokenizer (lower-cased alphanumeric words), kept to test for "no words"
    tokenizer = tokenizers.DefaultTokenizer(use_stemmer=False)
    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=tokenizer), tokenizer


def rouge_l(a: str, b: str) -> float | None:
    """ROUGE-L F1; identical texts are 1 even when they hold no scorable words; two different
    texts with no words between them have no defined score (None)."""
    if a == b:
        return 1.0
    score = _rouge()[0].score(a, b)["rougeL"]
    if score.precision == 0 and score.recall == 0 and not (_has_tokens(a) or _has_tokens(b)):
        return None
    return float(score.fmeasure)


def _has_tokens(text: str) -> bool:
    return bool(_rouge()[1].tokenize(text))


def self_rouge_l(texts: list[str]) -> float | None:
    """Mean pairwise ROUGE-L F1 over all pairs of samples; None with fewer than two scorable pairs."""
    scores = [s for a, b in combinations(texts, 2) if (s := rouge_l(a, b)) is not None]
    return sum(scores) / len(scores) if scores else None


def mean_logprob(token_logprobs: list[list[float]]) -> float:
    flat = [lp for seq in token_logprobs for lp in seq]
    return sum(flat) / len(flat) if flat else float("nan")


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


def baseline_relative(metrics: dict[str, float], baseline: dict[str, float] | None, *, is_base: bool) -> None:
    """Add entropy_ratio and logprob_drift (relative to step 0) in place; NaN without a baseline."""
    if is_base:
        metrics["entropy_ratio"], metrics["logprob_drift"] = 1.0, 0.0
        return
    base_h = (baseline or {}).get("entropy", float("nan"))
    base_lp = (baseline or {}).get("logprob_mean", float("nan"))
    ok_h = math.isfinite(base_h) and base_h > 0
    metrics["entropy_ratio"] = metrics["entropy"] / base_h if ok_h else float("nan")
    metrics["logprob_drift"] = metrics["logprob_mean"] - base_lp if math.isfinite(base_lp) else float("nan")


@register_suite("collapse", CollapseConfig, "Collapse signals: token entropy, self-ROUGE-L, log-prob drift")
class CollapseSuite:
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
        msgs = [[{"role": "user", "content": p}] for p in prompts]
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
        n_unscored = 0
        for prompt, g, s in zip(prompts, greedy, sampled, strict=True):
            comp = g.completions[0]
            top.extend(comp.top_logprobs)
            lps.append(comp.token_logprobs)
            texts = [strip_thinking(c.text) for c in s.completions]
            rouge = self_rouge_l(texts)
            if rouge is None:
                n_unscored += 1
            else:
                rouges.append(rouge)
            samples.append(
                {
                    "prompt": prompt,
                    "greedy": comp.text,
                    "greedy_entropy": mean_token_entropy(comp.top_logprobs),
                    "greedy_logprob_mean": mean_logprob([comp.token_logprobs]),
                    "samples": [c.text for c in s.completions],
                    "self_rouge_l": rouge,
                }
            )
        metrics: dict[str, float] = {
            "entropy": mean_token_entropy(top),
            "self_rouge_l": sum(rouges) / len(rouges) if rouges else float("nan"),
            "logprob_mean": mean_logprob(lps),
        }
        base = ctx.baseline.metrics if ctx.baseline is not None else None
        baseline_relative(metrics, base, is_base=ctx.handle.is_base)
        crossed = alerts(metrics, self.thresholds)
        metrics["alert"] = 1.0 if crossed else 0.0
        return SuiteResult(
            suite=self.name,
            step=ctx.checkpoint.step,
            status=ResultStatus.OK,
            metrics=metrics,
            samples=samples,
            n_scored=len(rouges),
            n_unscored=n_unscored,
            started_at=started,
            finished_at=utcnow(),
            info={"alerts": crossed},
        )
