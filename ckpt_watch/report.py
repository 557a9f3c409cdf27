"""`ckpt-watch report`: a static HTML page of a results dir's curves, plus one PNG per chart.

Read from the JSON results alone (DESIGN §2's layout: `<results_dir>/<run>/metrics.jsonl`,
`step-<N>/<suite>.json`, `params.json`, `summary.json`), never from MLflow, so it works offline
and after the tracking server is gone. The SQLite ledger, when present, is opened read-only
for what only it knows: the newest checkpoint seen, which steps are fully evaluated, the suite
configuration hashes.

The page (`<out>/index.html`) has a section per run: a header (run identity, base model,
config and suite hashes, newest checkpoint seen vs newest evaluated, the summary figures of
`summary.json`), then per suite one chart per metric against the training step — a
`<metric>/<persona>` family (leakage `rate/<p>`, ARC-C `acc/<p>`, …) on one chart, the source
persona highlighted — with the base model's (step 0) value as a dotted reference line, the
collapse suite's alert thresholds, and failed results (status error) and missing values
(NaN / null) as distinct markers on the x axis, never as zeros. Under each chart: links from
each step to its per-sample JSON; under each suite: a table of every result with its status.

Charts are drawn with matplotlib's object API (`Figure`, Agg canvas: no display, no global
pyplot state) and embedded in the page as base64 PNGs, so the page needs no network and no
other file; the same PNGs are also written beside it (`<out>/<run>/<suite>--<metric>.png`).
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
import os
import re
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpt_watch.core import BASE_STEP, utcnow
from ckpt_watch.sinks.jsonfiles import METRICS_FILE, read_metrics
from ckpt_watch.suites.personas import RESERVED_NAMES
from ckpt_watch.summary import SUMMARY_FILE, build_summary, suite_type

REPORT_DIR = "report"
PAGE = "index.html"
FAILED_COLOR = "#c2007a"  # magenta ✕ on the x axis: a failed result (status error)
MISSING_COLOR = "#ff8c00"  # orange ○ on the x axis: an ok result without a finite value
SOURCE_COLOR = "#d62728"
THRESHOLD_COLOR = "#7f3fbf"
PALETTE = ("#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#17becf", "#bcbd22", "#7f7f7f", "#e377c2")
_VERSION = re.compile(r"^(.*)\.v\d+$")
_SLUG = re.compile(r"[^A-Za-z0-9._-]+")
# collapse suite: metric → (config field, "below" or "above" alerts)
COLLAPSE_THRESHOLDS = {
    "entropy_ratio": ("entropy_ratio_min", "below"),
    "entropy": ("entropy_min", "below"),
    "self_rouge_l": ("self_rouge_max", "above"),
    "logprob_drift": ("drift_max", "above"),
}


class ReportError(Exception):
    """No report can be written; `exit_code` is the CLI's (2 bad usage, 1 nothing to show)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


# -- reading ----------------------------------------------------------------------------------


@dataclass
class LedgerView:
    """What the ledger says about one run (all None / empty without a ledger)."""

    newest_seen: tuple[int, str] | None = None  # (step, state) of the newest checkpoint row
    newest_complete: int | None = None  # newest step whose evaluations are all done (or skipped)
    suite_hashes: list[tuple[str, str, int]] = field(default_factory=list)  # (suite, hash, version)
    training: tuple[str, int] | None = None  # (watched base run, generation)
    note: str | None = None  # why there is nothing (no ledger, unreadable)


@dataclass
class RunData:
    name: str
    dir: Path
    rows: list[dict[str, Any]]
    params: dict[str, str]
    summary: dict[str, Any]
    ledger: LedgerView


