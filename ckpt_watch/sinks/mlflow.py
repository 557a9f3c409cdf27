"""MLflow sink: metrics `<suite>/<metric>` at `step` = the checkpoint's global step, samples as
table artifacts, run-level params and tags.

`write()` only inserts into the durable outbox (sinks/outbox.py), wakes the background
flusher and returns; the flusher delivers at once, and retries every `flush_seconds`. If
MLflow is down, points wait in the outbox (surviving restarts) and go out once it is back.
The SDK's own HTTP retries are capped low in this process so one flush cannot hang for
minutes; the outbox is the long-term retry, not a second retry layer stacked on the SDK's.

Exactly once: see the protocol in sinks/outbox.py. For a row that may already have landed, the
sender reads MLflow back first (`get_metric_history` for a metric, the run's tags for a tag,
`list_artifacts` for a table) and only re-sends what is missing. Each point's timestamp comes
from the result (`finished_at`), so a re-send is byte-identical to the first try; MLflow's SQL
stores also ignore an identical (key, step, timestamp, value), which makes the check a second
line of defence there. "database is locked" from a SQLite store shared with the trainer arrives
as a TEMPORARILY_UNAVAILABLE error: the rows stay queued and the next flush retries them.

Run selection: `mlflow.run_id` or `$MLFLOW_RUN_ID` attaches to the trainer's run (params are
then prefixed `ckpt_watch.` so they cannot clash with the trainer's). Otherwise one run per
watched run, found again after a restart by the tag `ckpt_watch.run_name`.

Secrets: a tracking URI may carry credentials (`http://user:pw@host`, `postgresql://u:pw@h/db`,
`?token=`). Only the client sees the full URI; log lines, error texts (`last_error`, the outbox),
the outbox's run cache, params and error tags get `ckpt_watch.redact`'s redacted form.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import threading
import time
from datetime import datetime
from pathlib import Path

from mlflow.entities import Metric, Param, RunStatus, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ckpt_watch import __version__
from ckpt_watch.config import MlflowConfig
from ckpt_watch.core import BASE_STEP, Checkpoint, CheckpointKind, SuiteResult
from ckpt_watch.redact import redact_text, redact_url
from ckpt_watch.sinks.jsonfiles import jsonable
from ckpt_watch.sinks.outbox import METRIC, PARAMS, TABLE, TAG, FlushReport, Outbox, Row, exclusive_flush

log = logging.getLogger(__name__)

RUN_NAME_TAG = "ckpt_watch.run_name"
ATTACHED_PARAM_PREFIX = "ckpt_watch."
OUTBOX_FILE = "mlflow-outbox.sqlite"
# Per process, for the flusher: fail a request within seconds, not the SDK's ~4 minutes.
_HTTP_CAPS: dict[str, float] = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": 2,
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": 1,
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": 0.5,
    "MLFLOW_HTTP_REQUEST_TIMEOUT": 15,
}
_MAX_METRICS, _MAX_TAGS = 1000, 100  # MLflow's log_batch limits
_MAX_VALUE = 5000  # under MLflow's 6000 (param) / 8000 (tag) characters
# Error codes that mean "this request will never succeed": anything else is worth retrying.
_PERMANENT = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "BAD_REQUEST"}


def resolve_tracking_uri(config: MlflowConfig, results_dir: Path) -> str:
    """config.tracking_uri, else $MLFLOW_TRACKING_URI, else a SQLite file under results_dir —
    never MLflow's own default, which is resolved against whatever the current directory is."""
    if config.tracking_uri:
        return config.tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    db = Path(results_dir).resolve() / "mlflow.db"
    return f"sqlite:///{db}"


def _cap_http_retries() -> None:
    for name, cap in _HTTP_CAPS.items():
        current = os.environ.get(name)
        try:
            keep = current is not None and float(current) <= cap
        except ValueError:
            keep = False
        if not keep:
            os.environ[name] = str(int(cap)) if float(cap).is_integer() else str(cap)


def _timestamp_ms(result: SuiteResult) -> int:
    for stamp in (result.finished_at, result.started_at):
        if stamp:
            try:
                return int(datetime.fromisoformat(stamp).timestamp() * 1000)
            except ValueError:
                continue
    return int(time.time() * 1000)


def _is_permanent(exc: Exception) -> bool:
    return isinstance(exc, MlflowException) and exc.error_code in _PERMANENT


