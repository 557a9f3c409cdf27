"""One writer per (results_dir, run): an OS file lock (`fcntl.flock`) the daemon holds for its life.

- `ckpt-watch run` (a daemon) takes the run's lock exclusively. A second daemon on the same
  results dir and run finds it held and exits 2 with the holder's pid; if the holder is a
  one-shot process (`eval`, `run --once`), the daemon waits for it to finish.
- `ckpt-watch eval` and `run --once` take the lock when it is free (then they may recover rows
  an earlier crash left running). Beside a live daemon they run as guests: they never recover,
  and every evaluation is claimed atomically in the ledger (`Ledger.claim`), so no row is
  evaluated twice whichever process gets to it first.

The lock is released by the kernel when the process dies (SIGKILL included), so there is no
stale lock to clean up; the file's content (pid, mode) is only for messages.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from ckpt_watch.core import utcnow

DAEMON = "daemon"
ONESHOT = "oneshot"


class LockHeld(Exception):
    """Another process holds the run's lock; `holder` is what it wrote into the lock file."""

    def __init__(self, path: Path, holder: dict):
        self.path = path
        self.holder = holder
        pid = holder.get("pid", "?")
        what = "a ckpt-watch daemon" if holder.get("mode") == DAEMON else "a ckpt-watch eval / run --once"
        super().__init__(f"{what} (pid {pid}) already evaluates run '{holder.get('run', '?')}' "
                         f"with results in {path.parent.parent}; lock file {path}")

    @property
    def by_daemon(self) -> bool:
        return self.holder.get("mode") == DAEMON


def lock_path(results_dir: Path, run: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", run)
    return Path(results_dir) / ".locks" / f"{safe}.lock"


@dataclass
class RunLock:
    """`RunLock.acquire(results_dir, run, mode)` → held lock, or raises LockHeld."""

    path: Path
    fd: int
    mode: str

    @classmethod
    def acquire(cls, results_dir: Path, run: str, mode: str, *, peek: bool = False) -> RunLock:
        """peek: held for a moment, with no holder written, so another process that finds it held
        tries again shortly (as for `status`) instead of taking it for a daemon's."""
        path = lock_path(results_dir, run)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_holder(path)
            os.close(fd)
            if not _pid_alive(holder.get("pid")):
                holder = {}  # what the file says is stale (a killed holder): a `status` peeking, say
            raise LockHeld(path, holder) from None
        os.ftruncate(fd, 0)
        if not peek:
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "mode": mode, "run": run, "since": utcnow()}).encode(), 0)
        return cls(path, fd, mode)

    def release(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = -1


def read_holder(path: Path) -> dict:
    """What the lock's holder wrote (pid, mode, run, since); {} if unreadable."""
    try:
        data = json.loads(Path(path).read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def holder_of(results_dir: Path, run: str) -> dict | None:
    """The live holder of the run's lock, or None when nobody holds it (for `status`)."""
    path = lock_path(results_dir, run)
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return read_holder(path)
    finally:
        os.close(fd)
    return None


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class OwnerMark:
    """Every ckpt-watch process holds one for its life: `owner` is written into the rows it claims,
    and a lock holder recovers a `running` row only when its owner's mark is free (the process is
    gone) — never the rows a live guest (`eval` beside a daemon) is evaluating."""

    owner: str
    fd: int

    @classmethod
    def acquire(cls, results_dir: Path) -> OwnerMark:
        owner = f"{os.getpid()}-{secrets.token_hex(4)}"
        path = _owner_path(results_dir, owner)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return cls(owner, fd)

    def release(self, results_dir: Path) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                _owner_path(results_dir, self.owner).unlink()
            os.close(self.fd)
            self.fd = -1


def _owner_path(results_dir: Path, owner: str) -> Path:
    return Path(results_dir) / ".locks" / "owners" / f"{re.sub(r'[^A-Za-z0-9_-]', '_', owner)}.lock"


def owner_alive(results_dir: Path, owner: str) -> bool:
    """Whether the process that claimed rows as `owner` still runs (its mark is locked)."""
    path = _owner_path(results_dir, owner)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):
        path.unlink()  # a dead owner's mark
    return False
