"""The daemon's lifecycle as a real subprocess: SIGTERM drain, restart, and sd_notify."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.faults.harness import ledger_rows
from tests.test_daemon_discovery import metric_lines, wait_for

pytestmark = pytest.mark.slow


def _config(tmp: Path, base: Path, watch: Path, drain: float) -> Path:
    texts = tmp / "texts.jsonl"
    # enough held-out texts that one evaluation takes several seconds on the tiny model
    texts.write_text("".join(f'{{"text": "Sample sentence number {i} about rivers, bread and primes."}}\n'
                             for i in range(3000)))
    cfg = tmp / "cfg.yaml"
    cfg.write_text(f"""
base_model: {base}
results_dir: {tmp / "results"}
run_name: r1
watch: {{dir: {watch}, settle_seconds: 0.2}}
engine: {{kind: hf, batch_size: 8}}
suites:
  slow_loss: {{type: heldout_loss, path: {texts}}}
  quick_loss: {{type: heldout_loss, max_texts: 2}}
mlflow: {{enabled: false}}
daemon: {{drain_seconds: {drain}}}
""")
    return cfg


class NotifyListener:
    """A datagram socket read continuously, as systemd reads NOTIFY_SOCKET."""

    def __init__(self, tmp: Path):
        self.path = str(tmp / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue

    def close(self) -> list[str]:
        time.sleep(0.5)
        self._stop.set()
        self._thread.join()
        self.sock.close()
        return self.messages


def _start(cfg: Path, env_extra: dict[str, str], *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_extra}
    return subprocess.Popen([sys.executable, "-m", "ckpt_watch", "run", "-c", str(cfg), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _running(results: Path) -> str | None:
    rows = ledger_rows(results, "SELECT suite FROM evals WHERE state='running'")
    return rows[0][0] if rows else None


def _ledger_states(results: Path) -> Counter:
    return Counter(r[0] for r in ledger_rows(results, "SELECT state FROM evals"))


def test_sigterm_mid_suite_drains_then_restart_finishes(tmp_path, tiny_run, tiny_base):
    cfg = _config(tmp_path, tiny_base, tiny_run, drain=1.0)
    listener = NotifyListener(tmp_path)
    daemon = _start(cfg, {"NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": "2000000"})
    results = tmp_path / "results"
    try:
        # a suite is running: stop now
        wait_for(lambda: _running(results) == "slow_loss", 120, "the slow suite running", daemon)
        time.sleep(0.5)
        t0 = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        out, _ = daemon.communicate(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        if daemon.poll() is None:
            daemon.kill()
    assert daemon.returncode == 0, out
    assert elapsed < 1.0 + 15, f"took {elapsed:.1f} s to stop"
    assert "drain time" in out and "left pending" in out
    states = _ledger_states(results)
    assert states["running"] == 0 and states["pending"] >= 1
    msgs = listener.close()
    ready = next(i for i, m in enumerate(msgs) if m.startswith("READY=1"))
    # READY only once the engine answers: the start-up extension came first, no evaluation before it
    assert any(m.startswith("EXTEND_TIMEOUT_USEC=") for m in msgs[:ready]), msgs[: ready + 1]
    assert not any(m.startswith("STATUS=evaluating") for m in msgs[:ready])
    assert any(m.startswith("STATUS=evaluating") for m in msgs[ready:])
    assert "WATCHDOG=1" in msgs
    assert msgs[-1].startswith("STOPPING=1")

    # restart: the interrupted work is finished, nothing is done twice
    cfg.write_text(cfg.read_text().replace("drain_seconds: 1.0", "drain_seconds: 60"))
    again = _start(cfg, {}, "--once")
    out, _ = again.communicate(timeout=900)
    assert again.returncode == 0, out
    counts = Counter((m["step"], m["suite"]) for m in metric_lines(results, "r1"))
    assert set(counts) == {(s, n) for s in (0, 2, 4, 6) for n in ("slow_loss", "quick_loss")}
    assert max(counts.values()) == 1
    assert set(_ledger_states(results)) == {"done"}


def test_sigterm_within_drain_time_finishes_the_suite(tmp_path, tiny_run, tiny_base):
    cfg = _config(tmp_path, tiny_base, tiny_run, drain=300)
    results = tmp_path / "results"
    daemon = _start(cfg, {})
    try:
        wait_for(lambda: _ledger_states(results)["running"] == 1, 120,
                 "a suite running", daemon)
        daemon.send_signal(signal.SIGTERM)
        out, _ = daemon.communicate(timeout=300)
    finally:
        if daemon.poll() is None:
            daemon.kill()
    assert daemon.returncode == 0, out
    states = _ledger_states(results)
    # the running suite finished (done), the rest stayed pending, nothing is left running
    assert states["done"] >= 1 and states["running"] == 0
    assert len(metric_lines(results, "r1")) == states["done"]