def find_runs(results_dir: Path) -> list[Path]:
    """Run folders (those holding a metrics.jsonl), by name."""
    if not results_dir.is_dir():
        raise ReportError(f"results dir {results_dir} does not exist (or is not a directory)", exit_code=2)
    runs = sorted(p for p in results_dir.iterdir() if p.is_dir() and (p / METRICS_FILE).is_file())
    if not runs:
        raise ReportError(f"no results under {results_dir}: no run folder with a {METRICS_FILE} yet "
                          "(has ckpt-watch evaluated anything with this results_dir?)")
    return runs


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def read_ledger(path: Path, run: str) -> LedgerView:
    """The run's ledger facts, opened read-only (a live daemon may be writing it)."""
    if not path.is_file():
        return LedgerView(note="no ledger")
    try:
        db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=10)
        try:
            return _ledger_facts(db, run)
        finally:
            db.close()
    except sqlite3.Error as exc:
        return LedgerView(note=f"ledger unreadable: {exc}")


def _ledger_facts(db: sqlite3.Connection, run: str) -> LedgerView:
    ckpts = db.execute("SELECT step, state FROM checkpoints WHERE run=? ORDER BY step", (run,)).fetchall()
    by_step: dict[int, set[str]] = {}
    for step, state in db.execute("SELECT step, state FROM evals WHERE run=?", (run,)):
        by_step.setdefault(step, set()).add(state)
    complete = [s for s, states in by_step.items() if "done" in states and states <= {"done", "skipped"}]
    hashes = db.execute("SELECT suite, suite_hash, version FROM suite_versions WHERE run=? ORDER BY suite, version",
                        (run,)).fetchall()
    training = db.execute("SELECT base_run, generation FROM trainings WHERE run=?", (run,)).fetchone()
    return LedgerView(
        newest_seen=(ckpts[-1][0], ckpts[-1][1]) if ckpts else None,
        newest_complete=max(complete, default=None),
        suite_hashes=[(r[0], r[1], r[2]) for r in hashes],
        training=(training[0], training[1]) if training else None,
    )


def load_run(run_dir: Path) -> RunData:
    summary = _read_json(run_dir / SUMMARY_FILE) or build_summary(run_dir)
    params = {str(k): str(v) for k, v in _read_json(run_dir / "params.json").items()}
    return RunData(name=run_dir.name, dir=run_dir, rows=read_metrics(run_dir / METRICS_FILE), params=params,
                   summary=summary, ledger=read_ledger(run_dir.parent / "ledger.sqlite", run_dir.name))


# -- charts -----------------------------------------------------------------------------------


@dataclass
class Chart:
    """One chart: `lines` label → [(step, value)] of the ok results (NaN where a value is missing)."""

    run: str
    suite: str
    title: str
    slug: str
    lines: dict[str, list[tuple[int, float]]]
    base: dict[str, float]  # label → the base model's value (step 0)
    highlight: str | None = None  # the source persona's label
    thresholds: list[tuple[str, float]] = field(default_factory=list)  # (label, y)
    failed: list[int] = field(default_factory=list)  # steps whose result failed
    missing: list[int] = field(default_factory=list)  # ok steps without a finite value for a line
    files: dict[int, Path] = field(default_factory=dict)  # step → its result JSON


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def suite_name(key: str) -> str:
    """A result key's config name: `arc_challenge.v2` → `arc_challenge`."""
    m = _VERSION.match(key)
    return m.group(1) if m else key


def metric_groups(names: Iterable[str]) -> list[tuple[str, list[str]]]:
    """(chart title, metric keys): a `<metric>/<name>` family of two or more names (personas,
    preferences) on one chart, its summaries (`…/source`, `…/other_mean`, …) and every other
    metric on a chart of their own; families first, then in name order."""
    names = sorted(set(names))
    family: dict[str, list[str]] = {}
    for n in names:
        prefix, _, rest = n.partition("/")
        if rest and rest not in RESERVED_NAMES and "/" not in rest:
            family.setdefault(prefix, []).append(n)
    grouped = {n for prefix, members in family.items() if len(members) >= 2 for n in members}
    out: dict[str, list[str]] = {}
    for n in sorted(names, key=lambda n: n not in grouped):  # the families first
        title = f"{n.partition('/')[0]}/*" if n in grouped else n
        out.setdefault(title, []).append(n)
    return list(out.items())


