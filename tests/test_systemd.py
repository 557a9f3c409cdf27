"""The systemd template unit: required directives, and `systemd-analyze verify` accepts it
(Debian package: systemd)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from ckpt_watch.config import DaemonConfig

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "ckpt-watch@.service"
EXEC_BIN = "/usr/local/bin/ckpt-watch"
EXEC_ARGS = "run -c /etc/ckpt-watch/%i.yaml"


def _directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def _seconds(value: str) -> float:
    units = {"s": 1, "sec": 1, "min": 60, "m": 60}
    for suffix, mult in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if value.endswith(suffix):
            return float(value.removesuffix(suffix)) * mult
    return float(value)


def test_unit_directives() -> None:
    d = _directives(UNIT.read_text())
    assert d["Type"] == ["notify"]
    assert d["NotifyAccess"] == ["main"]
    assert d["Restart"] == ["on-failure"]
    assert d["KillMode"] == ["mixed"]  # SIGTERM to the daemon only, then the whole cgroup (vLLM) is killed
    assert d["EnvironmentFile"] == ["-/etc/ckpt-watch/%i.env"]
    assert d["ExecStart"] == [f"{EXEC_BIN} {EXEC_ARGS}"]
    assert _seconds(d["WatchdogSec"][0]) > 0
    # The stop timeout must cover the drain, or systemd SIGKILLs a daemon that is draining on time.
    assert _seconds(d["TimeoutStopSec"][0]) >= DaemonConfig().drain_seconds + 30
    assert d["WantedBy"] == ["multi-user.target"]


def _verify(unit_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit_dir / "ckpt-watch@run1.service")],
        capture_output=True, text=True, timeout=120,
    )


def _unit_copy(tmp_path: Path, text: str) -> Path:
    """A copy whose ExecStart binary exists (verify checks that it is executable). Only the
    binary's path changes; every other line, ExecStart's arguments included, is checked as is."""
    stub = tmp_path / "bin" / "ckpt-watch"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    assert text.count(f"ExecStart={EXEC_BIN} ") == 1
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    (unit_dir / "ckpt-watch@.service").write_text(text.replace(f"ExecStart={EXEC_BIN} ", f"ExecStart={stub} "))
    return unit_dir


def _complaints(proc: subprocess.CompletedProcess[str]) -> list[str]:
    # verify exits 0 on unknown keys and bad values (it only warns): any line about our unit fails.
    return [line for line in (proc.stdout + proc.stderr).splitlines() if "ckpt-watch@" in line]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze not installed (apt-get install systemd)")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    proc = _verify(_unit_copy(tmp_path, UNIT.read_text()))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _complaints(proc) == []


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze not installed (apt-get install systemd)")
def test_verify_would_catch_a_mistake(tmp_path: Path) -> None:
    """Control: the check above really sees a broken directive."""
    broken = UNIT.read_text().replace("KillMode=mixed", "KillMode=mixd")
    proc = _verify(_unit_copy(tmp_path, broken))
    assert any("mixd" in line for line in _complaints(proc)), proc.stdout + proc.stderr
