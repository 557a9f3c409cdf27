"""`ckpt-watch status`: is it keeping up? One look at a results dir, for a person or a script.

`gather(results_dir)` reads what is on disk — the ledger, the run locks under `.locks/`, each
run's `metrics.jsonl` (summary.py's latest / base figures), its MLflow outbox and the daemon's
heartbeat — into one JSON-ready dict; `render(status, console)` prints it with rich;
`ckpt-watch status --json` prints the dict. Nothing here loads a model, imports torch or vLLM,
or contacts the judge or MLflow.

The daemon's heartbeat, `<results_dir>/<run>/status.json`, is written by `Heartbeat` (daemon.py)
every `HEARTBEAT_SECONDS` and whenever its state changes: what it is doing and its engine.

JSON schema (`schema: 1`; fields are only ever added, a change of meaning bumps `schema`).
Times are ISO 8601 UTC strings; a value that is not known is null.

    {"schema": 1, "generated_at": T, "results_dir": PATH,
     "runs": [{                              # every run in the ledger (or the one --run names)
       "run": "r1", "watched_run": "r1", "training": 1, "trainings": 1,
       "current": true,                      # the newest training of its watched run
       "started_because": null,              # why a retraining (run `<base>-t2`) began
       "process": {"running": true, "mode": "daemon" | "oneshot" | null, "pid": 123,
                   "since": T, "daemon": true},  # who holds the run's lock now
       "engine": null | {"state": "idle; …", "kind": "hf" | "vllm", "status": TEXT,
                         "url": URL (credentials redacted) | null, "server_pid": N | null,
                         "pid": N, "mode": …, "updated_at": T, "age_seconds": S,
                         "live": bool},      # the heartbeat's writer still holds the lock
       "checkpoints": {
         "counts": {"ready": 3, "seen": 0, "failed": 0, "vanished": 0, "stale": 0},
         "newest_complete": null | {"step": 6, "at": T},       # newest ready checkpoint
         "newest_evaluated": null | {"step": 4, "at": T, "finished_at": T},
         "lag_steps": 2 | null, "lag_minutes": 0.4 | null,     # newest_complete − newest_evaluated
         "waiting": [6],                     # complete checkpoints not fully evaluated
         "not_ready": [{"step", "state", "attempts", "error", "path"}]},
       "backlog": {"pending": 1, "running": 0},
       "suites": {KEY: {"name": NAME, "type": T, "config": HASH8, "version": 1,
                        "counts": {"pending", "running", "done", "failed", "skipped"},
                        "headline": {METRIC: {"latest": x, "base": x, "delta": x}},
                        "latest_step": 6 | null}},
       "failed": [{"step", "suite", "attempts", "error", "at"}],
       "skipped": [{"suite", "reason", "count", "steps", "example"}],
       "running": [{"step", "suite", "pid", "alive", "since"}],
       "outbox": null | {"pending_points": n, "pending_other": n, "sent": n, "refused": n,
                         "oldest_pending_at": T, "last_error": TEXT},
       "schedules": [{"suite", "max_steps", "targets"}]}]}

A checkpoint is *fully evaluated* when none of its evaluations is pending, running or failed
(skipped ones are not due). Lag is between the newest complete checkpoint and the newest fully
evaluated one: steps, and minutes between the moments each became complete. A suite's
*headline* metrics are its class's `headline` keys (1–3), else its first metric.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ckpt_watch.core import BASE_STEP, utcnow
from ckpt_watch.errors import ConfigError
from ckpt_watch.sinks.jsonfiles import METRICS_FILE, read_metrics
from ckpt_watch.summary import suite_summaries, suite_type

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
HEARTBEAT_FILE = "status.json"
HEARTBEAT_SECONDS = 10.0
LEDGER_FILE = "ledger.sqlite"
OUTBOX_FILE = "mlflow-outbox.sqlite"  # = sinks.mlflow.OUTBOX_FILE (not imported: that imports mlflow)
EVAL_STATES = ("pending", "running", "done", "failed", "skipped")
CKPT_STATES = ("ready", "seen", "failed", "vanished", "stale")


class StatusError(Exception):
    """Nothing to show: no ledger under the results dir, or no such run."""


# -- the daemon's heartbeat ----------------------------------------------------------------


class Heartbeat:
    """`<results_dir>/<run>/status.json`, rewritten by the lock holder (a guest beside a daemon
    writes none). A failed write (disk full) is logged at DEBUG and never raised."""

    def __init__(self, app: Any):
        self.app = app
        self.state = "starting"

    def beat(self, state: str | None = None) -> None:
        if state is not None:
            self.state = state
        app = self.app
        if app.guest or app.ledger is None:
            return
        from ckpt_watch.sinks.jsonfiles import atomic_write_text

        try:
            atomic_write_text(app.paths.results / app.run / HEARTBEAT_FILE, json.dumps(self.record(), indent=2))
        except OSError as exc:
            log.debug("heartbeat not written: %s", exc)

    def record(self) -> dict[str, Any]:
        app = self.app
        return {"schema": SCHEMA_VERSION, "pid": os.getpid(), "mode": app.mode, "run": app.run,
                "watched_run": app.base_run, "state": self.state, "updated_at": utcnow(),
                "engine": engine_record(app)}

    async def every(self, seconds: float = HEARTBEAT_SECONDS) -> None:
        while True:
            self.beat()
            await asyncio.sleep(seconds)


def engine_record(app: Any) -> dict[str, Any]:
    """Engine kind, what it says of itself, its URL (redacted) and a managed server's pid."""
    from ckpt_watch.redact import redact_text, redact_url

    engine = app.engine
    default = "ready" if app.evaluator is not None else "not started"
    status = getattr(engine, "status", None) or default
    url = getattr(engine, "base_url", None) if engine is not None else None
    server = getattr(engine, "server", None)
    return {"kind": app.config.engine.kind, "status": redact_text(str(status)),
            "url": redact_url(str(url)) if url else None, "server_pid": getattr(server, "pid", None)}