def _slug(text: str) -> str:
    return _SLUG.sub("_", text.replace("/*", "-each").replace("/", "-")).strip("_")


def build_charts(run: RunData, sources: dict[str, str | None],
                 thresholds: dict[str, dict[str, float | None]]) -> dict[str, list[Chart]]:
    """suite key → its charts. `sources`: suite name → source persona; `thresholds`: suite name →
    collapse field → limit (only for collapse suites)."""
    by_suite: dict[str, list[dict[str, Any]]] = {}
    for row in run.rows:
        if isinstance(row.get("step"), int):
            by_suite.setdefault(str(row.get("suite")), []).append(row)
    charts: dict[str, list[Chart]] = {}
    for key, rows in sorted(by_suite.items()):
        rows.sort(key=lambda r: r["step"])
        names = {n for r in rows if r.get("status") == "ok" for n in (r.get("metrics") or {})}
        limits = thresholds.get(suite_name(key), {}) if suite_type(rows[-1]) == "collapse" else {}
        groups = metric_groups(names) or [("no ok result yet", [])]  # failures only: still shown
        charts[key] = [_chart(run, key, rows, title, members, sources.get(suite_name(key)), limits)
                       for title, members in groups]
    return charts


def _label(metric: str, grouped: bool, source: str | None) -> str:
    if not grouped:
        return metric
    name = metric.partition("/")[2]
    return f"{name} (source)" if name == source else name


def _chart(run: RunData, key: str, rows: list[dict[str, Any]], title: str, members: list[str],
           source: str | None, limits: dict[str, float | None]) -> Chart:
    grouped = title.endswith("/*")
    chart = Chart(run=run.name, suite=key, title=f"{key}: {title}", slug=_slug(f"{key}--{title}"), lines={}, base={})
    labels = {m: _label(m, grouped, source) for m in members}
    chart.lines = {labels[m]: [] for m in members}
    if grouped and source and f"{title.split('/')[0]}/{source}" in members:
        chart.highlight = labels[f"{title.split('/')[0]}/{source}"]
    for row in rows:
        step = row["step"]
        chart.files[step] = run.dir / f"step-{step}" / f"{row['suite']}.json"
        if row.get("status") != "ok":
            chart.failed.append(step)
            continue
        for m in members:
            value = _finite((row.get("metrics") or {}).get(m))
            if value is None:  # NaN breaks the line there: no value is drawn, none is interpolated
                chart.lines[labels[m]].append((step, math.nan))
                if step not in chart.missing:
                    chart.missing.append(step)
                continue
            chart.lines[labels[m]].append((step, value))
            if step == BASE_STEP:
                chart.base[labels[m]] = value
    if len(members) == 1 and members[0] in COLLAPSE_THRESHOLDS:
        chart.thresholds = _threshold_lines(members[0], limits)
    return chart


def _threshold_lines(metric: str, limits: dict[str, float | None]) -> list[tuple[str, float]]:
    fld, side = COLLAPSE_THRESHOLDS[metric]
    limit = limits.get(fld)
    if limit is None:
        return []
    word = "below" if side == "below" else "above"
    return [(f"alert {word} {limit:g} ({fld})", float(limit))]


