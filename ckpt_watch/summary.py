"""The run summary: `<results_dir>/<run>/summary.json`, CLaaS's end-of-run figures and more.

Built from the run's `metrics.jsonl` alone (cheap, and the same on every machine that holds the
results), rewritten atomically after every committed result:

    {
      "run": "run1",
      "updated_at": "2026-…",
      "latest_step": 40,
      "capability_ratio": 0.97,            # suite `general`'s latest capability_ratio, if any
      "preferences": {                     # per compliance preference, CLaaS's ExperimentSummary
        "no_emoji": {"preference": "no_emoji", "suite": "compliance", "step": 40,
                     "logprob_margin_delta": 1.8, "final_compliance": 0.9,
                     "capability_ratio": 0.97}
      },
      "suites": {                          # every suite (versioned key) and metric
        "arc_challenge": {"type": "arc_challenge", "step": 40, "base_step": 0,
                          "metrics": {"acc": {"latest": 0.31, "base": 0.30, "delta": 0.01}}}
      }
    }

Field names follow CLaaS (`claas/eval/types.py` ExperimentSummary: `logprob_margin_delta`,
`final_compliance`, `capability_ratio`); CLaaS writes one entry per preference because each of
its experiments trains one preference, while a ckpt-watch run may track several, so the
capability ratio (one per run) is repeated in each entry and given once at the top level.
"Latest" is the highest step with an ok result of that suite; "base" its step-0 result; `delta`
is latest − base, null when either is missing or not finite. Failed results never count.

MLflow carries the same figures as run tags `ckpt_watch.summary.<key>` (see `summary_tags`):
tags, because a summary value is overwritten as the run goes on, while the metric history
already holds every point of the curve.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

from ckpt_watch.core import BASE_STEP, utcnow
from ckpt_watch.sinks.jsonfiles import METRICS_FILE, atomic_write_text, jsonable, read_metrics

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
TAG_PREFIX = "ckpt_watch.summary."
_VERSION = re.compile(r"^(.*)\.v\d+$")


def suite_type(row: dict[str, Any]) -> str:
    """A metrics.jsonl row's suite type: `info.suite_type` when recorded, else its name
    without the `.vN` version suffix (the type is the name unless the config says otherwise)."""
    info = row.get("info") or {}
    if info.get("suite_type"):
        return str(info["suite_type"])
    name = str(row.get("suite"))
    m = _VERSION.match(name)
    return m.group(1) if m else name


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _delta(latest: float | None, base: float | None) -> float | None:
    return latest - base if latest is not None and base is not None else None


def suite_summaries(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per suite key: its type, latest ok step, and per metric latest / base / delta."""
    by_suite: dict[str, dict[int, dict[str, Any]]] = {}
    for row in rows:
        if row.get("status") != "ok" or not isinstance(row.get("step"), int):
            continue
        by_suite.setdefault(str(row["suite"]), {})[row["step"]] = row
    out = {}
    for key, steps in sorted(by_suite.items()):
        last = max(steps)
        base_row = steps.get(BASE_STEP)
        latest_m = steps[last].get("metrics") or {}
        base_m = (base_row or {}).get("metrics") or {}
        metrics = {}
        for name in sorted(set(latest_m) | set(base_m)):
            latest, base = _num(latest_m.get(name)), _num(base_m.get(name))
            metrics[name] = {"latest": latest, "base": base, "delta": _delta(latest, base)}
        out[key] = {"type": suite_type(steps[last]), "step": last,
                    "base_step": BASE_STEP if base_row is not None else None, "metrics": metrics}
    return out


def _latest_of_type(suites: dict[str, dict[str, Any]], kind: str) -> list[tuple[str, dict[str, Any]]]:
    """Suites of one type, the most recently evaluated (then the newest version) last."""
    found = [(k, s) for k, s in suites.items() if s["type"] == kind]
    return sorted(found, key=lambda ks: (ks[1]["step"], ks[0]))


def capability_ratio(suites: dict[str, dict[str, Any]]) -> float | None:
    found = _latest_of_type(suites, "general")
    for _key, s in reversed(found):
        value = (s["metrics"].get("capability_ratio") or {}).get("latest")
        if value is not None:
            return value
    return None


def preference_summaries(suites: dict[str, dict[str, Any]], ratio: float | None) -> dict[str, dict[str, Any]]:
    """Per compliance preference: CLaaS's final logprob_margin_delta and final_compliance.

    A compliance suite reports `<pref>` (compliance), `margin/<pref>` and `margin_delta/<pref>`."""
    prefs: dict[str, dict[str, Any]] = {}
    for key, s in _latest_of_type(suites, "compliance"):  # later (newer) suites overwrite
        m = s["metrics"]
        names = {n.split("/", 1)[1] for n in m if n.startswith(("margin/", "margin_delta/"))}
        names |= {n for n in m if "/" not in n}
        for pref in sorted(names):
            prefs[pref] = {
                "preference": pref,
                "suite": key,
                "step": s["step"],
                "logprob_margin_delta": (m.get(f"margin_delta/{pref}") or {}).get("latest"),
                "final_compliance": (m.get(pref) or {}).get("latest"),
                "capability_ratio": ratio,
            }
    return prefs


def build_summary(run_dir: Path) -> dict[str, Any]:
    """The summary of one run folder, from its metrics.jsonl."""
    rows = read_metrics(Path(run_dir) / METRICS_FILE)
    suites = suite_summaries(rows)
    ratio = capability_ratio(suites)
    return {
        "run": Path(run_dir).name,
        "updated_at": utcnow(),
        "latest_step": max((s["step"] for s in suites.values()), default=None),
        "capability_ratio": ratio,
        "preferences": preference_summaries(suites, ratio),
        "suites": suites,
    }


def write_summary(run_dir: Path) -> dict[str, Any] | None:
    """Rewrite `<run_dir>/summary.json` atomically. A derived file: a failure is logged, never
    raised (the result it summarises is already stored)."""
    try:
        summary = build_summary(run_dir)
        atomic_write_text(Path(run_dir) / SUMMARY_FILE, json.dumps(jsonable(summary), indent=2) + "\n")
        return summary
    except OSError as exc:
        log.warning("could not update %s: %s", Path(run_dir) / SUMMARY_FILE, exc)
        return None


def _fmt(value: float | None) -> str:
    return "null" if value is None else repr(float(value))


def summary_tags(summary: dict[str, Any], suite: str | None = None) -> dict[str, str]:
    """The summary as MLflow tags: `ckpt_watch.summary.capability_ratio`,
    `….preference.<pref>.logprob_margin_delta` / `.final_compliance`, and per suite metric
    `….<suite>/<metric>.latest` / `.delta`. `suite` limits the per-metric tags to that suite
    (the one just written: the others have not changed)."""
    tags = {f"{TAG_PREFIX}capability_ratio": _fmt(summary.get("capability_ratio"))}
    if summary.get("latest_step") is not None:
        tags[f"{TAG_PREFIX}latest_step"] = str(summary["latest_step"])
    for pref, entry in summary.get("preferences", {}).items():
        for field in ("logprob_margin_delta", "final_compliance"):
            tags[f"{TAG_PREFIX}preference.{pref}.{field}"] = _fmt(entry.get(field))
    for key, s in summary.get("suites", {}).items():
        if suite is not None and key != suite:
            continue
        for name, m in s["metrics"].items():
            tags[f"{TAG_PREFIX}{key}/{name}.latest"] = _fmt(m["latest"])
            tags[f"{TAG_PREFIX}{key}/{name}.delta"] = _fmt(m["delta"])
    return tags
