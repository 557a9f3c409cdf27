"""lm-evaluation-harness's model API on top of a ckpt-watch Engine.

`EngineLM` is a `TemplateLM`: lm-eval's own `_encode_pair` splits (context, continuation)
into token ids with the engine's tokenizer, `tok_encode` follows lm-eval's `hf` backend
(the tokenizer's default special tokens, no second BOS), so the scored token ids are the
ones lm-eval's `hf` backend scores. The requests go to `Engine.score` / `Engine.generate`
on the checkpoint's adapter handle: batching, concurrency, the managed vLLM server and its
retries stay the engine's.

lm-eval's evaluator is synchronous and runs in a worker thread; every engine call is sent
to the daemon's event loop (`run_coroutine_threadsafe`) and waited for there, so the
engine's HTTP client and locks stay on the loop they belong to.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ckpt_watch.core import AdapterHandle, Stopped
from ckpt_watch.engines.base import Engine, GenerateRequest, ScoreRequest
from ckpt_watch.suites.inflight import in_flight

T = TypeVar("T")
DEFAULT_MAX_LENGTH = 2048  # lm-eval's, for models whose config names no context length
MAX_GEN_TOKS = 256  # lm-eval hf's default max_gen_toks
TOKENIZER_INFINITY = 1_000_000


def model_max_length(tokenizer: Any) -> int:
    """The context length lm-eval's `hf` backend uses: the model config's, else the tokenizer's, else 2048."""
    from transformers import AutoConfig

    path = getattr(tokenizer, "name_or_path", "") or ""
    config = None
    try:
        config = AutoConfig.from_pretrained(path) if path else None
    except (OSError, ValueError):
        config = None
    for cfg in (getattr(config, "text_config", None), config):
        for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
            value = getattr(cfg, attr, None) if cfg is not None else None
            if isinstance(value, int) and value > 0:
                return value
    tok_len = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_len, int) and 0 < tok_len < TOKENIZER_INFINITY:
        return tok_len
    return DEFAULT_MAX_LENGTH


class EngineLM(TemplateLM):
    """lm-eval LM whose requests are answered by `engine` on `handle`'s weights."""

    def __init__(
        self,
        engine: Engine,
        handle: AdapterHandle,
        loop: asyncio.AbstractEventLoop,
        *,
        chunk: int = 256,
        max_length: int | None = None,
        progress: Callable[[int, int], None] | None = None,
    ):
        super().__init__()
        self.engine = engine
        self.handle = handle
        self.loop = loop
        self.chunk = chunk
        self.tokenizer = engine.tokenizer
        self._max_length = max_length or model_max_length(self.tokenizer)
        self._progress = progress
        self._stopped = threading.Event()
        self._inflight: concurrent.futures.Future | None = None
        self.done = 0
        self.total = 0

    # -- lm-eval's model properties -------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # lm-eval hf: BOS when the tokenizer has one, else EOS
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """lm-eval hf's tok_encode with add_bos_token unset: the tokenizer's default special
        tokens, none when the text already starts with the prefix token."""
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special = {"add_special_tokens": False}
        ids = self.tokenizer.encode(string, **special)
        left = kwargs.get("left_truncate_len")
        return ids[-left:] if left else ids

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    # -- the bridge to the engine's event loop --------------------------------------------

    def stop(self) -> None:
        """Called on the loop when the suite is cancelled: the worker thread raises Stopped."""
        self._stopped.set()
        if self._inflight is not None:
            self._inflight.cancel()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._stopped.is_set():
            coro.close()
            raise Stopped("lm_eval suite cancelled")
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        self._inflight = fut
        try:
            return fut.result()
        except concurrent.futures.CancelledError:
            raise Stopped("lm_eval suite cancelled") from None
        finally:
            self._inflight = None

    def _in_chunks(self, items: list[Any], send: Callable[[list[Any]], Coroutine[Any, Any, list[T]]]) -> list[T]:
        """All of lm-eval's requests of one kind handed to the engine at once (no barrier between
        parts); progress counted on the loop as parts finish."""
        first = self.done
        self.total += len(items)

        def advance(done: int, total: int) -> None:
            self.done = first + done
            if self._progress is not None:
                self._progress(self.done, self.total)

        return self._call(in_flight(items, send, advance, part=self.chunk))

    # -- requests -------------------------------------------------------------------------

    def _fit(self, context: list[int], continuation: list[int]) -> ScoreRequest:
        """lm-eval hf's left truncation: the last max_length + 1 tokens of context + continuation."""
        whole = (list(context) + list(continuation))[-(self.max_length + 1) :]
        cont = list(continuation)[-self.max_length :]
        return ScoreRequest(whole[: len(whole) - len(cont)], cont)

    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        reqs = [self._fit(ctx, cont) for _, ctx, cont in requests]
        results = self._in_chunks(reqs, lambda part: self.engine.score(self.handle, part))
        out = [(r.total, bool(r.greedy) and all(r.greedy)) for r in results]
        for (key, _, _), ans in zip(requests, out, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, ans)
        return out

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=True)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """lm-eval hf's rolling windows (max_length tokens, one token of context, the prefix
        token before the first), each window scored as one request, summed per text."""
        windows: list[tuple[None, list[int], list[int]]] = []
        counts = []
        for (string,) in [req.args for req in requests]:
            pairs = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1,
                )
            ]
            windows.extend((None, ctx, cont) for ctx, cont in pairs)
            counts.append(len(pairs))
        scores = self._loglikelihood_tokens(windows)
        out, at = [], 0
        for req, n in zip(requests, counts, strict=True):
            total = float(sum(s for s, _ in scores[at : at + n]))
            at += n
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return out

    def _generate_request(self, context: str, gen_kwargs: dict[str, Any]) -> tuple[GenerateRequest, list[str]]:
        kwargs = normalize_gen_kwargs(gen_kwargs, MAX_GEN_TOKS)
        eos = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
        max_gen = int(kwargs.pop("max_gen_toks"))
        sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature") or 0.0) > 0
        ids = self.tok_encode(context, left_truncate_len=self.max_length - max_gen)
        stops = [s for s in until if s and s != eos]  # the engine stops at EOS itself
        req = GenerateRequest(
            prompt_ids=ids,
            temperature=float(kwargs.get("temperature") or 0.0) if sample else 0.0,
            top_p=float(kwargs.get("top_p") or 1.0) if sample else 1.0,
            max_tokens=max_gen,
            seed=kwargs.get("seed"),
            stop=stops or None,
        )
        return req, until

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        built = [self._generate_request(ctx, dict(kw)) for ctx, kw in [req.args for req in requests]]
        results = self._in_chunks([r for r, _ in built], lambda part: self.engine.generate(self.handle, part))
        out = []
        for req, (_, until), res in zip(requests, built, results, strict=True):
            text = postprocess_generated_text(res.completions[0].text, until, None)
            out.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out
