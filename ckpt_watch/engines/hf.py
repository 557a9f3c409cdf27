"""In-process engine: transformers + peft on CPU or one GPU.

The embedded default where no vLLM server exists. The base model is loaded once; each
checkpoint's adapter is added under its own name and deleted after its suites. Torch
work runs in a worker thread (one at a time) so the daemon's event loop stays free.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ckpt_watch.config import EngineConfig
from ckpt_watch.core import AdapterHandle, Checkpoint, EngineError
from ckpt_watch.engines.base import (
    Completion,
    GenerateRequest,
    GenerateResult,
    ScoreRequest,
    ScoreResult,
    adapter_name,
    apply_chat_template,
    base_handle,
)
from ckpt_watch.models import resolve_base_model

log = logging.getLogger(__name__)


class HFEngine:
    name = "hf"

    def __init__(self, base_model: str, config: EngineConfig):
        self.base_model = base_model
        self.config = config
        self._lock = threading.Lock()
        self._model: Any = None  # base model, or a PeftModel wrapping it while adapters exist
        self._tokenizer: Any = None
        self._adapters: set[str] = set()

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            raise EngineError("engine not started")
        return self._tokenizer

    async def start(self) -> None:
        if self._model is None:
            await asyncio.to_thread(self._load_base)

    def _load_base(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve_base_model(self.base_model)
        dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
            self.config.dtype
        ]
        if dtype == "auto" and self.config.device == "cpu":
            dtype = torch.float32  # bf16 matmuls on CPU are slow and lossy
        log.info("hf engine: loading %s on %s", path, self.config.device)
        tok = AutoTokenizer.from_pretrained(path)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        model.to(self.config.device)
        model.eval()
        self._tokenizer, self._model = tok, model

    async def close(self) -> None:
        self._model = None

    # -- adapters -------------------------------------------------------------------------

    async def load(self, checkpoint: Checkpoint) -> AdapterHandle:
        await self.start()
        if (base := base_handle(checkpoint)) is not None:
            return base
        name = adapter_name(checkpoint)
        await asyncio.to_thread(self._add_adapter, name, str(checkpoint.adapter_dir))
        return AdapterHandle(checkpoint, name)

    def _add_adapter(self, name: str, path: str) -> None:
        from peft import PeftModel

        with self._lock:
            if name in self._adapters:
                self._model.delete_adapter(name)
                self._adapters.discard(name)
            try:
                if isinstance(self._model, PeftModel):
                    self._model.load_adapter(path, adapter_name=name)
                else:
                    self._model = PeftModel.from_pretrained(self._model, path, adapter_name=name)
            except (ValueError, RuntimeError, KeyError, OSError) as exc:
                raise EngineError(f"adapter {name} could not be loaded: {exc}") from exc
            self._model.eval()
            self._adapters.add(name)

    async def unload(self, handle: AdapterHandle) -> None:
        if handle.name is None or handle.name not in self._adapters:
            return
        await asyncio.to_thread(self._remove_adapter, handle.name)

    def _remove_adapter(self, name: str) -> None:
        with self._lock:
            self._adapters.discard(name)
            if self._adapters:
                self._model.delete_adapter(name)
            else:
                # back to the plain base model: no LoRA layers left in the forward pass
                self._model = self._model.unload()

    @contextmanager
    def _active(self, handle: AdapterHandle) -> Iterator[Any]:
        """Hold the lock with the handle's weights active (adapter, or none for base)."""
        from peft import PeftModel

        with self._lock:
            model = self._model
            if handle.name is None:
                if isinstance(model, PeftModel):
                    with model.disable_adapter():
                        yield model
                else:
                    yield model
                return
            if handle.name not in self._adapters:
                raise EngineError(f"adapter {handle.name} is not loaded")
            model.set_adapter(handle.name)
            yield model

    # -- requests -------------------------------------------------------------------------

    async def generate(self, handle: AdapterHandle, requests: list[GenerateRequest]) -> list[GenerateResult]:
        results: list[GenerateResult] = []
        bs = self.config.batch_size
        for i in range(0, len(requests), bs):
            results.extend(await asyncio.to_thread(self._generate_batch, handle, requests[i : i + bs]))
        return results

    def _prompt_ids(self, req: GenerateRequest) -> list[int]:
        if req.prompt_ids is not None:
            return list(req.prompt_ids)
        if req.messages is None:
            raise EngineError("generate request needs messages or prompt_ids")
        return apply_chat_template(self._tokenizer, req.messages)

    def _generate_batch(self, handle: AdapterHandle, reqs: list[GenerateRequest]) -> list[GenerateResult]:
        # requests with different sampling settings cannot share one generate() call
        groups: dict[tuple, list[int]] = {}
        for idx, r in enumerate(reqs):
            key = (r.n, r.temperature, r.top_p, r.max_tokens, tuple(r.stop or ()), r.top_logprobs)
            groups.setdefault(key, []).append(idx)
        out: list[GenerateResult | None] = [None] * len(reqs)
        for idxs in groups.values():
            for idx, res in zip(idxs, self._generate_group(handle, [reqs[i] for i in idxs]), strict=True):
                out[idx] = res
        return [r for r in out if r is not None]

    def _generate_group(self, handle: AdapterHandle, reqs: list[GenerateRequest]) -> list[GenerateResult]:
        import torch

        tok = self._tokenizer
        r0 = reqs[0]
        prompts = [self._prompt_ids(r) for r in reqs]
        width = max(len(p) for p in prompts)
        pad = tok.pad_token_id
        # left padding: every prompt ends where generation starts
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        seeds = [r.seed for r in reqs if r.seed is not None]
        kwargs: dict[str, Any] = {"generation_config": generation_config(r0, pad)}
        if r0.stop:
            kwargs.update(stop_strings=list(r0.stop), tokenizer=tok)
        with self._active(handle) as model, torch.inference_mode():
            if seeds:  # under the lock: torch's seed is global, and other suites' batches run in other threads
                torch.manual_seed(hash(tuple(seeds)) & 0x7FFFFFFF)
            dev = self.config.device
            out = model.generate(input_ids=input_ids.to(dev), attention_mask=attention.to(dev), **kwargs)
        seqs = out.sequences[:, width:].cpu()
        logps = None
        if r0.top_logprobs > 0:
            # raw model distribution (before temperature/top-p), as vLLM reports it
            logps = torch.log_softmax(torch.stack(out.logits, dim=1).float(), dim=-1).cpu()
        results = []
        eos_ids = _eos_ids(tok, model)
        for i in range(len(reqs)):
            comps = []
            for j in range(r0.n):
                row = i * r0.n + j
                ids = seqs[row].tolist()
                finish = "length"
                for t, tid in enumerate(ids):
                    if tid in eos_ids:
                        ids, finish = ids[:t], "stop"
                        break
                text = tok.decode(ids, skip_special_tokens=True)
                if r0.stop:
                    cut = min((text.find(s) for s in r0.stop if s in text), default=-1)
                    if cut >= 0:
                        text, finish = text[:cut], "stop"
                comp = Completion(text=text, token_ids=ids, finish_reason=finish)
                if logps is not None:
                    lp = logps[row, : len(ids)]
                    comp.token_logprobs = [float(lp[t, tid]) for t, tid in enumerate(ids)]
                    top = torch.topk(lp, r0.top_logprobs, dim=-1)
                    comp.top_logprobs = [
                        dict(zip(top.indices[t].tolist(), top.values[t].tolist(), strict=True)) for t in range(len(ids))
                    ]
                comps.append(comp)
            results.append(GenerateResult(comps))
        return results

    async def score(self, handle: AdapterHandle, requests: list[ScoreRequest]) -> list[ScoreResult]:
        out: list[ScoreResult | None] = [None] * len(requests)
        # one-token continuations of a shared context (multiple-choice labels) need one forward
        # pass of the context, not one per label
        shared: dict[tuple[int, ...], list[int]] = {}
        for i, r in enumerate(requests):
            if len(r.continuation_ids) == 1:
                shared.setdefault(tuple(r.context_ids), []).append(i)
        shared = {ctx: idxs for ctx, idxs in shared.items() if len(idxs) > 1}
        bs = self.config.batch_size
        contexts = list(shared)
        for i in range(0, len(contexts), bs):
            chunk = contexts[i : i + bs]
            rows = await asyncio.to_thread(self._last_logprobs, handle, [list(c) for c in chunk])
            for ctx, row in zip(chunk, rows, strict=True):
                best = int(row.argmax())
                for j in shared[ctx]:
                    tok = requests[j].continuation_ids[0]
                    out[j] = ScoreResult(token_logprobs=[float(row[tok])], greedy=[tok == best])
        rest = [i for i in range(len(requests)) if out[i] is None]
        # longest first, so each batch pads little and memory peaks early
        rest.sort(key=lambda i: -len(requests[i].context_ids) - len(requests[i].continuation_ids))
        for i in range(0, len(rest), bs):
            idxs = rest[i : i + bs]
            batch = await asyncio.to_thread(self._score_batch, handle, [requests[j] for j in idxs])
            for j, res in zip(idxs, batch, strict=True):
                out[j] = res
        return [r for r in out if r is not None]

    def _score_batch(self, handle: AdapterHandle, reqs: list[ScoreRequest]) -> list[ScoreResult]:
        import torch

        seqs = [list(r.context_ids) + list(r.continuation_ids) for r in reqs]
        width = max(len(s) for s in seqs)
        pad = self._tokenizer.pad_token_id
        input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
        attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        with self._active(handle) as model, torch.inference_mode():
            dev = self.config.device
            logits = model(input_ids=input_ids.to(dev), attention_mask=attention.to(dev)).logits
            logps = torch.log_softmax(logits.float(), dim=-1).cpu()
        results = []
        for b, r in enumerate(reqs):
            start = len(r.context_ids)
            pos = torch.arange(start - 1, start - 1 + len(r.continuation_ids))
            targets = torch.tensor(r.continuation_ids)
            rows = logps[b, pos]
            results.append(
                ScoreResult(
                    token_logprobs=rows.gather(1, targets[:, None])[:, 0].tolist(),
                    greedy=(rows.argmax(-1) == targets).tolist(),
                )
            )
        return results

    async def next_token_logprobs(
        self, handle: AdapterHandle, prompts: list[list[int]], k: int
    ) -> list[dict[int, float]]:
        out: list[dict[int, float]] = []
        bs = self.config.batch_size
        for i in range(0, len(prompts), bs):
            out.extend(await asyncio.to_thread(self._next_batch, handle, prompts[i : i + bs], k))
        return out

    def _next_batch(self, handle: AdapterHandle, prompts: list[list[int]], k: int) -> list[dict[int, float]]:
        import torch

        top = torch.topk(self._last_logprobs(handle, prompts), k, dim=-1)
        return [dict(zip(top.indices[b].tolist(), top.values[b].tolist(), strict=True)) for b in range(len(prompts))]

    def _last_logprobs(self, handle: AdapterHandle, prompts: list[list[int]]) -> Any:
        """Log-softmax over the vocabulary at each prompt's last position ([batch, vocab])."""
        import torch

        width = max(len(p) for p in prompts)
        pad = self._tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
        with self._active(handle) as model, torch.inference_mode():
            dev = self.config.device
            logits = model(
                input_ids=input_ids.to(dev), attention_mask=attention.to(dev), position_ids=position_ids.to(dev)
            ).logits[:, -1]
            return torch.log_softmax(logits.float(), dim=-1).cpu()


