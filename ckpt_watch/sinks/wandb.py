"""Weights & Biases sink (extra `wandb`): the MLflow sink's keys, `<suite>/<metric>` (versioned
`<suite>.vN/<metric>`), against the training step.

Out-of-order steps: W&B's own step (`_step`) must only grow within a run, and evaluations
arrive newest first with backfill later. So no point is ever logged with `step=`: the run
declares `define_metric(step_metric)` and `define_metric("*", step_metric=step_metric)`, and each
result is one `log({step_metric: step, key: value, ...})`, plotted at its step whatever the
order. The default axis, `train/global_step`, is the one HF Trainer's own W&B callback
declares, so on an attached trainer run our `*` definition is the trainer's, and the eval
curves share the x-axis of the training loss.

Durability: `write()` only inserts into a durable outbox (sinks/outbox.py, the MLflow sink's,
in its own file `wandb-outbox.sqlite`) and wakes the background flusher. A failing
`wandb.init` or `log` (an outage, a broken run directory) leaves the rows queued; they are
retried every `flush_seconds` and at the next start. Once `log()` has returned, W&B's own
transaction log (`<dir>/wandb/*/run-<id>.wandb`) holds the point and W&B uploads it (or
`wandb sync` does, offline). A row is marked sent only after `log()` returned; a process
killed in between re-sends it at the next start (W&B offers no cheap read-back to check, as
the MLflow sink does): at least once in that window, exactly once otherwise.

Run selection: `wandb.run_id` or `$WANDB_RUN_ID` attaches to the trainer's run
(`resume="allow"`). Otherwise one run per watched run, with an id derived from its run name,
so a restart (or `ckpt-watch eval` beside the daemon) resumes the same run. Project and
entity from the config, else `$WANDB_PROJECT` / `$WANDB_ENTITY`.

Secrets: the API key is W&B's own `$WANDB_API_KEY` (or its netrc); it is never read, passed or
logged here, and error texts go through `ckpt_watch.redact`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ckpt_watch.config import WandbConfig
from ckpt_watch.core import BASE_STEP, Checkpoint, CheckpointKind, SuiteResult
from ckpt_watch.redact import redact_text
from ckpt_watch.sinks.mlflow import _timestamp_ms
from ckpt_watch.sinks.outbox import METRIC, FlushReport, Outbox, Row, exclusive_flush

log = logging.getLogger(__name__)

OUTBOX_FILE = "wandb-outbox.sqlite"
DEFAULT_PROJECT = "ckpt-watch"
_BATCH = 1000
_INIT_TIMEOUT = 30.0  # seconds: an unreachable server fails one flush, the outbox retries


def run_id_for(run_name: str) -> str:
    """The W&B run id of a watched run: stable across restarts, valid as an id (hex)."""
    return "cw-" + hashlib.sha256(run_name.encode()).hexdigest()[:20]


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return redact_text(f"{type(exc).__name__}: {text}")[:2000]


def _groups(rows: list[Row]) -> Iterator[list[Row]]:
    """Rows of one result (same step and timestamp) together, in outbox order: one log() each."""
    current: list[Row] = []
    for row in rows:
        if current and ((row.step, row.ts) != (current[0].step, current[0].ts)
                        or any(r.key == row.key for r in current)):
            yield current
            current = []
        current.append(row)
    if current:
        yield current


class WandbSink:
    """`WandbSink(config, results_dir)`; `start(run_name, params)`; `write(checkpoint, result)`;
    `flush(timeout)` (synchronous, for tests and close); `close()`."""

    name = "wandb"

    def __init__(self, config: WandbConfig, results_dir: Path | str, *, close_timeout: float = 30.0,
                 background: bool = True):
        self.config = config
        self.results_dir = Path(results_dir).resolve()
        self.attach_run_id = config.run_id or os.environ.get("WANDB_RUN_ID") or None
        self.project = config.project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
        self.entity = config.entity or os.environ.get("WANDB_ENTITY") or None
        env_dir = os.environ.get("WANDB_DIR")
        self.dir = Path(config.dir or env_dir or self.results_dir).resolve()
        self.close_timeout = close_timeout
        self.finish_on_close = True  # kept for App's guest handling; W&B needs finish() to flush either way
        self.last_error: str | None = None
        self._background = background
        self._run_name: str | None = None
        self._params: dict[str, str] = {}
        self._outbox: Outbox | None = None
        self._run: Any = None
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._kick = threading.Event()
        self._thread: threading.Thread | None = None

    # -- Sink protocol -------------------------------------------------------------------------

    def start(self, run_name: str, params: dict[str, str]) -> None:
        self._run_name = run_name
        self._params = {str(k): redact_text(str(v)) for k, v in sorted(params.items())}
        self._outbox = Outbox(self.results_dir / run_name / OUTBOX_FILE)
        if self._background and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="wandb-flusher", daemon=True)
            self._thread.start()

    def write(self, checkpoint: Checkpoint, result: SuiteResult) -> None:
        """Queue the result's finite metrics durably; never talks to W&B."""
        ts = _timestamp_ms(result)
        step = BASE_STEP if checkpoint.kind is CheckpointKind.BASE else result.step
        rows = [(METRIC, f"{result.suite}/{name}", step, ts, value, None)
                for name, value in sorted(result.finite_metrics().items())]
        if rows:
            self._box().add(rows)
            self._kick.set()

    def close(self) -> None:
        """Stop the flusher, make a last flush and finish the W&B run, bounded by close_timeout."""
        deadline = time.monotonic() + self.close_timeout
        self._stop.set()
        self._kick.set()
        if self._thread is not None:
            self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if self._outbox is None:
            return
        report = self.flush(timeout=max(0.0, deadline - time.monotonic()))
        if report.pending:
            log.warning("%d W&B point(s) not delivered (%s); kept in %s and sent at the next start",
                        report.pending, report.error, self._outbox.path)
        self._finish(max(0.0, deadline - time.monotonic()))

    # -- public helpers ------------------------------------------------------------------------

    @property
    def run_id(self) -> str:
        return self.attach_run_id or run_id_for(self._run_name or "")

    def counts(self) -> dict[str, int]:
        return self._box().counts()

    def flush(self, timeout: float | None = None) -> FlushReport:
        """Deliver what is queued, until done or `timeout` seconds. Errors are returned (and kept
        in `last_error`), never raised: the outbox keeps the rows for the next try."""
        return exclusive_flush(self._box(), self._flush_lock, timeout, self._deliver)

    def _deliver(self, deadline: float | None) -> tuple[int, str | None]:
        box, sent, error = self._box(), 0, None
        try:
            while (rows := box.pending((METRIC,), _BATCH)) and (deadline is None or time.monotonic() < deadline):
                sent += self._send(rows)
        except Exception as exc:  # carried as data: last_error, FlushReport, the rows' last_error
            error = _describe(exc)
            self._drop_run()  # a run whose init or log failed is not trusted again
            if error != self.last_error:
                log.warning("W&B delivery failed (points stay queued): %s", error)
        self.last_error = error
        return sent, error

    # -- internals -----------------------------------------------------------------------------

    def _box(self) -> Outbox:
        if self._outbox is None:
            raise RuntimeError("WandbSink.start(run_name, params) must be called first")
        return self._outbox

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._kick.wait(self.config.flush_seconds)
            self._kick.clear()
            if self._stop.is_set():
                return
            self.flush(timeout=self.config.flush_seconds * 4)

    def _send(self, rows: list[Row]) -> int:
        run, box = self._ensure_run(), self._box()
        for group in _groups(rows):
            box.mark_attempted(group)
            try:
                run.log({self.config.step_metric: group[0].step, **{r.key: float(r.value or 0.0) for r in group}})
            except Exception as exc:
                box.mark_error(group, _describe(exc))
                raise
            box.mark_sent(group)
        return len(rows)

    def _ensure_run(self) -> Any:
        if self._run is not None:
            return self._run
        import wandb

        self.dir.mkdir(parents=True, exist_ok=True)
        name = self._run_name or ""
        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True, save_code=False,
                                  init_timeout=_INIT_TIMEOUT, x_label="ckpt-watch")
        kwargs: dict[str, Any] = {"project": self.project, "entity": self.entity, "dir": str(self.dir),
                                  "id": self.run_id, "resume": "allow", "reinit": "create_new",
                                  "settings": settings}
        if self.config.mode:
            kwargs["mode"] = self.config.mode
        if not self.attach_run_id:
            kwargs["name"] = name
        run = wandb.init(**kwargs)
        try:
            run.define_metric(self.config.step_metric)
            run.define_metric("*", step_metric=self.config.step_metric)
            # nested under one key: never clashes with an attached trainer's own config
            run.config.update({"ckpt_watch": {**self._params, "run_name": name}}, allow_val_change=True)
        except Exception:
            self._quiet_finish(run)
            raise
        log.info("W&B run %s (project %s)%s", run.id, self.project,
                 " attached" if self.attach_run_id else "")
        self._run = run
        return run

    def _drop_run(self) -> None:
        run, self._run = self._run, None
        if run is not None:
            self._quiet_finish(run)

    @staticmethod
    def _quiet_finish(run: Any) -> None:
        try:
            run.finish()
        except Exception as exc:
            log.warning("W&B run finish failed: %s", _describe(exc))

    def _finish(self, timeout: float) -> None:
        """finish() flushes W&B's own queue; bounded, since an unreachable server can hold it."""
        run, self._run = self._run, None
        if run is None:
            return
        done = threading.Thread(target=self._quiet_finish, args=(run,), name="wandb-finish", daemon=True)
        done.start()
        done.join(timeout=timeout)
        if done.is_alive():
            log.warning("W&B still uploading at shutdown; its local files hold the points (`wandb sync`)")
