"""ARC-Challenge, scored two ways.

- `loglik`: lm-evaluation-harness `arc_challenge`: context "Question: {q}\\nAnswer:",
  continuation " " + choice; acc = argmax of summed log-prob, acc_norm = argmax of
  log-prob / len(choice text in characters), as lm-eval computes it.
- `letter`: the seed's chat-templated multiple-choice prompt ending in
  "The correct answer is (", prediction = argmax of the next-token log-prob over the
  row's own labels (A–E or 1–4).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from ckpt_watch.core import ResultStatus, SuiteResult, utcnow
from ckpt_watch.engines.base import ScoreRequest, apply_chat_template
from ckpt_watch.suites.base import SuiteContext, register_suite
from ckpt_watch.suites.inflight import in_flight
from ckpt_watch.suites.personas import PersonaSuiteConfig, Selection, source_vs_others

HF_DATASET = ("allenai/ai2_arc", "ARC-Challenge", "test")
LETTER_SUFFIX = "The correct answer is ("


class ArcConfig(PersonaSuiteConfig):
    hashed_files: ClassVar[tuple[str, ...]] = ("path",)
    type: Literal["arc_challenge"] = "arc_challenge"
    scoring: Literal["loglik", "letter"] = "loglik"
    n: int | None = Field(default=200, ge=1, description="Questions per evaluation; null = all 1,172.")
    seed: int = 0
    path: Path | None = Field(default=None, description="Local jsonl/parquet in the HF row format.")
    personas: Selection = Field(
        default="none",
        description="letter scoring: all | [names] of the top-level personas, or a mapping name → system "
                    "prompt; one accuracy each (acc/<persona>, acc/source, acc/other_mean, acc/other_min).",
    )

    @model_validator(mode="after")
    def _check(self) -> ArcConfig:
        if self.path is not None and not self.path.is_file():
            raise ValueError(f"path: data file {self.path} does not exist")
        return self

    def check_personas(self, prompts: dict[str, str]) -> None:
        if prompts and self.scoring != "letter":
            raise ValueError("personas need scoring 'letter' (loglik prompts have no system turn)")

    def persona_hash_fields(self) -> dict[str, Any]:
        # the payload shape from before top-level personas (`personas: {}` always), so old hashes hold
        source = self.source_persona()
        return {"personas": self.persona_prompts(), **({"source": source} if source else {})}


@dataclass(frozen=True)
class ArcRow:
    id: str
    question: str
    texts: tuple[str, ...]
    labels: tuple[str, ...]
    answer: int  # index into texts/labels


def parse_row(raw: dict[str, Any]) -> ArcRow:
    texts = tuple(raw["choices"]["text"])
    labels = tuple(str(label) for label in raw["choices"]["label"])
    if len(texts) != len(labels) or len(texts) < 2:
        raise ValueError(f"{raw.get('id')}: malformed choices")
    return ArcRow(str(raw["id"]), raw["question"], texts, labels, labels.index(str(raw["answerKey"])))


def load_rows(path: Path | None) -> list[ArcRow]:
    if path is not None:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            raw_rows = pq.read_table(path).to_pylist()
        else:
            raw_rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [parse_row(r) for r in raw_rows]
    try:
        import datasets

        ds = datasets.load_dataset(HF_DATASET[0], HF_DATASET[1], split=HF_DATASET[2])
    except Exception as exc:  # offline hubs raise many types; the message is what matters
        raise RuntimeError(
            f"could not load {'/'.join(HF_DATASET)} from the datasets hub ({type(exc).__name__}: {exc}); "
            "set the suite's 'path' option to a local ARC-Challenge jsonl/parquet"
        ) from exc
    return [parse_row(r) for r in ds]


def subsample(rows: list[ArcRow], n: int | None, seed: int) -> list[ArcRow]:
    if n is None or n >= len(rows):
        return rows
    idx = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in idx]


# -- loglik (lm-eval arc_challenge) ---------------------------------------------------------


def loglik_context(row: ArcRow) -> str:
    return f"Question: {row.question}\nAnswer:"


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's HFLM._encode_pair: trailing context spaces move to the continuation, and the
    continuation's tokens are those of the whole string past the context's tokens.

    Both strings are encoded with the tokenizer's default special tokens, as lm-eval's
    `tok_encode` does when `add_bos_token` is unset: tokenizers that prepend BOS (Llama,
    Gemma) score the context after BOS there too, and parity needs the same ids.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx) :]


def loglik_requests(tokenizer: Any, row: ArcRow) -> list[ScoreRequest]:
    ctx = loglik_context(row)
    reqs = []
    for text in row.texts:
        c, cont = encode_pair(tokenizer, ctx, " " + text)
        reqs.append(ScoreRequest(c, cont))
    return reqs


def argmax(values: list[float]) -> int:
    # first maximum, as numpy.argmax picks it
    return max(range(len(values)), key=lambda i: (values[i], -i))


def loglik_predict(row: ArcRow, logprobs: list[float]) -> tuple[int, int]:
    """(acc prediction, acc_norm prediction); acc_norm divides by len(choice) in characters."""
    norm = [lp / len(text) for lp, text in zip(logprobs, row.texts, strict=True)]
    return argmax(logprobs), argmax(norm)


# -- letter (the seed's chat prompt) --------------------------------------------------------


def letter_messages(row: ArcRow, system: str | None = None) -> list[dict[str, str]]:
    options = "\n".join(f"({label}) {text}" for label, text in zip(row.labels, row.texts, strict=True))
    user = f"{row.question}\n\n{options}\n\nAnswer with the label of the correct option ({', '.join(row.labels)})."
    msgs = [{"role": "system", "content": system}] if system else []
    return [*msgs, {"role": "user", "content": user}]


def letter_prompt_ids(tokenizer: Any, row: ArcRow, system: str | None = None) -> list[int]:
    ids = apply_chat_template(tokenizer, letter_messages(row, system))
    return ids + tokenizer.encode(LETTER_SUFFIX, add_special_tokens=False)


def label_token_ids(tokenizer: Any, labels: tuple[str, ...]) -> list[list[int]]:
    """Tokens of each label as it would follow '(' — scored in full, so a label never falls
    outside a top-k list."""
    return [tokenizer.encode(label, add_special_tokens=False) for label in labels]


# -- metrics ----------------------------------------------------------------------------------


def mean_stderr(values: list[float]) -> float:
    """lm-eval's mean_stderr: sample standard deviation / sqrt(n)."""
    n = len(values)
    if n < 2:
        return float("nan")
    mu = sum(values) / n
    var = sum((v - mu) ** 2 for v in values) / (n - 1)
    return math.sqrt(var / n)


