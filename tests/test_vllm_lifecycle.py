"""The managed server's lifecycle and security (issue 12 items 1, 2, 8, 11).

Fast tests use a stand-in for `vllm serve` (a real process answering /health, with a child
like vLLM's engine core) because the faults they inject — an owner SIGKILLed, a server that
ignores SIGTERM, a pid reused by another program — are about processes, not about vLLM; the
real vLLM server is checked at the end (its /proc cmdline and environ, and that the key it
reads from its environment is enforced). The daemon-level tests with a real vLLM server are
in tests/faults/test_vllm_killed.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from pydantic import ValidationError

from ckpt_watch.config import ConfigError, LaunchConfig, parse_config
from ckpt_watch.engines.vllm_server import (
    CANCEL_GRACE_SECONDS,
    ManagedServer,
    group_alive,
    proc_cmdline,
    proc_start_ticks,
    reap_stale,
)

REPO = Path(__file__).resolve().parents[1]

# Set while pytest collects, i.e. before any fixture starts the shared vLLM server: a secret of
# the test process that the server must not inherit (a name nothing else reads).
SECRET_NAME, SECRET = "CKPT_WATCH_TEST_SECRET_TOKEN", "sk-test-secret-must-not-leak"
os.environ[SECRET_NAME] = SECRET

# A stand-in for `vllm serve`: answers /health on --host/--port (not at all with STANDIN_NEVER_READY),
# has a child process as vLLM has its engine core, and on SIGTERM stops that child and exits, as
# vLLM's API server does (its engine core neither inherits the parent-death signal nor watches its
# parent) — or ignores SIGTERM with STANDIN_IGNORE_TERM (a hung server).
STANDIN = """
import http.server, os, signal, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
def term(*_):
    child.terminate()
    os._exit(0)
signal.signal(signal.SIGTERM, signal.SIG_IGN if os.environ.get("STANDIN_IGNORE_TERM") else term)
args = sys.argv
port = int(args[len(args) - 1 - args[::-1].index("--port") + 1])
host = args[len(args) - 1 - args[::-1].index("--host") + 1]
if os.environ.get("STANDIN_NEVER_READY"):
    signal.pause()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
print("stand-in up", flush=True)
http.server.HTTPServer((host, port), H).serve_forever()
"""

# A ckpt-watch process that starts a server and then is killed (SIGKILL: no cleanup of any kind).
OWNER = """
import json, sys, time
from pathlib import Path
from ckpt_watch.config import LaunchConfig
from ckpt_watch.engines.vllm_server import ManagedServer
server = ManagedServer("m", LaunchConfig.model_validate_json(sys.argv[1]), log_path=Path(sys.argv[2]),
                       max_lora_rank=8, max_logprobs=20)
