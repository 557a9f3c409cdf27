"""sd_notify(3) in stdlib socket code, so the daemon can run as a systemd `Type=notify` service.

systemd hands the service a datagram socket path in `NOTIFY_SOCKET` (a leading `@` means a Linux
abstract socket) and, with `WatchdogSec=`, the ping period in `WATCHDOG_USEC`. Everything here
is a no-op when `NOTIFY_SOCKET` is unset, so the daemon calls it unconditionally.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def _address(raw: str) -> str | bytes:
    # An abstract socket name starts with a NUL byte; systemd writes it with "@" instead.
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    return raw


def notify(message: str) -> bool:
    """Send one notification ("READY=1", "STATUS=…", "WATCHDOG=1", "STOPPING=1", or several
    newline-separated assignments). Returns True when sent, False when there is no socket or
    sending failed (logged: a lost status line must never stop the daemon)."""
    raw = os.environ.get("NOTIFY_SOCKET")
    if not raw:
        return False
    if not raw.startswith(("/", "@")):
        # sd_notify also ignores other forms (e.g. vsock:); say so once rather than guess.
        log.warning("NOTIFY_SOCKET=%r is not a unix socket path; notifications disabled", raw)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(_address(raw))
            # never block the daemon: a reader that stopped draining must not stall shutdown
            sock.send(message.encode(), socket.MSG_DONTWAIT)
    except OSError as exc:
        log.warning("sd_notify %r to %s failed: %s", message.split("\n", 1)[0], raw, exc)
        return False
    return True


def ready(status: str | None = None) -> bool:
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def status(text: str) -> bool:
    # STATUS is one line in `systemctl status`; a newline would end the assignment early.
    return notify("STATUS=" + " ".join(text.splitlines()))


def watchdog() -> bool:
    return notify("WATCHDOG=1")


def stopping(status_text: str | None = None) -> bool:
    return notify("STOPPING=1" + (f"\nSTATUS={status_text}" if status_text else ""))


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC, as sd_watchdog_enabled(3)
    advises), or None when the watchdog is off or meant for another process."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid.strip() != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not an integer; watchdog pings disabled", usec)
        return None
    if value <= 0:
        return None
    return value / 2 / 1_000_000
