"""The Engine protocol: the only thing suites see of a model server.

Suites build prompts as chat messages or token ids and never know whether the model runs
in-process (hf) or behind a vLLM server. Every request method is async and takes a whole
batch, so an engine can keep its server's continuous batching full.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

from ckpt_watch.core import AdapterHandle, Checkpoint, CheckpointKind, EngineError

Message = dict[str, str]  # {"role": ..., "content": ...}
T = TypeVar("T")


@dataclass(frozen=True)
class GenerateRequest:
    """Sample `n` completions for a chat (`messages`) or a raw token prompt (`prompt_ids`).

    temperature (0 = greedy) and top_p are the only sampling knobs: every engine leaves the others
    neutral (no top-k, min-p or repetition penalty) and ignores the model's generation_config
    sampling defaults, so a suite's samples come from the same distribution on every engine."""

    messages: list[Message] | None = None
    prompt_ids: list[int] | None = None
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = None
    stop: list[str] | None = None
    # number of top alternatives to return per generated token (0 = none)
    top_logprobs: int = 0


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    # log-prob of each generated token; empty unless top_logprobs > 0 was asked
    token_logprobs: list[float] = field(default_factory=list)
    # per generated token: {token_id: logprob} of the top-k alternatives
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class GenerateResult:
    completions: list[Completion]


@dataclass(frozen=True)
class ScoreRequest:
    """Log-prob of each continuation token given the context, both as token ids."""

    context_ids: list[int]
    continuation_ids: list[int]


@dataclass
class ScoreResult:
    token_logprobs: list[float]
    # whether each continuation token was the argmax at its position (lm-eval's is_greedy)
    greedy: list[bool] = field(default_factory=list)

    @property
    def total(self) -> float:
        return float(sum(self.token_logprobs))


@runtime_checkable
class Engine(Protocol):
    """Load adapters and answer generate / score / next-token requests in batches."""

    name: str

    @property
    def tokenizer(self) -> Any:
        """The base model's tokenizer (transformers-compatible): chat template, encode, decode."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def load(self, checkpoint: Checkpoint) -> AdapterHandle:
        """Make the checkpoint's adapter addressable; the base checkpoint gives a base handle."""
        ...

    async def unload(self, handle: AdapterHandle) -> None: ...

    async def generate(self, handle: AdapterHandle, requests: list[GenerateRequest]) -> list[GenerateResult]: ...

    async def score(self, handle: AdapterHandle, requests: list[ScoreRequest]) -> list[ScoreResult]: ...

    async def next_token_logprobs(
        self, handle: AdapterHandle, prompts: list[list[int]], k: int
    ) -> list[dict[int, float]]:
        """Top-k log-probs of the token following each prompt (token ids)."""
        ...


def apply_chat_template(tokenizer: Any, messages: list[Message], *, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a chat, rendered with the base model's own template on the client side."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    # transformers 5 returns a BatchEncoding-like mapping for some tokenizers
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def adapter_name(checkpoint: Checkpoint) -> str:
    """A unique name per checkpoint: reusing one name for new weights is buggy in vLLM."""
    return f"{checkpoint.run}-step-{checkpoint.step}"


async def gather_all(coros: Sequence[Awaitable[T]]) -> list[T]:
    """All at once, results in order; one failure ends the batch: the siblings are cancelled (not
    left running) and the failure is raised."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def base_handle(checkpoint: Checkpoint) -> AdapterHandle | None:
    """The base model's handle for the base checkpoint; None for an adapter that has its snapshot
    (the engine loads it); EngineError for one that has none."""
    if checkpoint.kind is CheckpointKind.BASE:
        return AdapterHandle(checkpoint, None)
    if checkpoint.adapter_dir is None:
        raise EngineError(f"{checkpoint.label}: no adapter snapshot to load")
    return None