def render_png(chart: Chart) -> bytes:
    """The chart as a PNG (matplotlib, Agg canvas)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.4, 3.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    colors = iter(PALETTE)
    for label, points in chart.lines.items():
        is_source = label == chart.highlight
        color = SOURCE_COLOR if is_source else next(colors, "#333333")
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.plot(xs, ys, marker="o", ms=5 if is_source else 4, lw=2.8 if is_source else 1.4, color=color,
                label=label, zorder=3 if is_source else 2)
        if label in chart.base:
            ax.axhline(chart.base[label], color=color, ls=":", lw=1.2, alpha=0.8)
    if chart.base:
        ax.plot([], [], color="#555555", ls=":", lw=1.2, label="base model (step 0)")
    for label, y in chart.thresholds:
        ax.axhline(y, color=THRESHOLD_COLOR, ls="--", lw=1.6, label=label)
    _x_axis_markers(ax, chart)
    ax.set_title(chart.title, fontsize=10)
    ax.set_xlabel("training step")
    if 0 < len(chart.files) <= 12:
        ax.set_xticks(sorted(chart.files))  # a tick at each evaluated step
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.grid(True, alpha=0.3)
    if not any(math.isfinite(v) for points in chart.lines.values() for _, v in points):
        ax.text(0.5, 0.5, "no finite values", transform=ax.transAxes, ha="center", va="center", color="#888888")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best", framealpha=0.85)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _x_axis_markers(ax: Any, chart: Chart) -> None:
    """Failed and missing points on the x axis (x in data, y in axes coordinates): never a value."""
    trans = ax.get_xaxis_transform()
    if chart.failed:
        ax.plot(chart.failed, [0.0] * len(chart.failed), transform=trans, ls="none", marker="X", ms=11,
                color=FAILED_COLOR, clip_on=False, zorder=5, label="failed (no result)")
    if chart.missing:
        ax.plot(chart.missing, [0.0] * len(chart.missing), transform=trans, ls="none", marker="o", ms=9,
                mfc="none", mew=2, color=MISSING_COLOR, clip_on=False, zorder=5, label="no value (NaN / unscored)")


# -- config-derived facts -----------------------------------------------------------------------


def _param(params: dict[str, str], key: str) -> str | None:
    value = params.get(key)
    return None if value in (None, "", "None", "null") else value


def _float_or_none(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def sources_and_thresholds(run: RunData, config: Any | None) -> tuple[dict[str, str | None],
                                                                      dict[str, dict[str, float | None]]]:
    """Per suite name: its source persona and, for collapse suites, its alert thresholds — from the
    config when given, else from the run's params.json (written from the config at start-up)."""
    sources: dict[str, str | None] = {}
    thresholds: dict[str, dict[str, float | None]] = {}
    names = {suite_name(str(r.get("suite"))) for r in run.rows}
    top_source = _param(run.params, "personas.source")
    for name in names:
        suite_cfg = (config.suites.get(name) if config is not None else None)
        if suite_cfg is not None:
            get_source = getattr(suite_cfg, "source_persona", None)
            sources[name] = get_source() if callable(get_source) else None
            thresholds[name] = {f: getattr(suite_cfg, f, None) for f, _ in COLLAPSE_THRESHOLDS.values()}
        else:
            sources[name] = _param(run.params, f"{name}.source") or top_source
            thresholds[name] = {f: _float_or_none(_param(run.params, f"{name}.{f}"))
                                for f, _ in COLLAPSE_THRESHOLDS.values()}
    return sources, thresholds


