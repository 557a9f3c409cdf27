"""Several vLLM servers as one engine: `engine.replicas` (attached) or `engine.launch.gpus` (managed).

Each replica is a whole VLLMEngine (attached to its URL, or managing its own server with its own
GPU, port, API key and log `vllm-server-<i>.log`), so adapter checks, LoRA-rank growth, restarts
and the no-orphan rules are theirs. This module only decides where things run:

- an adapter is loaded on one replica, the live one with the fewest adapters (then the fewest
  requests in flight), and every request for it goes there;
- base-model requests go, one by one, to the live replica with the fewest requests in flight;
- when a replica fails (EngineUnavailable from one of its requests) it is marked dead, its adapters
  are loaded on the other live replicas and its unanswered requests are sent again there, so the
  suite never sees the failure. A dead managed server is restarted in the background (the
  VLLMEngine's own ensure_healthy: backoff, launch.max_restarts), an attached one re-probed every
  REPROBE_SECONDS; it rejoins once it answers;
- only when no replica is live does EngineUnavailable reach the caller; the daemon's `restart()`
  then revives every dead replica at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ckpt_watch.config import Config
from ckpt_watch.core import AdapterHandle, Checkpoint, EngineError, EngineUnavailable
from ckpt_watch.engines.base import (
    GenerateRequest,
    GenerateResult,
    ScoreRequest,
    ScoreResult,
    adapter_name,
    base_handle,
    gather_all,
)
from ckpt_watch.engines.vllm import VLLMEngine
from ckpt_watch.redact import redact_url

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

REPROBE_SECONDS = 30.0  # a dead attached replica (or a managed one between restarts) is tried again this often


# -- where to run: a pure choice ----------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """What the choice looks at for one replica."""

    live: bool
    adapters: int
    in_flight: int


def choose_replica(loads: Sequence[Load], *, for_adapter: bool, start: int = 0) -> int | None:
    """The index of the replica to use, None when none is live. An adapter goes to the live replica
    with the fewest adapters, then the fewest requests in flight; a base-model request to the one
    with the fewest requests in flight, then the fewest adapters. Ties go to the first index from
    `start` on (callers rotate it to spread base-model requests)."""
    n = len(loads)
    live = [i for i in ((start + k) % n for k in range(n)) if loads[i].live]
    if not live:
        return None
    if for_adapter:
        return min(live, key=lambda i: (loads[i].adapters, loads[i].in_flight))
    return min(live, key=lambda i: (loads[i].in_flight, loads[i].adapters))


# -- one replica ----------------------------------------------------------------------------------


@dataclass
class Replica:
    index: int
    engine: VLLMEngine
    slots: asyncio.Semaphore
    live: bool = False
    in_flight: int = 0  # requests routed here and not answered yet (waiting for a slot included)
    answered: int = 0
    epoch: int = 0  # +1 each time it (re)joins: a failure seen under an older epoch is stale
    error: str | None = None  # why it is down
    given_up: bool = False  # a managed server past launch.max_restarts
    revive: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        econf = self.engine.econf
        if self.engine.server is not None:
            where = f"GPU {econf.launch.gpu}, " if econf.launch and econf.launch.gpu is not None else ""
            return f"replica {self.index} ({where}{redact_url(self.engine.base_url)})"
        if econf.url:
            return f"replica {self.index} ({redact_url(econf.url)})"
        return f"replica {self.index}"

    def managed(self) -> bool:
        return self.engine.econf.launch is not None


def replica_configs(config: Config) -> list[Config]:
    """One Config per server: engine.url set to one of engine.replicas, or engine.launch narrowed
    to one entry of launch.gpus (its GPU, port + i)."""
    econf = config.engine
    if econf.replicas:
        engines = [econf.model_copy(update={"url": url, "replicas": None}) for url in econf.replicas]
    elif econf.launch is not None:
        engines = [econf.model_copy(update={"launch": econf.launch.for_replica(i)})
                   for i in range(econf.launch.replica_count())]
    else:
        raise EngineError("engine.replicas or engine.launch.gpus is not set: nothing to spread over")
    return [config.model_copy(update={"engine": e}) for e in engines]


def build_replicas(config: Config, results_dir: Path | None = None) -> list[VLLMEngine]:
    return [VLLMEngine(c, results_dir, log_name=f"vllm-server-{i}.log") for i, c in enumerate(replica_configs(config))]


def make_vllm_engine(config: Config, results_dir: Path | None = None) -> VLLMEngine | ReplicaEngine:
    """A plain VLLMEngine for one server, a ReplicaEngine for several."""
    if config.engine.replica_count() > 1:
        return ReplicaEngine(config, results_dir)
    return VLLMEngine(config, results_dir=results_dir)


def _failures(replicas: Sequence[Replica], outcomes: Sequence[Any], what: str, level: int) -> list[Exception]:
    """The errors of replica calls gathered with return_exceptions (each recorded on its replica and
    logged); a cancellation among them is raised."""
    errors = []
    for r, out in zip(replicas, outcomes, strict=True):
        if isinstance(out, Exception):
            r.error = str(out)
            errors.append(out)
            log.log(level, "%s %s: %s", r.label, what, out)
        elif isinstance(out, BaseException):
            raise out
    return errors


class ReplicaEngine:
    """The Engine protocol over several VLLMEngines (see the module docstring)."""

    name = "vllm"

    def __init__(self, config: Config, results_dir: Path | None = None, *,
                 engines: Sequence[VLLMEngine] | None = None):
        """`engines`: the replicas, already built (tests); default one per engine.replicas URL or
        engine.launch.gpus entry."""
        self.config = config
        self.econf = config.engine
        built = list(engines) if engines is not None else build_replicas(config, results_dir)
        if len(built) < 2:
            raise EngineError(f"a replica engine needs two or more servers, got {len(built)}")
        self.replicas = [Replica(i, e, asyncio.Semaphore(e.econf.max_concurrency)) for i, e in enumerate(built)]
        self._placement: dict[str, Replica] = {}  # adapter name → the replica it is loaded on
        self._checkpoints: dict[str, Checkpoint] = {}  # to load it again elsewhere
        self._lock = asyncio.Lock()  # placement changes (fail-over moves, rejoins, unloads) one at a time
        self._start_lock = asyncio.Lock()
        self._started = False
        self._closed = False
        self._turn = 0
        self._model = ""

    # -- properties ---------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        """The base model's tokenizer (every replica loaded its own copy; any started one serves)."""
        for r in sorted(self.replicas, key=lambda r: not r.live):
            try:
                return r.engine.tokenizer
            except EngineError:
                continue  # never started
        raise EngineError("engine not started")

    @property
    def base_url(self) -> str:
        live = [r for r in self.replicas if r.live] or self.replicas
        return live[0].engine.base_url

    @property
    def served_model(self) -> str:
        return self._model

    @property
    def status(self) -> str:
        if self._closed:
            return "closed"
        if not self._started:
            return "not started"
        live = sum(r.live for r in self.replicas)
        parts = [f"{r.label}: " + ("live" if r.live else f"down ({(r.error or '?').splitlines()[0][:120]})")
                 for r in self.replicas]
        return f"{live}/{len(self.replicas)} vLLM replicas live serving {self._model}; " + "; ".join(parts)

    def loaded_adapters(self) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for r in self.replicas:
            out.update(r.engine.loaded_adapters())
        return out

    def replica_of(self, name: str) -> int | None:
        """The index of the replica adapter `name` is loaded on (None if not loaded)."""
        replica = self._placement.get(name)
        return replica.index if replica is not None else None

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        async with self._start_lock:
            if self._started:
                return
            outcomes = await asyncio.gather(*(r.engine.start() for r in self.replicas), return_exceptions=True)
            errors = _failures(self.replicas, outcomes, "did not start", logging.ERROR)
            for r, out in zip(self.replicas, outcomes, strict=True):
                r.live = out is None
            if not any(r.live for r in self.replicas):
                raise errors[0]
            self._model = self._same_model()
            self._started = True
        for r in self.replicas:
            if not r.live:
                self._schedule_revive(r)
        log.info("vllm replicas: %s", self.status)

    def _same_model(self) -> str:
        served = {r.engine.served_model for r in self.replicas if r.live}
        if len(served) > 1:
            shown = ", ".join(f"{r.label} serves {r.engine.served_model}" for r in self.replicas if r.live)
            raise EngineError(f"the vLLM replicas serve different models ({shown}): they must share one base model")
        return served.pop()

    async def close(self) -> None:
        """Stop the revivals and every replica (each managed server stopped: no orphans)."""
        self._closed = True
        revivals = [r.revive for r in self.replicas if r.revive is not None]
        for t in revivals:
            t.cancel()
        await asyncio.gather(*revivals, return_exceptions=True)
        outcomes = await asyncio.gather(*(r.engine.close() for r in self.replicas), return_exceptions=True)
        self._placement.clear()
        self._checkpoints.clear()
        for r, out in zip(self.replicas, outcomes, strict=True):
            r.live = False
            if isinstance(out, Exception):
                log.warning("%s: close failed: %s", r.label, out)

    async def ensure_healthy(self) -> None:
        """After EngineUnavailable (no replica live): restart every dead managed server and re-probe
        every dead attached one, at once; EngineUnavailable again while none answers."""
        if not self._started:
            await self.start()
            return
        dead = [r for r in self.replicas if not r.live and not r.given_up]
        outcomes = await asyncio.gather(*(self._revive(r) for r in dead), return_exceptions=True)
        errors = _failures(dead, outcomes, "is still down", logging.WARNING)
        if any(r.live for r in self.replicas):
            for r in self.replicas:
                if not r.live:
                    self._schedule_revive(r)
            return
        if all(r.given_up for r in self.replicas):
            raise EngineError(self._none_live() + " (every replica given up)")
        if not errors or any(isinstance(e, EngineUnavailable) for e in errors):
            raise EngineUnavailable(self._none_live())  # the daemon tries again with backoff
        raise errors[0]

    async def restart(self) -> None:
        """The daemon's recovery hook after `EngineUnavailable`."""
        await self.ensure_healthy()

    # -- failure and recovery -----------------------------------------------------------------

    def _none_live(self) -> str:
        return "no vLLM replica is live: " + "; ".join(
            f"{r.label}: {(r.error or 'down').splitlines()[0][:200]}" for r in self.replicas)

    def _mark_dead(self, replica: Replica, epoch: int, exc: BaseException) -> bool:
        """Mark a replica dead (once per epoch) and start reviving it; False for a stale report."""
        if replica.epoch != epoch or not replica.live:
            return False
        replica.live = False
        replica.error = str(exc)
        moving = [n for n, r in self._placement.items() if r is replica]
        log.warning("%s died: %s; %d adapter(s) (%s) and its unanswered requests move to the other replicas",
                    replica.label, str(exc).splitlines()[0], len(moving), ", ".join(moving) or "none")
        self._schedule_revive(replica)
        return True

    async def _failed(self, replica: Replica, epoch: int, exc: BaseException) -> bool:
        """A request to `replica` met EngineUnavailable: unless the server still answers its health
        check (the request itself timed out: not a dead server, nothing moves; False), mark it dead
        and move its adapters to live replicas now (those left where no replica is live move, or
        come back, later)."""
        if replica.live and replica.epoch == epoch and await replica.engine.answers():
            log.warning("%s: a request failed (%s) but the server answers its health check; not failed over",
                        replica.label, str(exc).splitlines()[0])
            return False
        async with self._lock:
            self._mark_dead(replica, epoch, exc)
            for name in [n for n, r in self._placement.items() if r is replica]:
                if not any(r.live for r in self.replicas):
                    break
                try:
                    await self._move(name)
                except EngineUnavailable:
                    break  # the last live replica died during the move: the request reports it
                except EngineError as exc:  # refused there (rank, modules): its own requests meet it
                    log.error("adapter %s could not move off %s: %s", name, replica.label, exc)
        return True

    async def _move(self, name: str) -> Replica:
        """Load adapter `name` on a live replica if its own is dead (call under self._lock)."""
        while True:
            current = self._placement.get(name)
            if current is None:
                raise EngineError(f"adapter {name} is not loaded")
            if current.live:
                return current
            target = self._choose(for_adapter=True)
            if target is None:
                raise EngineUnavailable(self._none_live())
            epoch = target.epoch
            try:
                await target.engine.load(self._checkpoints[name])
            except EngineUnavailable as exc:
                self._mark_dead(target, epoch, exc)
                continue
            current.engine.forget(name)
            self._placement[name] = target
            log.warning("adapter %s moved from %s (down) to %s", name, current.label, target.label)
            return target

    def _schedule_revive(self, replica: Replica) -> None:
        if self._closed or replica.given_up or (replica.revive is not None and not replica.revive.done()):
            return
        replica.revive = asyncio.create_task(self._revive_loop(replica), name=f"revive vLLM replica {replica.index}")

    async def _revive_loop(self, replica: Replica) -> None:
        """In the background: restart (managed) or re-probe (attached) until it rejoins or gives up."""
        while not replica.live and not self._closed:
            try:
                await self._revive(replica)
            except EngineUnavailable as exc:
                replica.error = str(exc)
                log.info("%s still down (%s); next try in %.0f s", replica.label, str(exc).splitlines()[0],
                         REPROBE_SECONDS)
                await asyncio.sleep(REPROBE_SECONDS)
            except EngineError as exc:
                replica.error = str(exc)
                server = replica.engine.server
                launch = replica.engine.econf.launch
                if server is not None and launch is not None and server.restarts < launch.max_restarts:
                    log.warning("%s failed to restart (%s); next try in %.0f s", replica.label,
                                str(exc).splitlines()[0], REPROBE_SECONDS)
                    await asyncio.sleep(REPROBE_SECONDS)
                    continue
                replica.given_up = True
                log.error("%s given up: %s; the other replicas carry on", replica.label, exc)
                return

    async def _revive(self, replica: Replica) -> None:
        """One attempt: the replica's own ensure_healthy (a managed server restarted, an attached one
        probed), then it rejoins; an attached server that restarted lost our adapters: load them again."""
        await replica.engine.ensure_healthy()
        async with self._lock:
            if replica.live:
                return
            if replica.engine.served_model != self._model:
                raise EngineError(f"{replica.label} now serves {replica.engine.served_model}, not {self._model}")
            if not replica.managed():
                for name in [n for n, r in self._placement.items() if r is replica]:
                    replica.engine.forget(name)
                    await replica.engine.load(self._checkpoints[name])
            replica.epoch += 1
            replica.live = True
            replica.error = None
        log.warning("%s is back: it takes adapters and base-model requests again", replica.label)

    # -- routing ------------------------------------------------------------------------------

    def _loads(self) -> list[Load]:
        counts = {r.index: 0 for r in self.replicas}
        for r in self._placement.values():
            counts[r.index] += 1
        return [Load(r.live, counts[r.index], r.in_flight) for r in self.replicas]

    def _choose(self, *, for_adapter: bool) -> Replica | None:
        start = 0
        if not for_adapter:
            start = self._turn
            self._turn = (self._turn + 1) % len(self.replicas)
        i = choose_replica(self._loads(), for_adapter=for_adapter, start=start)
        return None if i is None else self.replicas[i]

    async def _route(self, handle: AdapterHandle) -> Replica:
        if handle.name is None:
            replica = self._choose(for_adapter=False)
            if replica is None:
                raise EngineUnavailable(self._none_live())
            return replica
        replica = self._placement.get(handle.name)
        if replica is None:
            raise EngineError(f"adapter {handle.name} is not loaded")
        if replica.live:
            return replica
        async with self._lock:  # a move may be under way: wait for it, or make it
            return await self._move(handle.name)

    async def _on_replica(self, handle: AdapterHandle, call: Callable[[VLLMEngine], Awaitable[T]]) -> T:
        """Run `call` on the replica for `handle`; on EngineUnavailable, fail over and run it again —
        at most once per replica: a request that fails everywhere (or times out on a server that is
        up) reaches the caller, so the evaluator's max_suite_attempts still bounds it."""
        failures = 0
        while True:
            replica = await self._route(handle)
            epoch = replica.epoch
            replica.in_flight += 1
            try:
                async with replica.slots:
                    if not replica.live or replica.epoch != epoch:
                        continue  # it died while this request waited for a slot: route again
                    out = await call(replica.engine)
                    replica.answered += 1
                    return out
            except EngineUnavailable as exc:
                failure: EngineUnavailable = exc
            finally:
                replica.in_flight -= 1
            failures += 1
            if not await self._failed(replica, epoch, failure) or failures >= len(self.replicas):
                raise failure

    async def _each(self, handle: AdapterHandle, items: Sequence[R],
                    call: Callable[[VLLMEngine, R], Awaitable[list[T]]]) -> list[T]:
        """One routed call per item: a dead replica costs only its unanswered items."""
        await self.start()

        async def one(item: R) -> T:
            (out,) = await self._on_replica(handle, lambda engine: call(engine, item))
            return out

        return await gather_all([one(x) for x in items])

    # -- adapters -----------------------------------------------------------------------------

    async def load(self, checkpoint: Checkpoint) -> AdapterHandle:
        await self.start()
        if (base := base_handle(checkpoint)) is not None:
            return base
        name = adapter_name(checkpoint)
        while True:
            async with self._lock:
                placed = self._placement.get(name)
                replica = placed if placed is not None and placed.live else self._choose(for_adapter=True)
                if replica is None:
                    raise EngineUnavailable(self._none_live())
                self._placement[name] = replica  # reserved now, so loads together spread
                self._checkpoints[name] = checkpoint
            epoch = replica.epoch
            try:
                handle = await replica.engine.load(checkpoint)
            except EngineUnavailable as exc:
                self._unreserve(name, replica)
                if not await self._failed(replica, epoch, exc):
                    raise
                continue
            except BaseException:
                self._unreserve(name, replica, drop=True)
                raise
            if self._placement.get(name) is not replica:
                # this replica was failed over while the load was under way: the adapter lives elsewhere
                replica.engine.forget(name)
            log.info("adapter %s loaded on %s", name, replica.label)
            return handle

    def _unreserve(self, name: str, replica: Replica, *, drop: bool = False) -> None:
        """Undo load()'s reservation, unless a fail-over has placed the adapter elsewhere meanwhile."""
        if self._placement.get(name) is replica:
            self._placement.pop(name)
            if drop:
                self._checkpoints.pop(name, None)

    async def prepare(self, checkpoints: Sequence[Checkpoint]) -> None:
        """Grow a guessed --max-lora-rank once on every live managed replica (VLLMEngine.prepare)."""
        await self.start()
        live = [(r, r.epoch) for r in self.replicas if r.live]
        outcomes = await asyncio.gather(*(r.engine.prepare(checkpoints) for r, _ in live), return_exceptions=True)
        for (r, epoch), out in zip(live, outcomes, strict=True):
            if isinstance(out, EngineUnavailable):
                await self._failed(r, epoch, out)
            elif isinstance(out, BaseException):
                raise out

    async def unload(self, handle: AdapterHandle) -> None:
        if handle.name is None:
            return
        async with self._lock:
            replica = self._placement.pop(handle.name, None)
            self._checkpoints.pop(handle.name, None)
        if replica is None:
            return
        if not replica.live:
            replica.engine.forget(handle.name)  # it went with the dead server
            return
        epoch = replica.epoch
        try:
            await replica.engine.unload(handle)
        except EngineUnavailable as exc:
            replica.engine.forget(handle.name)
            log.info("adapter %s went with %s", handle.name, replica.label)
            await self._failed(replica, epoch, exc)

    # -- requests -----------------------------------------------------------------------------

    async def generate(self, handle: AdapterHandle, requests: list[GenerateRequest]) -> list[GenerateResult]:
        return await self._each(handle, requests, lambda engine, r: engine.generate(handle, [r]))

    async def score(self, handle: AdapterHandle, requests: list[ScoreRequest]) -> list[ScoreResult]:
        return await self._each(handle, requests, lambda engine, r: engine.score(handle, [r]))

    async def next_token_logprobs(
        self, handle: AdapterHandle, prompts: list[list[int]], k: int
    ) -> list[dict[int, float]]:
        return await self._each(handle, prompts, lambda engine, p: engine.next_token_logprobs(handle, [p], k))