server.start()
print(json.dumps({"pid": server.pid}), flush=True)
time.sleep(600)
"""


def standin(**env: str) -> LaunchConfig:
    return LaunchConfig(command=[sys.executable, "-c", STANDIN], env=env, max_restarts=2)


def server_for(launch: LaunchConfig, log_path: Path) -> ManagedServer:
    return ManagedServer("m", launch, log_path=log_path, max_lora_rank=8, max_logprobs=20)


def wait_gone(pgid: int, timeout: float) -> float:
    """Seconds until no live process is left in group `pgid`; fails after `timeout`."""
    t0 = time.monotonic()
    while group_alive(pgid):
        assert time.monotonic() - t0 < timeout, f"process group {pgid} still alive after {timeout:.0f} s"
        time.sleep(0.05)
    return time.monotonic() - t0


def start_owner(launch: LaunchConfig, log_path: Path) -> tuple[subprocess.Popen[str], int]:
    """The OWNER script with a started server; returns (owner, server pid)."""
    owner = subprocess.Popen([sys.executable, "-c", OWNER, launch.model_dump_json(), str(log_path)],
                             cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None
    line = owner.stdout.readline()
    assert line, f"owner exited with {owner.wait()} before starting its server"
    return owner, json.loads(line)["pid"]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- item 8: the API key and the environment --------------------------------------------------


def test_key_not_in_argv_and_env_is_an_allow_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secrets = {"OPENAI_API_KEY": "sk-judge", "MLFLOW_TRACKING_PASSWORD": "pw", "MLFLOW_TRACKING_TOKEN": "t",
               "AWS_SECRET_ACCESS_KEY": "aws", "JUDGE_KEY": "jk", "HTTPS_PROXY": "http://u:p@proxy:3128"}
    needed = {"PATH": "/usr/bin:/bin", "HOME": "/home/u", "LC_ALL": "C.UTF-8", "HF_HOME": "/hf",
              "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "VLLM_CPU_OMP_THREADS_BIND": "all", "OMP_NUM_THREADS": "2",
              "TORCHINDUCTOR_CACHE_DIR": "/tc", "LD_PRELOAD": "libtcmalloc.so", "VLLM_API_KEY": "theirs"}
    for k, v in {**secrets, **needed}.items():
        monkeypatch.setenv(k, v)
    launch = LaunchConfig(env={"VLLM_CPU_KVCACHE_SPACE": "1", "HTTPS_PROXY": "http://proxy:3128"}, gpu=1)
    server = server_for(launch, tmp_path / "log")
    cmd, env = server.command(), server.env()
    assert server.api_key not in " ".join(cmd) and "--api-key" not in cmd
    assert env["VLLM_API_KEY"] == server.api_key  # ours, not an inherited one
    assert not (set(secrets) - {"HTTPS_PROXY"}) & set(env), sorted(env)
    assert env["HTTPS_PROXY"] == "http://proxy:3128"  # only because launch.env asked for it
    inherited = {k: v for k, v in needed.items() if k != "VLLM_API_KEY"}
    assert {k: env.get(k) for k in inherited} == inherited
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1" and env["CUDA_VISIBLE_DEVICES"] == "1"
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert SECRET_NAME not in env


# -- item 11: --host in extra_args ------------------------------------------------------------


@pytest.mark.parametrize("args", [["--host", "0.0.0.0"], ["--host=10.1.2.3"], ["--ho", "::"],
                                  ["--host", "127.0.0.1", "--host", "example.org"]])
def test_remote_host_refused_without_allow_remote(args: list[str]) -> None:
    raw = {"base_model": "m", "suites": {"arc_challenge": {}},
           "engine": {"kind": "vllm", "launch": {"extra_args": args}}}
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert [path for path, _ in info.value.errors] == ["engine.launch.extra_args"]
    assert "allow_remote" in str(info.value)
    raw["engine"]["launch"]["allow_remote"] = True
    assert parse_config(raw).engine.launch.extra_args == args


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1"])
def test_loopback_host_allowed(host: str) -> None:
    assert LaunchConfig(extra_args=["--host", host]).extra_args == ["--host", host]


def test_api_key_in_extra_args_refused() -> None:
    with pytest.raises(ValidationError, match="environment"):
        LaunchConfig(extra_args=["--api_key", "k"])


def test_validate_names_the_field(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("base_model: m\nsuites: {arc_challenge: {}}\n"
                   "engine: {kind: vllm, launch: {extra_args: [--host, 0.0.0.0]}}\n")
    r = subprocess.run([sys.executable, "-m", "ckpt_watch", "validate", str(cfg)], cwd=REPO,
                       capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 2, r.stdout + r.stderr
    assert "engine.launch.extra_args" in r.stdout + r.stderr


def test_allow_remote_warns_and_serves(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    launch = LaunchConfig(command=[sys.executable, "-c", STANDIN], extra_args=["--host", "0.0.0.0"],
                          allow_remote=True)
    server = server_for(launch, tmp_path / "log")
    try:
        with caplog.at_level(logging.WARNING, logger="ckpt_watch.engines.vllm_server"):
            server.start()
        assert server.command()[-2:] == ["--host", "0.0.0.0"] and server.health()  # reached on loopback
        assert any("allow_remote" in r.getMessage() and "0.0.0.0" in r.getMessage() for r in caplog.records)
    finally:
        server.stop(grace=1.0)


# -- item 2: the server never outlives its owner -----------------------------------------------


def test_server_dies_with_its_killed_owner(tmp_path: Path) -> None:
    """Parent-death signal: the owner is SIGKILLed, its server group (leader and child) goes."""
    owner, pid = start_owner(standin(), tmp_path / "vllm-server.log")
    pidfile = tmp_path / "vllm-server.pid"
    record = json.loads(pidfile.read_text())
    assert record["pid"] == record["pgid"] == pid and record["start_ticks"] == proc_start_ticks(pid)
    assert record["cmdline"] == proc_cmdline(pid) and record["owner_pid"] == owner.pid
    owner.kill()
    owner.wait()
    took = wait_gone(pid, 10)
    print(f"\nserver group gone {took:.2f} s after its owner's SIGKILL")
    assert reap_stale(pidfile) is None and not pidfile.exists()  # nothing left to reap; record dropped


def test_stale_server_reaped_by_next_start(tmp_path: Path) -> None:
    """A server that ignores SIGTERM outlives its SIGKILLed owner; the next start kills its group
    (SIGKILL after the grace) from the pidfile, then starts its own."""
    launch = standin(STANDIN_IGNORE_TERM="1")
    owner, pid = start_owner(launch, tmp_path / "vllm-server.log")
    owner.kill()
    owner.wait()
    time.sleep(1.0)
    assert group_alive(pid), "the stand-in was meant to survive its owner"
    server = server_for(launch, tmp_path / "vllm-server.log")
    try:
        t0 = time.monotonic()
        server.start()
        print(f"\nstale group reaped and a new server ready in {time.monotonic() - t0:.1f} s")
        assert not group_alive(pid) and server.pid != pid and server.health()
        assert json.loads(server.pidfile.read_text())["pid"] == server.pid
    finally:
        server.stop(grace=1.0)
    assert not server.pidfile.exists()


def _record(pidfile: Path, pid: int, cmdline: list[str], ticks: int | None) -> None:
    pidfile.write_text(json.dumps({"pid": pid, "pgid": pid, "argv": cmdline, "cmdline": cmdline,
                                   "start_ticks": ticks, "owner_pid": dead_pid(), "owner_start_ticks": 1}))


def test_pidfile_reaps_only_the_recorded_process(tmp_path: Path) -> None:
    """A recorded pid that now runs another program, or the same command line started at another
    time (pid reuse), is left alone; only the exact process is reaped."""
    pidfile = tmp_path / "vllm-server.pid"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    try:
        time.sleep(0.3)
        real, ticks = proc_cmdline(other.pid), proc_start_ticks(other.pid)
        assert real and ticks is not None
        vllm_argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", "m"]
        for cmdline, start in ((vllm_argv, ticks), (real, ticks - 1)):
            _record(pidfile, other.pid, cmdline, start)
            assert reap_stale(pidfile, grace=1.0) is None
            assert other.poll() is None and not pidfile.exists()
        _record(pidfile, other.pid, real, ticks)
        assert reap_stale(pidfile, grace=1.0) == other.pid
        assert other.wait(timeout=5) == -signal.SIGTERM and not pidfile.exists()
    finally:
        other.kill()
        other.wait()


def test_pidfile_of_a_live_owner_left_alone(tmp_path: Path) -> None:
    """Another live ckpt-watch's server (here: this process's) is never reaped."""
    server = server_for(standin(), tmp_path / "vllm-server.log")
    try:
        server.start()
        assert reap_stale(server.pidfile, grace=1.0) is None
        assert server.alive() and server.pidfile.exists()
    finally:
        server.stop(grace=1.0)


# -- item 1 (server side): start-up and restart are cancellable --------------------------------


def test_cancelled_start_stops_the_server(tmp_path: Path) -> None:
    """A server that never gets ready and ignores SIGTERM: cancelling astart() kills its group
    within the cancel grace and re-raises CancelledError, instead of waiting out startup_timeout."""
    server = server_for(standin(STANDIN_NEVER_READY="1", STANDIN_IGNORE_TERM="1"), tmp_path / "log")

    async def body() -> tuple[int, float]:
        task = asyncio.create_task(server.astart())
        await asyncio.sleep(1.5)
        pgid = server.pid
        assert pgid is not None and group_alive(pgid) and not task.done()
        t0 = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return pgid, time.monotonic() - t0

    try:
        pgid, took = asyncio.run(body())
        print(f"\ncancelled start-up: server group gone {took:.1f} s after the cancel")
        assert not group_alive(pgid) and took < CANCEL_GRACE_SECONDS + 3
        assert not server.pidfile.exists()
    finally:
        server.stop(grace=1.0)


def test_cancelled_restart_stops_the_server(tmp_path: Path) -> None:
    server = server_for(standin(), tmp_path / "log")
    try:
        server.start()
        first = server.pid
        server.kill()
        server.launch = standin(STANDIN_NEVER_READY="1")  # the restarted one hangs in start-up

        async def body() -> float:
            task = asyncio.create_task(server.restart())
            while server.pid == first or not server.alive():  # backoff (1 s), then the new spawn
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
            t0 = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return time.monotonic() - t0

        took = asyncio.run(body())
        assert server.pid != first and not group_alive(server.pid) and took < CANCEL_GRACE_SECONDS + 3
    finally:
        server.stop(grace=1.0)


# -- the real vLLM server ------------------------------------------------------------------------


def _environ(pid: int) -> dict[str, str]:
    raw = (Path("/proc") / str(pid) / "environ").read_bytes()
    return dict(item.decode(errors="replace").partition("=")[::2] for item in raw.split(b"\0") if item)


def _group_members(pgid: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


@pytest.mark.slow
@pytest.mark.vllm
def test_real_server_key_in_environ_only(vllm_server) -> None:
    """/proc of the real server and its engine core: no key on any command line, the key in the
    environment as VLLM_API_KEY and enforced by vLLM, the test process's secret absent."""
    server = vllm_server.server
    key, pid = server.api_key, server.pid
    assert pid is not None and os.environ[SECRET_NAME] == SECRET
    members = _group_members(pid)
    assert pid in members and len(members) >= 2, members  # the API server and its engine core
    for member in members:
        cmdline = (Path("/proc") / str(member) / "cmdline").read_bytes().decode(errors="replace")
        assert key not in cmdline and "--api-key" not in cmdline, cmdline
    env = _environ(pid)
    assert env["VLLM_API_KEY"] == key
    assert SECRET_NAME not in env and SECRET not in "".join(env.values())
    assert not {k for k in env if k.startswith(("MLFLOW_", "OPENAI_", "AWS_"))}, sorted(env)
    models = f"{server.root_url}/v1/models"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(models, timeout=30)
    assert info.value.code == 401  # the key from the environment is enforced
    req = urllib.request.Request(models, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert json.loads(resp.read())["data"][0]["id"] == server.model