# -- HTML -------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{font-size:1.5em;margin-bottom:.2em} h2{border-bottom:2px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
h3{margin:1.2em 0 .4em} table{border-collapse:collapse;font-size:.85em;margin:.4em 0}
td,th{border:1px solid #ddd;padding:2px 8px;text-align:left} th{background:#f4f4f4}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:flex;flex-wrap:wrap;gap:12px} figure.chart{margin:0;border:1px solid #eee;padding:4px}
figure.chart img{display:block;width:640px;height:360px} figcaption{font-size:.8em;color:#555}
tr.failed td{background:#fde7f3} .failed-marker{color:#c2007a;font-weight:bold}
.missing-marker{color:#ff8c00;font-weight:bold} .meta td:first-child{font-weight:600;background:#fafafa}
.note{color:#666;font-size:.85em}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    v = _finite(value)
    return "–" if v is None else f"{v:.4g}"


def _rel(target: Path, out_dir: Path) -> str:
    return Path(os.path.relpath(target, out_dir)).as_posix()


def _meta_rows(run: RunData, config_info: tuple[str, str] | None) -> list[tuple[str, str]]:
    led = run.ledger
    ok_steps = [r["step"] for r in run.rows if r.get("status") == "ok" and isinstance(r.get("step"), int)]
    rows = [("run", _e(run.name)), ("base model", _e(run.params.get("base_model", "unknown (no params.json)"))),
            ("engine", _e(run.params.get("engine", "unknown")))]
    if led.training:
        rows.append(("training", f"generation {led.training[1]} in watched run {_e(led.training[0])}"))
    if config_info:
        rows.append(("config", f"{_e(config_info[0])} (sha256 {_e(config_info[1][:12])})"))
    if led.suite_hashes:
        rows.append(("suite configs", ", ".join(
            f"{_e(s if v <= 1 else f'{s}.v{v}')} <code>{_e(h[:8])}</code>" for s, h, v in led.suite_hashes)))
    seen = f"step {led.newest_seen[0]} ({_e(led.newest_seen[1])})" if led.newest_seen else _e(led.note or "none")
    rows.append(("newest checkpoint seen", seen))
    rows.append(("newest evaluated", f"step {max(ok_steps)}" if ok_steps else "none"))
    if led.note is None:
        complete = "none" if led.newest_complete is None else f"step {led.newest_complete}"
        rows.append(("newest fully evaluated", complete + " (every suite done)"))
    return rows


def _summary_html(summary: dict[str, Any]) -> str:
    parts = [f"<p>latest step <b>{_e(summary.get('latest_step'))}</b>"]
    if summary.get("capability_ratio") is not None:
        parts.append(f" · capability ratio <b>{_fmt(summary['capability_ratio'])}</b>")
    parts.append("</p>")
    prefs = summary.get("preferences") or {}
    if prefs:
        parts.append("<table><tr><th>preference</th><th>suite</th><th>step</th><th>logprob margin Δ</th>"
                     "<th>final compliance</th></tr>")
        for p in prefs.values():
            parts.append(f"<tr><td>{_e(p.get('preference'))}</td><td>{_e(p.get('suite'))}</td>"
                         f"<td class=num>{_e(p.get('step'))}</td><td class=num>{_fmt(p.get('logprob_margin_delta'))}"
                         f"</td><td class=num>{_fmt(p.get('final_compliance'))}</td></tr>")
        parts.append("</table>")
    parts.append("<table class=summary><tr><th>suite</th><th>metric</th><th>latest</th><th>base (step 0)</th>"
                 "<th>Δ</th><th>at step</th></tr>")
    for key, s in (summary.get("suites") or {}).items():
        for name, m in s.get("metrics", {}).items():
            parts.append(f"<tr><td>{_e(key)}</td><td>{_e(name)}</td><td class=num>{_fmt(m.get('latest'))}</td>"
                         f"<td class=num>{_fmt(m.get('base'))}</td><td class=num>{_fmt(m.get('delta'))}</td>"
                         f"<td class=num>{_e(s.get('step'))}</td></tr>")
    parts.append("</table>")
    return "".join(parts)


def _figure_html(chart: Chart, png: bytes, png_rel: str, out_dir: Path) -> str:
    links = " ".join(f'<a href="{_e(_rel(f, out_dir))}">{step}</a>' for step, f in sorted(chart.files.items()))
    marks = ""
    if chart.failed:
        marks += f' · <span class="failed-marker">✕ failed at step {", ".join(map(str, chart.failed))}</span>'
    if chart.missing:
        marks += f' · <span class="missing-marker">○ no value at step {", ".join(map(str, chart.missing))}</span>'
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure class="chart" id="{_e(chart.run)}--{_e(chart.slug)}" data-suite="{_e(chart.suite)}" '
            f'data-failed-steps="{_e(",".join(map(str, chart.failed)))}">'
            f'<img alt="{_e(chart.title)}" src="data:image/png;base64,{data}">'
            f'<figcaption>per-sample JSON by step: {links}{marks} · <a href="{_e(png_rel)}">PNG</a>'
            "</figcaption></figure>")


def _results_table(rows: list[dict[str, Any]], run: RunData, out_dir: Path) -> str:
    parts = ["<table class=results><tr><th>step</th><th>status</th><th>scored</th><th>unscored</th>"
             "<th>result JSON</th><th>error</th></tr>"]
    for r in rows:
        path = run.dir / f"step-{r['step']}" / f"{r['suite']}.json"
        failed = r.get("status") != "ok"
        status = '<span class="failed-marker">✕ failed</span>' if failed else "ok"
        parts.append(f'<tr class="{"failed" if failed else "ok"}" data-step="{r["step"]}"><td class=num>{r["step"]}'
                     f'</td><td>{status}</td><td class=num>{_e(r.get("n_scored", ""))}</td>'
                     f'<td class=num>{_e(r.get("n_unscored", ""))}</td>'
                     f'<td><a href="{_e(_rel(path, out_dir))}">{_e(path.parent.name)}/{_e(path.name)}</a></td>'
                     f'<td>{_e((r.get("error") or "")[:300])}</td></tr>')
    parts.append("</table>")
    return "".join(parts)


def _run_html(run: RunData, charts: dict[str, list[Chart]], out_dir: Path,
              config_info: tuple[str, str] | None) -> str:
    meta = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in _meta_rows(run, config_info))
    parts = [f'<section class="run" id="run-{_e(run.name)}"><h2>run {_e(run.name)}</h2>',
             f"<table class=meta>{meta}</table><h3>summary</h3>{_summary_html(run.summary)}"]
    (out_dir / _slug(run.name)).mkdir(parents=True, exist_ok=True)
    for key, suite_charts in charts.items():
        parts.append(f'<h3 id="{_e(run.name)}--{_e(key)}">suite {_e(key)}</h3><div class="grid">')
        for chart in suite_charts:
            png = render_png(chart)
            png_path = out_dir / _slug(run.name) / f"{chart.slug}.png"
            png_path.write_bytes(png)
            parts.append(_figure_html(chart, png, _rel(png_path, out_dir), out_dir))
        rows = sorted((r for r in run.rows if r.get("suite") == key), key=lambda r: r["step"])
        parts.append(f"</div>{_results_table(rows, run, out_dir)}")
    parts.append("</section>")
    return "".join(parts)


def _legend_html() -> str:
    return ('<p class="note">Lines: ok results by training step; dotted: the base model (step 0); dashed purple: '
            'alert thresholds; bold red: the source persona. On the x axis: <span class="failed-marker">✕</span> a '
            'failed evaluation (no result), <span class="missing-marker">○</span> a result without a finite value '
            '(NaN / unscored) — neither is drawn as a value.</p>')


def write_report(results_dir: Path, out_dir: Path | None = None, *, config: Any | None = None,
                 config_path: Path | None = None) -> Path:
    """Write `<out_dir>/index.html` (default out_dir: `<results_dir>/report`) and the chart PNGs;
    returns the page's path. Raises ReportError (exit code inside) when there is nothing to show."""
    shown = Path(results_dir)  # as the user gave it
    results_dir = shown.resolve()
    runs = [load_run(d) for d in find_runs(results_dir)]
    out_dir = (Path(out_dir) if out_dir is not None else results_dir / REPORT_DIR).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    config_info = None
    if config_path is not None:
        config_info = (str(config_path), hashlib.sha256(Path(config_path).read_bytes()).hexdigest())
    sections = []
    for run in runs:
        sources, thresholds = sources_and_thresholds(run, config)
        sections.append(_run_html(run, build_charts(run, sources, thresholds), out_dir, config_info))
    toc = " · ".join(f'<a href="#run-{_e(r.name)}">{_e(r.name)}</a>' for r in runs)
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>ckpt-watch report: '
            f'{_e(", ".join(r.name for r in runs))}</title><style>{CSS}</style></head><body>'
            f"<h1>ckpt-watch report</h1><p class=note>results dir {_e(shown)} · generated {_e(utcnow()[:19])}"
            f" UTC · runs: {toc}</p>{_legend_html()}{''.join(sections)}</body></html>\n")
    path = out_dir / PAGE
    path.write_text(page, encoding="utf-8")
    return path
