"""sd_notify: messages reach a unix datagram socket the test opens (path and abstract),
no-op without NOTIFY_SOCKET, watchdog interval from WATCHDOG_USEC."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckpt_watch import notify


@pytest.fixture
def listener(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    # A short directory: unix socket paths are limited to 108 bytes, pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="ckw-") as tmp:
        path = str(Path(tmp) / "notify.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        try:
            yield sock
        finally:
            sock.close()


def _recv(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_lifecycle_messages(listener: socket.socket) -> None:
    assert notify.ready("watching outputs/run1")
    assert _recv(listener) == "READY=1\nSTATUS=watching outputs/run1"
    assert notify.status("step 400: arc_challenge 120/1172\nbacklog 2")
    assert _recv(listener) == "STATUS=step 400: arc_challenge 120/1172 backlog 2"
    assert notify.watchdog()
    assert _recv(listener) == "WATCHDOG=1"
    assert notify.stopping("draining")
    assert _recv(listener) == "STOPPING=1\nSTATUS=draining"
    assert notify.notify("RELOADING=1")
    assert _recv(listener) == "RELOADING=1"


def test_from_another_process(listener: socket.socket) -> None:
    """What systemd sees: a separate process (the daemon) writing to the socket."""
    code = "from ckpt_watch import notify; raise SystemExit(0 if notify.ready() else 1)"
    subprocess.run([sys.executable, "-c", code], check=True, env=os.environ.copy(), timeout=60)
    assert _recv(listener) == "READY=1"


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"ckpt-watch-test-{os.getpid()}-{secrets.token_hex(4)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.notify("READY=1")
        assert _recv(sock) == "READY=1"


def test_noop_without_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.ready() is False
    assert notify.watchdog() is False


def test_unreachable_socket_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert notify.notify("WATCHDOG=1") is False
    assert "sd_notify" in caplog.text


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("30000000", None, 15.0),
        ("120000000", "self", 60.0),
        ("120000000", "1", None),  # the watchdog is meant for another process
        ("0", None, None),
        ("soon", None, None),
    ],
)
def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None,
                           expected: float | None) -> None:
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert notify.watchdog_interval() == expected
