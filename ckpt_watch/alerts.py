"""Alerts a trainer can act on: thresholds checked on every committed result (docs/alerts.md).

Rules (config block `alerts:`), each checked on the results of checkpoints (never the base model):

- `collapse` (default on): a collapse suite's own alert (`alert` = 1, its configured thresholds);
- `misaligned_rate_above: X`: an alignment suite's `misaligned_rate` > X;
- `arc_below_base_fraction: F`: an ARC-Challenge suite's `acc` < F × the base model's `acc`
  (step 0, same suite configuration);
- `leakage_source_rate_above: Y`: a leakage suite's `source_rate` > Y;
- `rules: [{metric: "<suite>/<metric>", above|below: value}]`: any logged metric.

When a rule fires for a step: the stop file (`stop_file`) is written, a record is appended to
`<results_dir>/<run>/alerts.jsonl` (step, rule, metric, value, threshold, time), the MLflow
tag `ckpt_watch.alert.<rule>` = step is queued in the MLflow sink's durable outbox (when that
sink is on, so an MLflow outage delays it, never loses it) and the configured `command` runs
(argv, no shell, `CKPT_WATCH_ALERT_*` in its environment, a timeout; a failure is logged).
Each (rule, step) fires once: alerts.jsonl, read under an flock, is the memory, so a restart,
a re-delivered result or `eval --force` does not fire it again. Nothing here raises into the
evaluator: an alert that cannot be written is logged and evaluation goes on.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from ckpt_watch.config import AlertsConfig
from ckpt_watch.core import BASE_STEP, Checkpoint, CheckpointKind, SuiteResult, utcnow
from ckpt_watch.redact import redact_text

log = logging.getLogger(__name__)

ALERTS_FILE = "alerts.jsonl"
TAG_PREFIX = "ckpt_watch.alert."
ENV_PREFIX = "CKPT_WATCH_ALERT_"
# collapse suite: the name its `info.alerts` lists → the config field holding that threshold
_COLLAPSE_LIMITS = {"entropy_ratio": "entropy_ratio_min", "entropy": "entropy_min",
                    "self_rouge_l": "self_rouge_max", "logprob_drift": "drift_max"}


@dataclass(frozen=True)
class Alert:
    run: str
    step: int
    rule: str
    metric: str
    value: float
    threshold: float | None
    time: str

    def env(self, results_dir: Path) -> dict[str, str]:
        fields = {**asdict(self), "threshold": "" if self.threshold is None else self.threshold,
                  "file": results_dir / self.run / ALERTS_FILE}
        return {ENV_PREFIX + k.upper(): str(v) for k, v in fields.items()}


@dataclass(frozen=True)
class Crossing:
    rule: str
    metric: str
    value: float
    threshold: float | None


def _crossed(value: float | None, *, above: float | None = None, below: float | None = None) -> bool:
    if value is None or not math.isfinite(value):
        return False
    return (above is not None and value > above) or (below is not None and value < below)


class Alerts:
    """`Alerts(config, results_dir, run, sinks)`; `check(checkpoint, planned, result)`."""

    def __init__(self, config: AlertsConfig, results_dir: Path, run: str, sinks: list[Any]):
        self.config = config
        self.results_dir = Path(results_dir)
        self.run = run
        self.file = self.results_dir / run / ALERTS_FILE
        self._mlflow = next((s for s in sinks if getattr(s, "name", None) == "mlflow"), None)

    # -- the hook ------------------------------------------------------------------------------

    def check(self, checkpoint: Checkpoint, planned: Any, result: SuiteResult) -> list[Alert]:
        """Fire every rule `result` crosses that has not fired for this step; returns those fired."""
        if checkpoint.kind is CheckpointKind.BASE or result.step == BASE_STEP:
            return []
        try:
            crossings = self.crossings(planned.name, planned.config, result)
            return self._fire(result.step, crossings) if crossings else []
        except Exception:  # an alert must never stop evaluation
            log.exception("checking alerts for step %d/%s failed", result.step, result.suite)
            return []

    # -- rules ---------------------------------------------------------------------------------

    def crossings(self, suite_name: str, suite_config: Any, result: SuiteResult) -> list[Crossing]:
        cfg, metrics, suite = self.config, result.finite_metrics(), result.suite
        kind = getattr(suite_config, "type", result.info.get("suite_type"))
        out: list[Crossing] = []
        if kind == "collapse" and cfg.collapse and metrics.get("alert") == 1.0:
            names = [n for n in result.info.get("alerts") or [] if n in _COLLAPSE_LIMITS] or ["alert"]
            first = names[0]
            limit = getattr(suite_config, _COLLAPSE_LIMITS.get(first, ""), None)
            out.append(Crossing("collapse", f"{suite}/{first}", metrics.get(first, 1.0), limit))
        if kind == "alignment" and _crossed(metrics.get("misaligned_rate"), above=cfg.misaligned_rate_above):
            out.append(Crossing("misaligned_rate", f"{suite}/misaligned_rate", metrics["misaligned_rate"],
                                cfg.misaligned_rate_above))
        if kind == "arc_challenge" and cfg.arc_below_base_fraction is not None and "acc" in metrics:
            base = self._base_metric(suite, "acc")
            if base is not None:
                limit = cfg.arc_below_base_fraction * base
                if _crossed(metrics["acc"], below=limit):
                    out.append(Crossing("arc_below_base", f"{suite}/acc", metrics["acc"], limit))
        if kind == "leakage" and _crossed(metrics.get("source_rate"), above=cfg.leakage_source_rate_above):
            out.append(Crossing("leakage_source_rate", f"{suite}/source_rate", metrics["source_rate"],
                                cfg.leakage_source_rate_above))
        for rule in cfg.rules:
            rule_suite, _, name = rule.metric.rpartition("/")
            if rule_suite in (suite_name, suite) and _crossed(metrics.get(name), above=rule.above, below=rule.below):
                threshold = rule.above if rule.above is not None else rule.below
                out.append(Crossing(rule.rule_name(), f"{suite}/{name}", metrics[name], threshold))
        return out

    def _base_metric(self, suite: str, name: str) -> float | None:
        """The base model's value for this suite configuration (its versioned name), if scored."""
        from ckpt_watch.evaluate import read_result

        base = read_result(self.results_dir, self.run, BASE_STEP, suite)
        value = base.finite_metrics().get(name) if base is not None else None
        return value if value else None  # a base accuracy of 0 gives no fraction to fall below

    # -- actions -------------------------------------------------------------------------------

    def _fire(self, step: int, crossings: list[Crossing]) -> list[Alert]:
        fired = []
        with self._locked() as fh:
            seen = _fired(fh)
            for c in crossings:
                if (c.rule, step) in seen:
                    continue
                alert = Alert(self.run, step, c.rule, c.metric, c.value, c.threshold, utcnow())
                self._touch_stop_file(alert)
                fh.write(json.dumps(asdict(alert)) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
                seen.add((c.rule, step))
                fired.append(alert)
        for alert in fired:
            log.warning("ALERT %s at step %d: %s = %.4g (threshold %s)", alert.rule, alert.step, alert.metric,
                        alert.value, alert.threshold)
            self._tag(alert)
            self._run_command(alert)
        return fired

    @contextmanager
    def _locked(self) -> Iterator[TextIO]:
        """alerts.jsonl opened for reading and appending, under an exclusive flock (a daemon and an
        `eval` beside it on one run never both fire the same (rule, step))."""
        self.file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.file, "a+", encoding="utf-8") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield fh
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _touch_stop_file(self, alert: Alert) -> None:
        path = self.config.stop_file
        if path is None:
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(alert)) + "\n", encoding="utf-8")
        os.replace(tmp, path)  # the trainer sees the whole file or none

    def _tag(self, alert: Alert) -> None:
        """`ckpt_watch.alert.<rule>` = step, through the MLflow sink's outbox (its flusher sends it)."""
        if self._mlflow is None:
            return
        from ckpt_watch.sinks.mlflow import OUTBOX_FILE
        from ckpt_watch.sinks.outbox import TAG, Outbox

        box = Outbox(Path(self._mlflow.results_dir) / self.run / OUTBOX_FILE)
        box.add([(TAG, TAG_PREFIX + alert.rule, alert.step, int(time.time() * 1000), None, str(alert.step))])

    def _run_command(self, alert: Alert) -> None:
        if not self.config.command:
            return
        env = {**os.environ, **alert.env(self.results_dir)}
        # a thread: a slow command never holds up evaluation; not a daemon, so the process waits for it
        threading.Thread(target=_run, args=(list(self.config.command), env, self.config.command_timeout, alert),
                         name="alert-command").start()


def _fired(fh: TextIO) -> set[tuple[str, int]]:
    fh.seek(0)
    text = fh.read()
    seen = set()
    for line in text.splitlines():
        try:
            rec = json.loads(line)
            seen.add((str(rec["rule"]), int(rec["step"])))
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line from a crash: that alert fires again, which is safe
    if text and not text.endswith("\n"):
        fh.write("\n")  # the next record starts on its own line
    return seen


def _run(argv: list[str], env: dict[str, str], timeout: float, alert: Alert) -> None:
    try:
        proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        log.error("alert command %s for %s at step %d: killed after %gs", argv[0], alert.rule, alert.step, timeout)
        return
    except OSError as exc:
        log.error("alert command %s for %s at step %d could not start: %s", argv[0], alert.rule, alert.step, exc)
        return
    if proc.returncode != 0:
        tail = redact_text((proc.stderr or proc.stdout or "").strip()[-500:])
        log.error("alert command %s for %s at step %d exited %d: %s", argv[0], alert.rule, alert.step,
                  proc.returncode, tail)


def read_alerts(run_dir: Path) -> list[dict[str, Any]]:
    """The alert records of one run (for status, report and tests)."""
    path = Path(run_dir) / ALERTS_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
