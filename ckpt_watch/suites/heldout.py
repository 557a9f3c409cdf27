"""Held-out loss: mean per-token negative log-likelihood of fixed texts (and perplexity).

The cheapest signal that an adapter changed the model, and a guard against overfitting.
Texts come from a built-in list (written for this project) or a file: plain text (one
text per blank-line-separated paragraph) or jsonl with a `text` field.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from ckpt_watch.core import ResultStatus, SuiteResult, utcnow
from ckpt_watch.engines.base import ScoreRequest
from ckpt_watch.suites.base import SuiteConfigBase, SuiteContext, register_suite

BUILTIN_TEXTS = [
    "The river carried small stones down from the hills, and every spring the village cleared its banks.",
    "To make bread, mix flour, water, salt and yeast, let the dough rise, shape it, and bake it until golden.",
    "A prime number has exactly two divisors: one and itself. Seven is prime; nine is not.",
    "The library opens at nine in the morning and closes at six, except on public holidays.",
    "When the wind changes direction before a storm, sailors reef their sails and head for harbour.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen inside green leaves.",
]


class HeldoutConfig(SuiteConfigBase):
    hashed_files: ClassVar[tuple[str, ...]] = ("path",)
    type: Literal["heldout_loss"] = "heldout_loss"
    path: Path | None = Field(default=None, description="Text file (paragraphs) or jsonl with 'text'.")
    max_texts: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> HeldoutConfig:
        if self.path is not None and not self.path.is_file():
            raise ValueError(f"path: data file {self.path} does not exist")
        return self


def load_texts(path: Path | None) -> list[str]:
    if path is None:
        return list(BUILTIN_TEXTS)
    raw = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(line)["text"] for line in raw.splitlines() if line.strip()]
    return [p.strip() for p in raw.split("\n\n") if p.strip()]


def score_request(tokenizer: Any, text: str) -> ScoreRequest:
    """Context = the first token (BOS when the tokenizer has one); every later token is scored."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        return ScoreRequest([bos], ids)
    return ScoreRequest(ids[:1], ids[1:])


def nll_metrics(token_logprobs: list[list[float]]) -> dict[str, float]:
    flat = [lp for row in token_logprobs for lp in row]
    nll = -sum(flat) / len(flat)
    return {"nll": nll, "ppl": math.exp(nll), "tokens": float(len(flat))}


@register_suite("heldout_loss", HeldoutConfig, "Mean token NLL / perplexity on fixed held-out texts")
class HeldoutSuite:
    headline = ("nll", "ppl")  # what `ckpt-watch status` shows (issue 14)

    def __init__(self, name: str, config: HeldoutConfig):
        self.name = name
        self.config = config

    async def run(self, ctx: SuiteContext) -> SuiteResult:
        started = utcnow()
        texts = load_texts(self.config.path)[: self.config.max_texts]
        if not texts:
            raise ValueError(f"{self.config.path}: no held-out texts (the file is empty or only blank lines)")
        reqs = [score_request(ctx.engine.tokenizer, t) for t in texts]
        scores = await ctx.engine.score(ctx.handle, reqs)
        ctx.progress(len(texts), len(texts))
        rows = [s.token_logprobs for s in scores]
        samples = [
            {"text": t[:80], "nll": -sum(r) / len(r), "tokens": len(r)} for t, r in zip(texts, rows, strict=True)
        ]
        return SuiteResult(suite=self.name, step=ctx.checkpoint.step, status=ResultStatus.OK,
                           metrics=nll_metrics(rows), samples=samples, n_scored=len(texts),
                           started_at=started, finished_at=utcnow())