# Every sampling knob transformers' generate() reads, at its neutral value: generate() fills only the
# fields a passed GenerationConfig leaves None from the model's generation_config.json, so a model
# that ships temperature / top_p / repetition_penalty defaults changes nothing here. The vLLM engine
# sends the same values (engines/vllm.py NEUTRAL_SAMPLING): both sample from one distribution.
NEUTRAL_GENERATION: dict[str, Any] = {
    "top_k": 0,
    "min_p": 0.0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "length_penalty": 1.0,
    "num_beams": 1,
}


def generation_config(req: GenerateRequest, pad_token_id: int) -> Any:
    """The GenerationConfig for a request: what it asks for, everything else neutral (greedy when
    temperature is 0; otherwise pure temperature + top-p sampling)."""
    from transformers import GenerationConfig

    sample = req.temperature > 0
    return GenerationConfig(
        **NEUTRAL_GENERATION,
        do_sample=sample,
        temperature=req.temperature if sample else 1.0,
        top_p=req.top_p if sample else 1.0,
        max_new_tokens=req.max_tokens,
        num_return_sequences=req.n,
        pad_token_id=pad_token_id,
        return_dict_in_generate=True,
        output_logits=req.top_logprobs > 0,
    )


def _eos_ids(tok: Any, model: Any) -> set[int]:
    ids = {tok.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(extra)
    ids.discard(None)
    return ids
