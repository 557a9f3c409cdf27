"""The Sink protocol. A sink receives each finished SuiteResult exactly once per (step, suite).

`write` must not block evaluation for long: a remote sink queues durably and flushes in
the background (see sinks/mlflow.py). `close` flushes what it can.
"""

from __future__ import annotations

from typing import Protocol

from ckpt_watch.core import Checkpoint, SuiteResult


class Sink(Protocol):
    name: str

    def start(self, run_name: str, params: dict[str, str]) -> None:
        """Called once before the first result, with run-level params (engine, base model…)."""
        ...

    def write(self, checkpoint: Checkpoint, result: SuiteResult) -> None: ...

    def close(self) -> None: ...