def _describe(exc: Exception) -> str:
    """One line for logs, the outbox and `last_error`; URLs in it lose their credentials."""
    return redact_text(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")[:_MAX_VALUE]


class MlflowSink:
    """`MlflowSink(config, results_dir)`; `start(run_name, params)`; `write(checkpoint, result)`;
    `flush(timeout)` (synchronous, for tests and close); `close()`."""

    name = "mlflow"

    def __init__(self, config: MlflowConfig, results_dir: Path | str, *, close_timeout: float = 30.0,
                 background: bool = True):
        self.config = config
        self.results_dir = Path(results_dir).resolve()
        self.tracking_uri = resolve_tracking_uri(config, self.results_dir)
        # what logs and the outbox's run cache see: the URI without its password or tokens
        self.display_uri = redact_url(self.tracking_uri)
        self.attach_run_id = config.run_id or os.environ.get("MLFLOW_RUN_ID") or None
        self.close_timeout = close_timeout
        # False for a guest process (`eval` beside a daemon): the daemon still logs into this run
        self.finish_on_close = True
        self.last_error: str | None = None
        self._background = background
        self._run_name: str | None = None
        self._run_id: str | None = None
        self._outbox: Outbox | None = None
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._kick = threading.Event()  # set by write(): deliver now, not at the next period
        self._thread: threading.Thread | None = None
        self._client: MlflowClient | None = None

    # -- Sink protocol -------------------------------------------------------------------------

    def start(self, run_name: str, params: dict[str, str]) -> None:
        _cap_http_retries()
        self._run_name = run_name
        self._outbox = Outbox(self.results_dir / run_name / OUTBOX_FILE)
        # a value may hold a URL with credentials (an endpoint, a DSN): params keep only the redacted form
        self._outbox.put_params(json.dumps({str(k): redact_text(str(v)) for k, v in sorted(params.items())}))
        if self._background and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="mlflow-flusher", daemon=True)
            self._thread.start()

    def write(self, checkpoint: Checkpoint, result: SuiteResult) -> None:
        """Queue the result's points durably; never talks to MLflow."""
        ts = _timestamp_ms(result)
        step = BASE_STEP if checkpoint.kind is CheckpointKind.BASE else result.step
        rows: list[tuple[str, str, int, int, float | None, str | None]] = [
            (METRIC, f"{result.suite}/{name}", step, ts, value, None)
            for name, value in sorted(result.finite_metrics().items())
        ]
        if result.error:
            # A failure is data: visible on the run, not just a gap in the curve.
            rows.append((TAG, f"ckpt_watch.error.{result.suite}.step-{step}", step, ts, None,
                         redact_text(result.error)[:_MAX_VALUE]))
        if self.config.log_samples and result.samples:
            rows.append((TABLE, f"samples/{result.suite}/step-{step}.json", step, ts, None,
                         json.dumps(jsonable(result.samples))))
        rows.extend(self._summary_rows(result.suite, step))
        self._box().add(rows)
        self._kick.set()

    def _summary_rows(self, suite: str, step: int) -> list[tuple[str, str, int, int, float | None, str | None]]:
        """The run summary (ckpt_watch/summary.py) as run tags `ckpt_watch.summary.*`, from the
        metrics.jsonl the JSON sink (first in the sink list) has just updated. The tags of the
        suite just written and the run-wide figures only; stamped now, so each write's tags are
        new outbox rows and the latest one wins."""
        from ckpt_watch.summary import build_summary, summary_tags

        run_dir = self.results_dir / (self._run_name or "")
        if not (run_dir / "metrics.jsonl").is_file():
            return []
        now = int(time.time() * 1000)
        tags = summary_tags(build_summary(run_dir), suite=suite)
        return [(TAG, key, step, now, None, value) for key, value in sorted(tags.items())]

    def close(self) -> None:
        """Stop the flusher and make a last flush, bounded by close_timeout in total."""
        deadline = time.monotonic() + self.close_timeout
        self._stop.set()
        self._kick.set()
        if self._thread is not None:
            self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
            if self._thread.is_alive():
                log.warning("MLflow flusher still busy at shutdown; queued points stay in the outbox")
        if self._outbox is None:
            return
        report = self.flush(timeout=max(0.0, deadline - time.monotonic()))
        if report.pending:
            log.warning("%d MLflow point(s) not delivered (%s); kept in %s and sent at the next start",
                        report.pending, report.error, self._outbox.path)
        elif self._run_id and not self.attach_run_id and report.error is None and self.finish_on_close:
            # Our own run is done for now; start() reopens it if the daemon comes back.
            try:
                self._mlflow().set_terminated(self._run_id, RunStatus.to_string(RunStatus.FINISHED))
            except MlflowException as exc:
                log.warning("could not mark MLflow run %s finished: %s", self._run_id, _describe(exc))

    # -- public helpers ------------------------------------------------------------------------

    @property
    def run_id(self) -> str | None:
        return self._run_id

    def counts(self) -> dict[str, int]:
        return self._box().counts()

    def flush(self, timeout: float | None = None) -> FlushReport:
        """Deliver what is queued, until done or `timeout` seconds. Errors are returned (and kept
        in `last_error`), never raised: the outbox keeps the rows for the next try."""
        return exclusive_flush(self._box(), self._flush_lock, timeout, self._deliver)

    def _deliver(self, deadline: float | None) -> tuple[int, str | None]:
        box, sent, error = self._box(), 0, None
        try:
            run_id = self._ensure_run()
            sent += self._send_params(run_id)
            for kinds, limit in (((METRIC,), _MAX_METRICS), ((TAG,), _MAX_TAGS)):
                while (rows := box.pending(kinds, limit)) and (deadline is None or time.monotonic() < deadline):
                    sent += self._send_batch(run_id, rows)
            while (rows := box.pending((TABLE,), 1)) and (deadline is None or time.monotonic() < deadline):
                sent += self._send_table(run_id, rows[0])
        except Exception as exc:  # carried as data: last_error, FlushReport, the rows' last_error
            error = _describe(exc)
            if error != self.last_error:  # once per distinct error, not every flush_seconds
                log.warning("MLflow flush to %s failed (points stay queued): %s", self.display_uri, error)
        self.last_error = error
        return sent, error

    # -- internals -----------------------------------------------------------------------------

    def _box(self) -> Outbox:
        if self._outbox is None:
            raise RuntimeError("MlflowSink.start(run_name, params) must be called first")
        return self._outbox

    def _mlflow(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _loop(self) -> None:
        # A new result is delivered as soon as write() queues it (freshness: the period alone
        # added flush_seconds / 2 on average); the period remains the retry tick while MLflow is down.
        while not self._stop.is_set():
            self._kick.wait(self.config.flush_seconds)
            self._kick.clear()
            if self._stop.is_set():
                return
            self.flush(timeout=self.config.flush_seconds * 4)

    def _ensure_run(self) -> str:
        if self._run_id is not None:
            return self._run_id
        client, box, name = self._mlflow(), self._box(), self._run_name or ""
        if self.attach_run_id:
            run = client.get_run(self.attach_run_id)  # missing run: the error names it, rows wait
            if run.info.lifecycle_stage != "active":
                raise MlflowException(f"MLflow run {self.attach_run_id} to attach to is deleted")
            client.log_batch(self.attach_run_id, tags=[RunTag(RUN_NAME_TAG, name)])
            box.requeue(PARAMS)
            self._run_id = self.attach_run_id
            return self._run_id
        run_id = box.cached_run(self.display_uri, self.config.experiment, name)
        if run_id is not None:
            try:
                alive = client.get_run(run_id).info.lifecycle_stage == "active"
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                alive = False
            if not alive:  # deleted in the UI: look again / start a new run
                box.cache_run(self.display_uri, self.config.experiment, name, None)
                run_id = None
        if run_id is None:
            run_id = self._find_or_create_run(client, name)
            box.cache_run(self.display_uri, self.config.experiment, name, run_id)
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        box.requeue(PARAMS)  # a new process or a new run: check the params once more (cheap, idempotent)
        self._run_id = run_id
        return run_id

    def _find_or_create_run(self, client: MlflowClient, name: str) -> str:
        exp = client.get_experiment_by_name(self.config.experiment)
        if exp is None:
            try:
                exp_id = client.create_experiment(self.config.experiment, artifact_location=self._artifact_root())
            except MlflowException as exc:  # created meanwhile by another process
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp_id = client.get_experiment_by_name(self.config.experiment).experiment_id
        else:
            exp_id = exp.experiment_id
        quote = "'" if "'" not in name else '"'
        runs = client.search_runs(
            [exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = {quote}{name}{quote}",
            run_view_type=ViewType.ACTIVE_ONLY, order_by=["attributes.start_time ASC"], max_results=1,
        )
        if runs:
            return runs[0].info.run_id
        tags = {RUN_NAME_TAG: name, "ckpt_watch.version": __version__}
        return client.create_run(exp_id, run_name=name, tags=tags).info.run_id

    def _artifact_root(self) -> str | None:
        # A local SQLite store otherwise puts artifacts under ./mlruns of the current directory.
        if self.tracking_uri.startswith("sqlite:///"):
            db = Path(self.tracking_uri.removeprefix("sqlite:///"))
            return (db.parent / "mlartifacts").as_uri() if db.is_absolute() else None
        return None

    def _send_params(self, run_id: str) -> int:
        box, client = self._box(), self._mlflow()
        rows = box.pending((PARAMS,), 1)
        if not rows:
            return 0
        wanted: dict[str, str] = json.loads(rows[0].payload or "{}")
        if self.attach_run_id:
            wanted = {ATTACHED_PARAM_PREFIX + k: v for k, v in wanted.items()}
        have = client.get_run(run_id).data.params
        new = sorted((k, v[:_MAX_VALUE]) for k, v in wanted.items() if k not in have)
        # MLflow params are immutable: a value changed since the run began goes in a tag instead.
        changed = [RunTag(f"ckpt_watch.changed_param.{k}", v[:_MAX_VALUE]) for k, v in sorted(wanted.items())
                   if k in have and have[k] != v[:_MAX_VALUE]]
        try:
            for i in range(0, max(len(new), 1), _MAX_TAGS):
                client.log_batch(run_id, params=[Param(k, v) for k, v in new[i:i + _MAX_TAGS]],
                                 tags=changed if i == 0 else [])
        except MlflowException as exc:
            if not _is_permanent(exc) or not self._run_alive(run_id):
                raise
            # A refused param (bad key…) must not hold back every metric behind it.
            box.mark_failed(rows[0], _describe(exc))
            log.error("MLflow refused the run params: %s", _describe(exc))
            return 0
        box.mark_sent(rows)
        return 1

    def _send_batch(self, run_id: str, rows: list[Row]) -> int:
        box, client = self._box(), self._mlflow()
        landed = self._already_landed(run_id, [r for r in rows if r.maybe_sent])
        todo = [r for r in rows if r.id not in landed]
        box.mark_attempted(todo)
        try:
            _log_rows(client, run_id, todo)
        except MlflowException as exc:
            box.mark_error(todo, _describe(exc))
            if not _is_permanent(exc) or not self._run_alive(run_id):
                raise
            # One bad row must not hold back the rest: send one by one, set aside the refused.
            for row in todo:
                try:
                    _log_rows(client, run_id, [row])
                except MlflowException as row_exc:
                    if not _is_permanent(row_exc):
                        raise
                    box.mark_failed(row, _describe(row_exc))
                    log.error("MLflow refused %s %s at step %d: %s", row.kind, row.key, row.step, _describe(row_exc))
                else:
                    box.mark_sent([row])
            box.mark_sent([r for r in rows if r.id in landed])
            return len(rows)
        box.mark_sent(rows)
        return len(rows)

    def _run_alive(self, run_id: str) -> bool:
        """False (and the run forgotten, so the next flush finds or creates one) when the run was
        deleted under us: then every row would be refused, and none of them is at fault."""
        try:
            alive = self._mlflow().get_run(run_id).info.lifecycle_stage == "active"
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            alive = False
        if not alive:
            self._run_id = None
            self._box().cache_run(self.display_uri, self.config.experiment, self._run_name or "", None)
        return alive

    def _already_landed(self, run_id: str, rows: list[Row]) -> set[int]:
        """Ids of maybe-sent rows that MLflow already holds (so they are not written twice)."""
        if not rows:
            return set()
        client, landed = self._mlflow(), set()
        histories: dict[str, set[tuple[int, int, float]]] = {}
        tags = client.get_run(run_id).data.tags if any(r.kind == TAG for r in rows) else {}
        for row in rows:
            if row.kind == TAG:
                if tags.get(row.key) == row.payload:
                    landed.add(row.id)
                continue
            if row.key not in histories:
                histories[row.key] = {(m.step, m.timestamp, m.value)
                                      for m in client.get_metric_history(run_id, row.key)}
            if (row.step, row.ts, row.value) in histories[row.key]:
                landed.add(row.id)
        return landed

    def _send_table(self, run_id: str, row: Row) -> int:
        box, client = self._box(), self._mlflow()
        folder = posixpath.dirname(row.key)
        existing = {f.path for f in client.list_artifacts(run_id, folder)}
        if row.maybe_sent and row.key in existing:
            box.mark_sent([row])  # landed before a crash; log_table would append a second copy
            return 1
        if row.key in existing:
            # A re-evaluation of the same step: keep the earlier table, add this one beside it.
            stem = row.key.removesuffix(".json")
            n = 2
            while f"{stem}-{n}.json" in existing:
                n += 1
            row = box.rename(row, f"{stem}-{n}.json")
        box.mark_attempted([row])
        import pandas as pd  # only needed here; pandas comes with mlflow

        frame = pd.DataFrame(json.loads(row.payload or "[]"))
        if "step" not in frame.columns:
            frame.insert(0, "step", row.step)  # so tables of several steps can be told apart
        client.log_table(run_id, data=frame, artifact_file=row.key)
        box.mark_sent([row])
        return 1


def _log_rows(client: MlflowClient, run_id: str, rows: list[Row]) -> None:
    if not rows:
        return
    metrics = [Metric(r.key, float(r.value or 0.0), r.ts, r.step) for r in rows if r.kind == METRIC]
    tags = [RunTag(r.key, r.payload or "") for r in rows if r.kind == TAG]
    client.log_batch(run_id, metrics=metrics, tags=tags)
