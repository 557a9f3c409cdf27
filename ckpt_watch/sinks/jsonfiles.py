"""JSON sink: one file per (step, suite) plus a `metrics.jsonl` index per run.

Layout (DESIGN §2, a user-facing contract):

    <results_dir>/<run_name>/step-<N>/<suite>.json   full record, samples included
    <results_dir>/<run_name>/metrics.jsonl           one line per (step, suite), no samples

Every file is replaced atomically (temp file in the same directory, fsync, os.replace, fsync of
the directory), so a reader or a crash never sees half a file.

metrics.jsonl idempotence: the file is rewritten atomically with the line for (step, suite)
replaced (or added, lines sorted by step then suite) instead of appended. A plain append is not
atomic (a crash leaves a torn line) and, after a crash between the write and the ledger update,
the daemon re-writes the same result: rewriting keyed by (step, suite) makes that a no-op, and a
later re-evaluation of the same (step, suite) replaces the stale line, so the file always holds
exactly one line per (step, suite), matching the step files. The cost is O(lines) per write,
which stays small (checkpoints × suites, a few hundred bytes each). Readers that follow the file
should use `tail -F` (follow by name), since the inode changes on every write.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from ckpt_watch.core import BASE_STEP, Checkpoint, CheckpointKind, SuiteResult

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


class SinkWriteError(OSError):
    """A result could not be stored (disk full, permissions…). Keeps the errno so callers can
    tell a full disk (errno.ENOSPC / EDQUOT) from other failures; the message says what to do."""


def jsonable(value: Any) -> Any:
    """Strict JSON: NaN/inf become null (jq and JSON.parse reject bare NaN); paths and enums
    become strings. The key stays, so a non-finite metric is visible rather than missing."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | str):
        return value
    return str(value)


def _umask() -> int:
    # mkstemp creates 0600 files; results should get the usual mode. Reading the umask from
    # /proc avoids os.umask()'s set-and-restore, which races with other threads.
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return 0o022  # no /proc (not Linux): the usual default
    for line in status.splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    return 0o022


_FILE_MODE = 0o666 & ~_umask()


def _fsync_dir(path: Path) -> None:
    # The rename is only durable once the directory entry is on disk.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` atomically; raises SinkWriteError (errno kept) on failure."""
    tmp_name: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            os.fchmod(fh.fileno(), _FILE_MODE)
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
        _fsync_dir(path.parent)
    except OSError as exc:
        if exc.errno in _DISK_FULL:
            hint = "disk full: free space on that filesystem (or move results_dir), then restart"
        else:
            hint = exc.strerror or str(exc)
        raise SinkWriteError(exc.errno or errno.EIO, f"cannot write result file {path}: {hint}") from exc
    finally:
        if tmp_name is not None:
            # Leave no half-written temp file behind (it would fill the disk further).
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)


def result_record(run: str, checkpoint: Checkpoint, result: SuiteResult) -> dict[str, Any]:
    """The full per-(step, suite) record, as stored in step-<N>/<suite>.json."""
    is_base = checkpoint.kind is CheckpointKind.BASE
    return jsonable(
        {
            "run": run,
            "step": BASE_STEP if is_base else result.step,
            "checkpoint": "base" if is_base or checkpoint.path is None else str(checkpoint.path),
            "suite": result.suite,
            "status": str(result.status),
            "metrics": dict(result.metrics),
            "error": result.error,
            "samples": list(result.samples),
            "started_at": result.started_at,
            "finished_at": result.finished_at,
            "n_scored": result.n_scored,
            "n_unscored": result.n_unscored,
            "info": dict(result.info),
        }
    )


def _index_line(record: dict[str, Any]) -> dict[str, Any]:
    # The index is for plotting and grepping: everything but the (large) samples.
    return {k: v for k, v in record.items() if k != "samples"}


class JsonSink:
    """Writes results under `results_dir`; see the module docstring for the layout."""

    name = "json"

    def __init__(self, results_dir: Path | str):
        self.results_dir = Path(results_dir).resolve()
        self._run: str | None = None

    @property
    def run_dir(self) -> Path:
        if self._run is None:
            raise RuntimeError("JsonSink.start(run_name, params) must be called before writing")
        return self.results_dir / self._run

    def start(self, run_name: str, params: dict[str, str]) -> None:
        if not run_name or "/" in run_name or run_name in {".", ".."}:
            raise ValueError(f"run name {run_name!r} cannot be used as a folder name")
        self._run = run_name
        # Run-level params next to the results, so a results folder explains itself.
        atomic_write_text(self.run_dir / "params.json", json.dumps(jsonable(params), indent=2, sort_keys=True) + "\n")

    def step_file(self, step: int, suite: str) -> Path:
        return self.run_dir / f"step-{step}" / f"{suite}.json"

    def write(self, checkpoint: Checkpoint, result: SuiteResult) -> None:
        record = result_record(self.run_dir.name, checkpoint, result)
        # Step file first: metrics.jsonl then never names a result whose full record is missing.
        atomic_write_text(self.step_file(record["step"], result.suite), json.dumps(record, indent=2) + "\n")
        self._upsert_index(_index_line(record))

    def _upsert_index(self, line: dict[str, Any]) -> None:
        path = self.run_dir / METRICS_FILE
        key = (line["step"], line["suite"])
        rows = read_metrics(path)
        by_key = {(r.get("step"), r.get("suite")): r for r in rows}
        if by_key.get(key) == line:
            return  # the same result written again (crash/restart before the ledger update)
        by_key[key] = line
        ordered = sorted(by_key.values(), key=lambda r: (int(r.get("step") or 0), str(r.get("suite"))))
        text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in ordered)
        atomic_write_text(path, text)

    def close(self) -> None:
        """Nothing buffered: every write is already durable."""


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Read a metrics.jsonl. Lines that do not parse (only possible if another tool appended to
    the file) are skipped rather than failing the run; they disappear at the next rewrite."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    rows = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as exc:
            log.warning("%s:%d is not JSON (%s); dropped at the next rewrite", path, lineno, exc)
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