# -- where the results are -------------------------------------------------------------------


def results_dir_of(config_path: Path) -> tuple[Path, list[str]]:
    """The results dir a config names, and notes on problems status does not care about: a
    judge key that is not set, a `${VAR}` elsewhere that is unset, an engine that is not
    installed here. Only an unreadable file or an unusable `results_dir` is a ConfigError."""
    from ckpt_watch.config import interpolate_env, load_config

    try:
        return Path(load_config(config_path).results_dir).resolve(), []
    except ConfigError as exc:
        first = exc
    try:
        import yaml

        raw = yaml.safe_load(Path(config_path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        raise first from None
    if not isinstance(raw, dict):
        raise first
    missing: list[tuple[str, str]] = []
    value = interpolate_env(raw.get("results_dir", "results"), "results_dir", missing)
    if missing or not isinstance(value, str | Path) or not str(value):
        raise ConfigError(missing or [("results_dir", "must be a path")])
    notes = [f"{path}: {why}" for path, why in first.errors]
    return Path(value).resolve(), notes


# -- gathering -------------------------------------------------------------------------------


def gather(results_dir: Path, run: str | None = None, now: datetime | None = None) -> dict[str, Any]:
    """The status of every run in `results_dir` (or of `run`). Raises StatusError."""
    from ckpt_watch.ledger import Ledger

    results = Path(results_dir).resolve()
    path = results / LEDGER_FILE
    if not path.is_file():
        raise StatusError(f"no ledger yet at {path}: nothing has run with these results")
    now = now or datetime.now(UTC)
    ledger = Ledger(path)
    try:
        runs = ledger.runs()
        if run is not None:
            if run not in runs:
                raise StatusError(f"no run '{run}' in {path}; runs: {', '.join(runs) or 'none'}")
            runs = [run]
        with _read_only(path) as db:
            found = [_run_status(ledger, db, results, r, now) for r in runs]
    finally:
        ledger.close()
    return {"schema": SCHEMA_VERSION, "generated_at": _iso(now), "results_dir": str(results), "runs": found}


@contextlib.contextmanager
def _read_only(path: Path) -> Iterator[sqlite3.Connection]:
    db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=30)
    try:
        yield db
    finally:
        db.close()


def _run_status(ledger: Any, db: sqlite3.Connection, results: Path, run: str, now: datetime) -> dict[str, Any]:
    from ckpt_watch.locking import holder_of

    base = ledger.base_of(run)
    trainings = ledger.trainings(base)
    current = trainings[-1][1] == run
    holder = holder_of(results, base)
    process = {"running": holder is not None, "mode": (holder or {}).get("mode"), "pid": (holder or {}).get("pid"),
               "since": (holder or {}).get("since"), "daemon": (holder or {}).get("mode") == "daemon"}
    evals = ledger.evals(run)
    keys = _suite_keys(ledger, run)
    rows = read_metrics(results / run / METRICS_FILE)
    return {
        "run": run, "watched_run": base,
        "training": next((g for g, r, _ in trainings if r == run), 1), "trainings": len(trainings),
        "current": current, "started_because": next((why for _g, r, why in trainings if r == run), None),
        "process": process,
        "engine": _engine(results / run, holder, now) if current else None,
        "checkpoints": _checkpoints(ledger, db, run, evals),
        "backlog": {s: sum(r.state == s for r in evals) for s in ("pending", "running")},
        "suites": _suites(evals, keys, rows),
        "failed": [{"step": r.step, "suite": keys.get((r.suite, r.suite_hash), r.suite), "attempts": r.attempts,
                    "error": r.error, "at": r.updated_at} for r in evals if r.state == "failed"],
        "skipped": _skipped(evals, keys),
        "running": _running(db, results, run, keys),
        "outbox": _outbox(results / run / OUTBOX_FILE),
        "schedules": [{"suite": s, "max_steps": m, "targets": t} for s, m, t in ledger.schedules(run)],
    }


def _suite_keys(ledger: Any, run: str) -> dict[tuple[str, str], str]:
    """(suite, hash) → its result name: `arc`, or `arc.v2` for the second configuration."""
    return {(s, h): s if v <= 1 else f"{s}.v{v}" for s, h, v in ledger.suite_versions(run)}


def _engine(run_dir: Path, holder: dict | None, now: datetime) -> dict[str, Any] | None:
    try:
        beat = json.loads((run_dir / HEARTBEAT_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(beat, dict):
        return None
    engine = beat.get("engine") or {}
    updated = _parse(beat.get("updated_at"))
    return {"state": beat.get("state"), "kind": engine.get("kind"), "status": engine.get("status"),
            "url": engine.get("url"), "server_pid": engine.get("server_pid"), "pid": beat.get("pid"),
            "mode": beat.get("mode"), "updated_at": beat.get("updated_at"),
            "age_seconds": round((now - updated).total_seconds(), 1) if updated else None,
            "live": holder is not None and holder.get("pid") == beat.get("pid")}


def _checkpoints(ledger: Any, db: sqlite3.Connection, run: str, evals: list[Any]) -> dict[str, Any]:
    rows = [r for r in ledger.checkpoints(run) if r.step != BASE_STEP]
    ready_at = dict(db.execute("SELECT step, updated_at FROM checkpoints WHERE run=? AND state='ready'", (run,)))
    open_steps = {r.step for r in evals if r.state in ("pending", "running", "failed")}
    ready = sorted(r.step for r in rows if r.state == "ready")
    done = [s for s in ready if s not in open_steps]
    newest, evaluated = (ready[-1] if ready else None), (done[-1] if done else None)
    lag_steps = lag_minutes = None
    if newest is not None and evaluated is not None:
        lag_steps = newest - evaluated
        a, b = _parse(ready_at.get(newest)), _parse(ready_at.get(evaluated))
        lag_minutes = round((a - b).total_seconds() / 60, 2) if a and b else None
    finished = [r.finished_at for r in evals if r.step == evaluated and r.finished_at]
    return {
        "counts": {s: sum(r.state == s for r in rows) for s in CKPT_STATES},
        "newest_complete": None if newest is None else {"step": newest, "at": ready_at.get(newest)},
        "newest_evaluated": None if evaluated is None else {
            "step": evaluated, "at": ready_at.get(evaluated), "finished_at": max(finished, default=None)},
        "lag_steps": lag_steps, "lag_minutes": lag_minutes,
        "waiting": [s for s in ready if s in open_steps and (evaluated is None or s > evaluated)],
        "not_ready": [{"step": r.step, "state": str(r.state), "attempts": r.attempts, "error": r.error,
                       "path": r.path} for r in rows if r.state != "ready"],
    }


def headline_of(suite_type: str, metrics: list[str]) -> list[str]:
    """The suite class's `headline` keys that it reported, else its first metric (per-persona /
    per-question keys `a/b` last)."""
    from ckpt_watch.suites.base import suite_types

    st = suite_types().get(suite_type)
    wanted = [k for k in getattr(st.factory if st else None, "headline", ()) if k in metrics]
    if wanted:
        return wanted[:3]
    ordered = sorted(metrics, key=lambda k: ("/" in k, k))
    return ordered[:1]


def _suites(evals: list[Any], keys: dict[tuple[str, str], str], results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per result name: counts by state, and latest / base of the headline metrics (summary.py's
    figures, from the run's metrics.jsonl; a suite's type from its rows, failed ones too)."""
    summary = suite_summaries(results)
    types = {str(r.get("suite")): suite_type(r) for r in results}
    out: dict[str, Any] = {}
    versions = {k: (s, h) for (s, h), k in keys.items()}
    for key in sorted(set(keys.values()) | {keys.get((r.suite, r.suite_hash), r.suite) for r in evals}
                      | set(summary)):
        rows = [r for r in evals if keys.get((r.suite, r.suite_hash), r.suite) == key]
        s = summary.get(key) or {}
        metrics = s.get("metrics") or {}
        kind = s.get("type") or types.get(key) or re.sub(r"\.v\d+$", "", key)
        name, h = versions.get(key, (key, ""))
        out[key] = {"name": name, "type": kind, "config": h[:8] or None,
                    "version": int(key.rsplit(".v", 1)[1]) if re.search(r"\.v\d+$", key) else 1,
                    "counts": {st: sum(r.state == st for r in rows) for st in EVAL_STATES},
                    "headline": {m: metrics[m] for m in headline_of(kind, list(metrics))},
                    "latest_step": s.get("step")}
    return out


def _skipped(evals: list[Any], keys: dict[tuple[str, str], str]) -> list[dict[str, Any]]:
    """Skipped rows by suite and reason, numbers folded (`step 2 is not a multiple of every=4`
    and `step 6 …` are one reason)."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for r in evals:
        if r.state != "skipped":
            continue
        suite = keys.get((r.suite, r.suite_hash), r.suite)
        text = r.error or "no reason recorded"
        g = groups.setdefault((suite, re.sub(r"\d+", "N", text)), {"suite": suite, "reason": re.sub(r"\d+", "N", text),
                                                                   "count": 0, "steps": [], "example": text})
        g["count"] += 1
        g["steps"].append(r.step)
    return sorted(groups.values(), key=lambda g: (g["suite"], -g["count"]))


def _running(db: sqlite3.Connection, results: Path, run: str, keys: dict[tuple[str, str], str]) -> list[dict]:
    """Rows being evaluated, by whom (the pid in the row's owner mark) and whether it still runs."""
    from ckpt_watch.locking import _pid_alive

    rows = db.execute("SELECT step, suite, suite_hash, owner, started_at FROM evals WHERE run=? AND state='running' "
                      "ORDER BY step, suite", (run,)).fetchall()
    out = []
    for step, suite, h, owner, started in rows:
        pid = int(owner.split("-", 1)[0]) if owner and owner.split("-", 1)[0].isdigit() else None
        out.append({"step": step, "suite": keys.get((suite, h), suite), "pid": pid, "alive": _pid_alive(pid),
                    "since": started})
    return out


def _outbox(path: Path) -> dict[str, Any] | None:
    """Undelivered MLflow rows of one run (sinks/outbox.py's table), read without writing."""
    if not path.is_file():
        return None
    try:
        with _read_only(path) as db:
            kinds = dict(db.execute("SELECT kind, count(*) FROM outbox WHERE sent_at IS NULL AND failed IS NULL "
                                    "GROUP BY kind").fetchall())
            sent, refused, oldest = db.execute(
                "SELECT COALESCE(SUM(sent_at IS NOT NULL), 0), COALESCE(SUM(failed IS NOT NULL), 0), "
                "MIN(CASE WHEN sent_at IS NULL AND failed IS NULL THEN created_at END) FROM outbox").fetchone()
            err = db.execute("SELECT last_error FROM outbox WHERE last_error IS NOT NULL ORDER BY id DESC "
                             "LIMIT 1").fetchone()
    except sqlite3.Error as exc:
        return {"error": f"cannot read {path}: {exc}"}
    points = kinds.pop("metric", 0)
    return {"pending_points": points, "pending_other": sum(kinds.values()), "sent": sent, "refused": refused,
            "oldest_pending_at": _iso(datetime.fromtimestamp(oldest, UTC)) if oldest else None,
            "last_error": err[0] if err else None}


def _parse(value: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        return None


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="milliseconds")


# -- rendering -------------------------------------------------------------------------------


def render(status: dict[str, Any], console: Any) -> None:
    """Print the status for a person: per run, a few lines and one table of suites."""
    runs = status["runs"]
    where = Path(status["results_dir"])
    with contextlib.suppress(ValueError):
        where = where.relative_to(Path.cwd())  # under the working directory: the short form
    console.print(f"results {where} — {len(runs)} run(s)", highlight=False)
    for run in runs:
        console.print()
        _render_run(run, console)


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _num(value: Any) -> str:
    return "—" if value is None else f"{value:.4g}"


def _render_run(run: dict[str, Any], console: Any) -> None:
    p = run["process"]
    who = (f"{p['mode'] or '?'} pid {p['pid'] or '?'} since {str(p['since'] or '')[:19]}"
           if p["running"] else "no ckpt-watch process")
    console.print(f"[bold]run {run['run']}[/] — training {run['training']} of {run['trainings']} in watched run "
                  f"{run['watched_run']}; evaluating: {who}", highlight=False)
    if run["started_because"]:
        console.print(f"  started because: {run['started_because']}", highlight=False)
    if not run["current"]:
        console.print("  superseded by a newer training in the same folder", highlight=False)
    _render_engine(run, console)
    _render_lag(run["checkpoints"], run["backlog"], console)
    for suite, info in run["suites"].items():
        if info["config"]:
            console.print(f"  suite {info['name']} config {info['config']} → results as '{suite}'", highlight=False)
    for s in run["schedules"]:
        console.print(f"  suite {s['suite']}: percent schedule over {s['max_steps']} steps → due at the first "
                      f"checkpoint at or after steps {', '.join(map(str, s['targets']))}", highlight=False)
    _render_suites(run["suites"], console)
    _render_problems(run, console)


def _render_engine(run: dict[str, Any], console: Any) -> None:
    e = run["engine"]
    if e is None:
        if run["current"]:
            console.print("  daemon: no heartbeat recorded (no daemon has run here since status.json existed)",
                          highlight=False)
        return
    where = ", ".join(x for x in (e.get("url"), f"server pid {e['server_pid']}" if e.get("server_pid") else None)
                      if x)
    engine = f"engine {e['kind']}"
    if e["state"] not in ("stopping", "stopped"):
        engine += f": {e['status']}" + (f" ({where})" if where and where not in str(e["status"]) else "")
    if e["live"]:
        head = f"{e['mode']} pid {e['pid']}: {e['state']}"
    elif e["state"] == "stopped":
        head = f"not running (stopped; last {e['mode']} pid {e['pid']})"
    else:
        head = f"not running — pid {e['pid']} is gone; it last said: {e['state']}"
    console.print(f"  {head}; {engine}; heartbeat {_ago(e['age_seconds'])}", highlight=False)


def _render_lag(c: dict[str, Any], backlog: dict[str, int], console: Any) -> None:
    newest, done = c["newest_complete"], c["newest_evaluated"]
    if newest is None:
        line = "no complete checkpoint yet"
    else:
        line = f"newest complete checkpoint: step {newest['step']}; fully evaluated: "
        if done is None:
            line += "none yet"
        elif c["lag_steps"] == 0:
            line += f"step {done['step']} (keeping up)"
        else:
            mins = "" if c["lag_minutes"] is None else f", {c['lag_minutes']:.1f} min"
            line += f"step {done['step']} — [yellow]{c['lag_steps']} step(s){mins} behind[/]"
    line += f"; backlog {backlog['pending']} pending, {backlog['running']} running"
    console.print(f"  {line}", highlight=False)


def _render_suites(suites: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    if not suites:
        return
    t = Table(box=None, pad_edge=False, padding=(0, 1))
    for col in ("suite", "pending", "running", "done", "failed", "skipped", "latest (base) at step"):
        t.add_column(col, justify="left" if col in ("suite", "latest (base) at step") else "right")
    for key, s in suites.items():
        c = s["counts"]
        heads = "  ".join(f"{m} {_num(v['latest'])} ({_num(v['base'])})" for m, v in s["headline"].items())
        at = f" at {s['latest_step']}" if s["latest_step"] is not None else ""
        t.add_row(key, str(c["pending"]), str(c["running"]), str(c["done"]),
                  f"[red]{c['failed']}[/]" if c["failed"] else "0", str(c["skipped"]), (heads + at) or "—")
    console.print(t)


def _render_problems(run: dict[str, Any], console: Any) -> None:
    for f in run["failed"]:
        console.print(f"  [red]failed[/] step {f['step']} {f['suite']} after {f['attempts']} tr(ies): "
                      f"{(f['error'] or '').splitlines()[0][:160] if f['error'] else 'no error recorded'}",
                      highlight=False)
    for r in run["running"]:
        state = "running" if r["alive"] else "left running by a process that is gone (recovered at the next start)"
        console.print(f"  step {r['step']} {r['suite']}: {state} (pid {r['pid']}, since {str(r['since'])[:19]})",
                      highlight=False)
    for k in run["checkpoints"]["not_ready"]:
        if k["state"] == "stale":  # an earlier training's folder, recorded as such
            continue
        console.print(f"  checkpoint step {k['step']} {k['state']} ({k['attempts']} tr(ies)): {k['error'] or ''}",
                      highlight=False)
    for s in run["skipped"]:
        console.print(f"  skipped {s['suite']} ×{s['count']}: {s['example'] if s['count'] == 1 else s['reason']}",
                      highlight=False)
    o = run["outbox"]
    if o and "error" in o:
        console.print(f"  MLflow outbox: {o['error']}", highlight=False)
    elif o and (o["pending_points"] or o["pending_other"] or o["refused"]):
        line = f"  [yellow]MLflow outbox: {o['pending_points']} point(s) undelivered[/]"
        line += f" (+{o['pending_other']} tag/param/table row(s)), oldest since {str(o['oldest_pending_at'])[:19]}"
        if o["refused"]:
            line += f"; {o['refused']} refused by MLflow for good"
        if o["last_error"]:
            line += f"; last error: {o['last_error'][:120]}"
        console.print(line, highlight=False)
    elif o:
        console.print(f"  MLflow outbox: all {o['sent']} row(s) delivered", highlight=False)