def accuracy_metrics(prefix: str, correct: list[float]) -> dict[str, float]:
    return {prefix: sum(correct) / len(correct), f"{prefix}_stderr": mean_stderr(correct)}


@register_suite("arc_challenge", ArcConfig, "ARC-Challenge accuracy (lm-eval loglik or chat letter scoring)")
class ArcSuite:
    headline = ("acc", "acc_norm")  # what `ckpt-watch status` shows (issue 14)

    def __init__(self, name: str, config: ArcConfig):
        self.name = name
        self.config = config
        self._rows: list[ArcRow] | None = None

    def rows(self) -> list[ArcRow]:
        if self._rows is None:
            self._rows = subsample(load_rows(self.config.path), self.config.n, self.config.seed)
        return self._rows

    async def run(self, ctx: SuiteContext) -> SuiteResult:
        started = utcnow()
        rows = self.rows()
        if self.config.scoring == "loglik":
            metrics, samples = await self._run_loglik(ctx, rows)
        else:
            metrics, samples = await self._run_letter(ctx, rows)
        return SuiteResult(
            suite=self.name,
            step=ctx.checkpoint.step,
            status=ResultStatus.OK,
            metrics=metrics,
            samples=samples,
            n_scored=len(samples),
            started_at=started,
            finished_at=utcnow(),
        )

    async def _run_loglik(self, ctx: SuiteContext, rows: list[ArcRow]) -> tuple[dict, list]:
        tok = ctx.engine.tokenizer
        reqs, spans = [], []
        for row in rows:
            rr = loglik_requests(tok, row)
            spans.append((len(reqs), len(reqs) + len(rr)))
            reqs.extend(rr)
        scores = await _score_all(ctx, reqs)
        acc, acc_norm, samples = [], [], []
        for row, (a, b) in zip(rows, spans, strict=True):
            lps = [s.total for s in scores[a:b]]
            pred, pred_norm = loglik_predict(row, lps)
            acc.append(float(pred == row.answer))
            acc_norm.append(float(pred_norm == row.answer))
            samples.append(
                {
                    "id": row.id,
                    "answer": row.labels[row.answer],
                    "pred": row.labels[pred],
                    "pred_norm": row.labels[pred_norm],
                    "logprobs": lps,
                }
            )
        metrics = {**accuracy_metrics("acc", acc), **accuracy_metrics("acc_norm", acc_norm), "n": float(len(rows))}
        return metrics, samples

    async def _run_letter(self, ctx: SuiteContext, rows: list[ArcRow]) -> tuple[dict, list]:
        tok = ctx.engine.tokenizer
        own = self.config.persona_prompts()
        personas: dict[str | None, str | None] = dict(own.items()) if own else {None: None}
        reqs, spans, keys = [], [], []
        for persona, system in personas.items():
            for row in rows:
                prompt = letter_prompt_ids(tok, row, system)
                rr = [ScoreRequest(prompt, ids) for ids in label_token_ids(tok, row.labels)]
                spans.append((len(reqs), len(reqs) + len(rr)))
                keys.append((persona, row))
                reqs.extend(rr)
        scores = await _score_all(ctx, reqs)
        per_persona: dict[str | None, list[float]] = {p: [] for p in personas}
        samples = []
        for (persona, row), (a, b) in zip(keys, spans, strict=True):
            # first token of each label: "next-token log-prob over the labels"
            lps = [s.token_logprobs[0] for s in scores[a:b]]
            pred = argmax(lps)
            per_persona[persona].append(float(pred == row.answer))
            samples.append(
                {
                    "id": row.id,
                    "persona": persona,
                    "answer": row.labels[row.answer],
                    "pred": row.labels[pred],
                    "logprobs": lps,
                }
            )
        metrics: dict[str, float] = {}
        for persona, correct in per_persona.items():
            prefix = "acc" if persona is None else f"acc/{persona}"
            metrics.update(accuracy_metrics(prefix, correct))
        if own:
            all_correct = [c for v in per_persona.values() for c in v]
            metrics.update(accuracy_metrics("acc", all_correct))
            accs = {str(p): metrics[f"acc/{p}"] for p in per_persona}
            metrics.update(source_vs_others("acc", accs, self.config.source_persona(), worst="min"))
        metrics["n"] = float(len(rows))
        return metrics, samples


async def _score_all(ctx: SuiteContext, reqs: list[ScoreRequest]) -> list:
    return await in_flight(reqs, lambda part: ctx.engine.score(ctx.handle, part), ctx.progress, part=256)
