"""Progress of long suites: a rich progress bar on a terminal, sparse log lines otherwise.

Under systemd/journald (no TTY) a bar would be noise; a line every `every_seconds` (and
at completion) says the same thing.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

log = logging.getLogger("ckpt_watch.progress")

Reporter = Callable[[str, int, int], None]  # (label "step-N/suite", done, total)


class LogProgress:
    def __init__(self, every_seconds: float = 15.0):
        self.every = every_seconds
        self._last: dict[str, float] = {}

    def __call__(self, label: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done >= total or now - self._last.get(label, 0.0) >= self.every:
            self._last[label] = now
            log.info("%s: %d/%d", label, done, total)

    def close(self) -> None:
        self._last.clear()


class RichProgress:
    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=Console(stderr=True), transient=True,
        )
        self._tasks: dict[str, int] = {}
        self._progress.start()

    def __call__(self, label: str, done: int, total: int) -> None:
        if label not in self._tasks:
            self._tasks[label] = self._progress.add_task(label, total=total)
        self._progress.update(self._tasks[label], completed=done, total=total)
        if done >= total:
            self._progress.remove_task(self._tasks.pop(label))

    def close(self) -> None:
        self._progress.stop()


def make_progress() -> LogProgress | RichProgress:
    return RichProgress() if sys.stderr.isatty() else LogProgress()
