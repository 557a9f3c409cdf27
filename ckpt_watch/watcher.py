"""Filesystem watching: events are a hint to look again, never the source of truth.

watchdog's native observer (inotify on Linux) by default; the PollingObserver when
`watch.polling: true`, or when `auto` finds the watch dir on a network/FUSE filesystem,
where inotify sees nothing written by other hosts. The event handler does O(1) work: it
names the top-level folder touched and wakes the daemon. Full rescans happen at start-up
and every `rescan_seconds` regardless (that part lives in discovery.py).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from ckpt_watch.checkpoints import child_of
from ckpt_watch.config import WatchConfig

log = logging.getLogger(__name__)

# filesystems where inotify misses writes made by other hosts
NETWORK_FS = {
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "lustre", "gpfs", "ceph", "glusterfs",
    "beegfs", "afs", "davfs", "sshfs", "virtiofs", "wekafs", "orangefs", "panfs",
}


def mount_fstype(path: Path, mounts_file: str = "/proc/mounts") -> str | None:
    """Filesystem type of the mount holding path (its nearest existing ancestor)."""
    p = path.resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    best, fstype = "", None
    try:
        lines = Path(mounts_file).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].replace("\\040", " ")
        if (str(p) == mnt or str(p).startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, fstype = mnt, parts[2]
    return fstype


def use_polling(watch: WatchConfig, path: Path, mounts_file: str = "/proc/mounts") -> tuple[bool, str]:
    """(polling?, why) for the log line."""
    if watch.polling is True:
        return True, "watch.polling: true"
    if watch.polling is False:
        return False, "watch.polling: false"
    fstype = mount_fstype(path, mounts_file)
    if fstype and (fstype in NETWORK_FS or fstype.startswith("fuse")):
        return True, f"{fstype} filesystem (inotify misses remote writes)"
    return False, f"local {fstype or 'unknown'} filesystem"


_READ_ONLY_EVENTS = frozenset({"opened", "closed_no_write"})


class _Handler(FileSystemEventHandler):
    def __init__(self, root: Path, notify: Callable[[str | None], None], depth: int = 1):
        self.root = str(root)
        self.notify = notify
        self.depth = depth

    def on_any_event(self, event: FileSystemEvent) -> None:
        # our own reads of trainer_state.json raise open/close events: reacting to them
        # would make every check trigger the next one
        if event.event_type in _READ_ONLY_EVENTS:
            return
        for p in (event.src_path, getattr(event, "dest_path", "") or ""):
            if p:
                self.notify(child_of(Path(self.root), os.fsdecode(p), self.depth))


class Watcher:
    """Runs a watchdog observer on the watch dir, waiting for the dir to exist first.

    `notify(name)` is called from watchdog's thread with the top-level folder touched
    (or None when the whole dir should be rescanned); it must be cheap and thread-safe. With
    depth 2 (a root of runs) the name is `run/folder`, or `run` for the run folder itself.
    """

    def __init__(self, watch_dir: Path, config: WatchConfig, notify: Callable[[str | None], None], depth: int = 1):
        self.watch_dir = watch_dir
        self.config = config
        self.notify = notify
        self.depth = depth
        self.polling, self.reason = use_polling(config, watch_dir)
        self._observer = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ckpt-watch-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if not self.watch_dir.is_dir():
            log.info("waiting for %s to appear (trainers create output_dir late)", self.watch_dir)
            while not self.watch_dir.is_dir():
                if self._stop.wait(1.0):
                    return
            self.notify(None)
        observer = PollingObserver(timeout=self.config.poll_interval) if self.polling else Observer()
        observer.schedule(_Handler(self.watch_dir, self.notify, self.depth), str(self.watch_dir), recursive=True)
        observer.start()
        self._observer = observer
        log.info("watching %s with %s (%s)", self.watch_dir, "polling" if self.polling else "native events",
                 self.reason)
        self._stop.wait()
        observer.stop()
        observer.join(timeout=5)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
