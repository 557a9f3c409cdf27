"""vLLM engine: an OpenAI-compatible vLLM server, attached (`engine.url`) or managed (`engine.launch`).

Every checkpoint's adapter is hot-loaded through vLLM's runtime-LoRA routes under its own
name (reusing a name for new weights is buggy across vLLM versions) and unloaded after its
suites. Prompts travel as token ids rendered on the client with the base model's tokenizer,
so the chat template and the scored tokens are exactly those of the HF engine.

Failures reach the caller as `EngineError` with text a user can act on, or as
`EngineUnavailable` when the server is gone: the evaluator then calls `ensure_healthy()`
(which restarts a managed server and re-registers the loaded adapters) and retries.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import openai

from ckpt_watch.config import Config
from ckpt_watch.core import AdapterHandle, Checkpoint, CheckpointKind, EngineError, EngineUnavailable
from ckpt_watch.engines.base import (
    GenerateRequest,
    GenerateResult,
    ScoreRequest,
    ScoreResult,
    adapter_name,
    apply_chat_template,
    base_handle,
    gather_all,
)
from ckpt_watch.engines.vllm_protocol import (
    VLLMRequestError,
    check_adapter,
    load_error,
    parse_choice,
    read_adapter_config,
    top_k_by_id,
    vllm_extra,
)
from ckpt_watch.engines.vllm_server import ManagedServer, adapter_rank, round_lora_rank
from ckpt_watch.models import resolve_base_model
from ckpt_watch.redact import redact_url

log = logging.getLogger(__name__)
T = TypeVar("T")

CONNECT_TIMEOUT = 10.0  # a dead host should fail fast; generation itself may take request_timeout
# vLLM sampling parameters a request does not otherwise set, at their neutral values (what the
# HF engine uses too): top-k off, no min-p, no repetition penalty. Sent with every generation.
NEUTRAL_SAMPLING: dict[str, float | int] = {"top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


class VLLMEngine:
    name = "vllm"

    def __init__(
        self,
        config: Config,
        results_dir: Path | None = None,
        *,
        server: ManagedServer | None = None,
        adapter_hints: Sequence[Path] = (),
        log_name: str = "vllm-server.log",
    ):
        """`server`: an already built ManagedServer to use (and not stop on close); `adapter_hints`:
        adapters whose r sizes --max-lora-rank when this engine launches the server itself; `log_name`:
        that server's log in results_dir (its pidfile beside it)."""
        self.config = config
        self.econf = config.engine
        self.results_dir = Path(results_dir) if results_dir is not None else Path(config.results_dir)
        self._server = server
        self._owns_server = server is None
        self._adapter_hints = [Path(p) for p in adapter_hints]
        self._log_name = log_name
        self._client: openai.AsyncOpenAI | None = None
        self._tokenizer: Any = None
        self._base_path = ""
        self._model = ""  # the base model's id on the server
        self._adapters: dict[str, Path] = {}  # what we loaded, re-registered after a server restart
        self._eos_ids: set[int] = set()
        self._sem = asyncio.Semaphore(self.econf.max_concurrency)
        self._heal_lock = asyncio.Lock()
        self._load_lock = asyncio.Lock()
        self.status = "not started"

    # -- properties ---------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            raise EngineError("engine not started")
        return self._tokenizer

    @property
    def server(self) -> ManagedServer | None:
        return self._server

    @property
    def base_url(self) -> str:
        if self._server is not None:
            return self._server.base_url
        return str(self.econf.url).rstrip("/")

    @property
    def served_model(self) -> str:
        return self._model

    def loaded_adapters(self) -> dict[str, Path]:
        return dict(self._adapters)

    def forget(self, name: str) -> None:
        """Stop tracking an adapter without asking the server (it died, or the adapter moved to
        another server): a restart of this engine's server does not re-register it."""
        self._adapters.pop(name, None)

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        if self._client is not None:
            return
        self._base_path = resolve_base_model(self.config.base_model)
        if self._tokenizer is None:
            self._tokenizer = await asyncio.to_thread(_load_tokenizer, self._base_path)
            self._eos_ids = _eos_ids(self._tokenizer, Path(self._base_path))
        if self.econf.launch is not None:
            if self._server is None:
                log_path = self.results_dir / self._log_name
                self._server = ManagedServer.from_config(self.config, self._base_path, log_path, self._rank_hints())
            if not self._server.alive():
                self.status = f"starting vLLM server (log {self._server.log_path})"
                try:
                    await self._server.astart()  # cancellable: a stop request ends the start-up
                except asyncio.CancelledError:
                    self.status = "start-up cancelled"
                    raise
        self._client = self._make_client()
        try:
            self._model = await self._discover_model()
        except BaseException:
            await self._client.close()
            self._client = None
            raise
        self.status = f"ready: {redact_url(self.base_url)} serving {self._model}"
        log.info("vllm engine %s", self.status)

    def _rank_hints(self) -> list[Path]:
        hints = list(self._adapter_hints)
        if self.config.watch.dir is not None and Path(self.config.watch.dir).is_dir():
            # the trainer's existing checkpoints tell the r of the ones still to come
            hints += [p.parent for p in Path(self.config.watch.dir).glob("*/adapter_config.json")]
        if self.config.watch.root is not None and Path(self.config.watch.root).is_dir():
            hints += [p.parent for p in Path(self.config.watch.root).glob("*/*/adapter_config.json")]  # every run's
        return hints

    def _make_client(self) -> openai.AsyncOpenAI:
        if self._server is not None:
            key: str | None = self._server.api_key
        else:
            key = os.environ.get(self.econf.api_key_env) if self.econf.api_key_env else None
        return openai.AsyncOpenAI(
            base_url=self.base_url,
            api_key=key or "EMPTY",  # vLLM without --api-key accepts any key
            timeout=openai.Timeout(self.econf.request_timeout, connect=CONNECT_TIMEOUT),
            max_retries=self.econf.max_retries,
        )

    async def _discover_model(self) -> str:
        page = await self._request("list models", lambda: self._http().models.list())
        for m in page.data:
            if getattr(m, "parent", None) is None:  # LoRA cards name their parent model
                return str(m.id)
        raise EngineError(f"vLLM server at {redact_url(self.base_url)} lists no base model")

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._owns_server and self._server is not None:
            await asyncio.to_thread(self._server.stop)
        self.status = "closed"

    async def ensure_healthy(self) -> None:
        """Make the engine usable again after `EngineUnavailable`: restart a managed server that
        died (with backoff, up to launch.max_restarts) and reload our adapters; in attach mode,
        check the server answers (the client's retries) or raise `EngineUnavailable`."""
        async with self._heal_lock:
            if self._server is not None and self.econf.launch is not None:
                if self._server.alive() and await asyncio.to_thread(self._server.health, 5.0):
                    if self._client is None:
                        await self.start()
                    return
                self.status = "restarting vLLM server"
                await self._server.restart()
                if self._client is not None:
                    await self._client.close()
                    self._client = None
                await self.start()
                for name, path in list(self._adapters.items()):
                    await self._load_route(name, path)
                log.info("vLLM server restarted; re-registered %d adapter(s)", len(self._adapters))
                return
            if self._client is None:
                await self.start()
                return
            root = self.base_url.removesuffix("/v1")
            await self._request("health check", lambda: self._http().get(f"{root}/health", cast_to=str))
            self.status = f"ready: {redact_url(self.base_url)} serving {self._model}"

    async def restart(self) -> None:
        """The daemon's recovery hook after `EngineUnavailable`."""
        await self.ensure_healthy()

    # -- transport ----------------------------------------------------------------------

    def _http(self) -> openai.AsyncOpenAI:
        if self._client is None:
            raise EngineError("engine not started")
        return self._client

    async def _request(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """One HTTP call under the concurrency bound; errors translated at this edge."""
        async with self._sem:
            try:
                return await call()
            except openai.APIConnectionError as exc:  # includes timeouts, after the client's retries
                raise self._unavailable(what, exc) from exc
            except openai.APIStatusError as exc:
                if exc.status_code >= 500 and not await self._managed_server_ok():
                    raise self._unavailable(what, exc) from exc
                body = exc.body if isinstance(exc.body, dict) else {}
                message = str(body.get("message") or body.get("detail") or exc.message)
                raise VLLMRequestError(what, exc.status_code, message, body.get("type")) from exc

    async def answers(self, timeout: float = 5.0) -> bool:
        """Whether the server answers its health check now (one try, outside the request bound)."""
        if self._server is not None:
            return self._server.alive() and await asyncio.to_thread(self._server.health, timeout)
        if self._client is None:
            return False
        root = self.base_url.removesuffix("/v1")
        client = self._client.with_options(max_retries=0, timeout=timeout)
        try:
            await client.get(f"{root}/health", cast_to=str)
        except (openai.APIError, OSError):
            return False
        return True

    async def _managed_server_ok(self) -> bool:
        # a 5xx from a dying server (vLLM's engine core crashed) is an outage, not a bad request
        if self._server is None:
            return True
        return self._server.alive() and await asyncio.to_thread(self._server.health, 5.0)

    def _unavailable(self, what: str, exc: Exception) -> EngineUnavailable:
        if self._server is not None and not self._server.alive():
            err = self._server.died_error()
        else:
            err = EngineUnavailable(
                f"vLLM server at {redact_url(self.base_url)} unreachable during {what} "
                f"(after {self.econf.max_retries} retries): {exc}"
            )
        self.status = f"unavailable: {str(err).splitlines()[0]}"
        log.warning("vllm engine %s", self.status)
        return err

    # -- adapters -----------------------------------------------------------------------

    async def load(self, checkpoint: Checkpoint) -> AdapterHandle:
        await self.start()
        if (base := base_handle(checkpoint)) is not None:
            return base
        async with self._load_lock:  # checkpoints loaded together: one rank check / server regrowth at a time
            return await self._load_adapter(checkpoint, Path(checkpoint.adapter_dir))

    async def prepare(self, checkpoints: Sequence[Checkpoint]) -> None:
        """Before several checkpoints are loaded together: grow a guessed --max-lora-rank once, for
        the largest of them, so that no load restarts the server under another one's suites."""
        await self.start()
        server = self._server
        if server is None or self.econf.launch is None or self.econf.launch.max_lora_rank is not None:
            return
        ranks = []
        for c in checkpoints:
            if c.kind is CheckpointKind.BASE or c.adapter_dir is None:
                continue
            try:
                ranks.append(round_lora_rank(adapter_rank(Path(c.adapter_dir))))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # a broken adapter_config.json: its own load fails and records why
        async with self._load_lock:
            if ranks and max(ranks) > server.max_lora_rank:
                await self._grow_lora_rank(max(ranks))

    async def _load_adapter(self, checkpoint: Checkpoint, adapter_dir: Path) -> AdapterHandle:
        name = adapter_name(checkpoint)
        path = adapter_dir.resolve()
        if self._adapters.get(name) == path:
            return AdapterHandle(checkpoint, name)  # already registered (e.g. re-registered after a restart)
        server = self._server
        if server is not None and self.econf.launch is not None and self.econf.launch.max_lora_rank is None:
            needed = round_lora_rank(adapter_rank(path))
            if needed > server.max_lora_rank:
                await self._grow_lora_rank(needed)
        check_adapter(
            name,
            path,
            read_adapter_config(name, path),
            max_lora_rank=server.max_lora_rank if server else None,
            target_modules=server.target_modules if server else None,
            served=[self.config.base_model, self._base_path, self._model],
            on_base_mismatch=self.econf.on_base_mismatch,
        )
        await self._load_route(name, path)
        self._adapters[name] = path
        return AdapterHandle(checkpoint, name)

    async def _grow_lora_rank(self, rank: int) -> None:
        """The server was started before any adapter existed, so its rank was a guess; an
        adapter with a larger r restarts it once with room for it instead of failing every
        checkpoint of the run. An explicit launch.max_lora_rank is never overridden."""
        server = self._server
        assert server is not None
        async with self._heal_lock:
            log.warning("adapter rank needs --max-lora-rank %d (server has %d): restarting the vLLM server",
                        rank, server.max_lora_rank)
            server.max_lora_rank = rank
            await asyncio.to_thread(server.stop)
            if self._client is not None:
                await self._client.close()
                self._client = None
            await self.start()
            for name, p in list(self._adapters.items()):
                await self._load_route(name, p)

    async def _lora_post(self, route: str, name: str, body: dict[str, str]) -> None:
        # no client retries: a failed add_lora (HTTP 500) is deterministic, retrying only repeats it
        client = self._http().with_options(max_retries=0)
        await self._request(f"{route.strip('/')} {name}", lambda: client.post(route, body=body, cast_to=str))

    async def _load_route(self, name: str, path: Path) -> None:
        body = {"lora_name": name, "lora_path": str(path)}
        try:
            await self._lora_post("/load_lora_adapter", name, body)
        except VLLMRequestError as exc:
            if exc.status == 400 and "already been loaded" in exc.message:
                # left by an earlier session that crashed before unloading: replace it
                log.info("adapter %s already on the server (earlier session); reloading it", name)
                await self._lora_post("/unload_lora_adapter", name, {"lora_name": name})
                await self._lora_post("/load_lora_adapter", name, body)
                return
            raise load_error(name, path, exc) from exc

    async def unload(self, handle: AdapterHandle) -> None:
        if handle.name is None:
            return
        try:
            await self._lora_post("/unload_lora_adapter", handle.name, {"lora_name": handle.name})
        except VLLMRequestError as exc:
            if exc.status != 404 or exc.err_type != "NotFoundError":
                raise EngineError(f"adapter {handle.name} could not be unloaded: {exc}") from exc
            log.info("adapter %s was not on the server any more", handle.name)
        except EngineUnavailable:
            if self._server is None or self._server.alive():
                raise
            # a managed server that died took the adapter with it: nothing left to unload
            log.info("adapter %s went with the dead server", handle.name)
        self._adapters.pop(handle.name, None)

    def _model_for(self, handle: AdapterHandle) -> str:
        if handle.name is None:
            return self._model
        if handle.name not in self._adapters:
            raise EngineError(f"adapter {handle.name} is not loaded")
        return handle.name

    # -- requests -----------------------------------------------------------------------

    async def generate(self, handle: AdapterHandle, requests: list[GenerateRequest]) -> list[GenerateResult]:
        await self.start()
        model = self._model_for(handle)
        return await gather_all([self._generate_one(model, r) for r in requests])

    async def _generate_one(self, model: str, req: GenerateRequest) -> GenerateResult:
        if req.prompt_ids is not None:
            prompt = list(req.prompt_ids)
        elif req.messages is not None:
            prompt = apply_chat_template(self.tokenizer, req.messages)
        else:
            raise EngineError("generate request needs messages or prompt_ids")
        kwargs: dict[str, Any] = {
            "model": model,
            "prompt": prompt,
            "n": req.n,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "max_tokens": req.max_tokens,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            # token ids back, and alternatives keyed "token_id:N" instead of ambiguous strings; the
            # sampler's other knobs explicit, so no server default (a model's generation_config
            # under --generation-config auto) changes the distribution the suite asked for
            "extra_body": {"return_token_ids": True, "return_tokens_as_token_ids": True, **NEUTRAL_SAMPLING},
        }
        if req.seed is not None:
            kwargs["seed"] = req.seed
        if req.stop:
            kwargs["stop"] = list(req.stop)
        if req.top_logprobs > 0:
            kwargs["logprobs"] = req.top_logprobs
        resp = await self._request("generate", lambda: self._http().completions.create(**kwargs))
        comps = [parse_choice(c, req.top_logprobs, self._eos_ids) for c in sorted(resp.choices, key=lambda c: c.index)]
        return GenerateResult(comps)

    async def score(self, handle: AdapterHandle, requests: list[ScoreRequest]) -> list[ScoreResult]:
        await self.start()
        model = self._model_for(handle)
        return await gather_all([self._score_one(model, r) for r in requests])

    async def _score_one(self, model: str, req: ScoreRequest) -> ScoreResult:
        if not req.context_ids:
            raise EngineError("score request needs a non-empty context (the first token has no log-prob)")
        if not req.continuation_ids:
            return ScoreResult([], [])
        ctx, cont = list(req.context_ids), list(req.continuation_ids)
        # prompt_logprobs=0: the log-prob and rank of each prompt token itself, keyed by token id
        resp = await self._request(
            "score",
            lambda: self._http().completions.create(
                model=model, prompt=ctx + cont, max_tokens=1, temperature=0.0, extra_body={"prompt_logprobs": 0}
            ),
        )
        entries = (vllm_extra(resp.choices[0], "prompt_logprobs") or [])[len(ctx) :]
        if len(entries) != len(cont):
            raise EngineError(f"vLLM returned {len(entries)} prompt log-probs for {len(cont)} continuation tokens")
        lps, greedy = [], []
        for tid, entry in zip(cont, entries, strict=True):
            info = (entry or {}).get(str(tid))
            if info is None:
                raise EngineError(f"vLLM prompt log-probs lack token {tid}")
            lps.append(float(info["logprob"]))
            greedy.append(int(info.get("rank") or 0) == 1)
        return ScoreResult(lps, greedy)

    async def next_token_logprobs(
        self, handle: AdapterHandle, prompts: list[list[int]], k: int
    ) -> list[dict[int, float]]:
        await self.start()
        model = self._model_for(handle)
        return await gather_all([self._next_one(model, p, k) for p in prompts])

    async def _next_one(self, model: str, prompt: list[int], k: int) -> dict[int, float]:
        resp = await self._request(
            "next-token log-probs",
            lambda: self._http().completions.create(
                model=model,
                prompt=list(prompt),
                max_tokens=1,
                temperature=0.0,
                logprobs=k,
                extra_body={"return_tokens_as_token_ids": True},
            ),
        )
        lp = resp.choices[0].logprobs
        if lp is None or not lp.top_logprobs or lp.top_logprobs[0] is None:
            raise EngineError("vLLM returned no next-token log-probs")
        return top_k_by_id(lp.top_logprobs[0], k)


# -- helpers ------------------------------------------------------------------------------


def _load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _eos_ids(tok: Any, base_dir: Path) -> set[int]:
    ids = {tok.eos_token_id}
    gen_cfg = base_dir / "generation_config.json"
    if gen_cfg.is_file():
        eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos])
    ids.discard(None)
    return ids
