"""`ckpt-watch report`: the static HTML page, checked in a real headless Chromium.

The fast tests build results with the project's own JsonSink (no training) for the edge cases:
a missing or empty results dir, a suite with only its base result, NaN metrics, a failed result,
collapse thresholds from a config. The slow test reports on the session's real demo run
(conftest's `demo_out`, shared with tests/test_demo.py) plus one real failed evaluation.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from ckpt_watch.cli import app
from ckpt_watch.core import Checkpoint, ResultStatus, SuiteResult
from ckpt_watch.report import FAILED_COLOR, MISSING_COLOR, build_charts, load_run, sources_and_thresholds
from ckpt_watch.sinks.jsonfiles import JsonSink
from ckpt_watch.summary import write_summary

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PARAMS = {"base_model": "tiny-base", "engine": "hf", "leakage.source": "villain",
          "collapse.entropy_ratio_min": "0.6", "collapse.self_rouge_max": "0.85", "collapse.drift_max": "2.0",
          "collapse.entropy_min": "None"}


# -- helpers ----------------------------------------------------------------------------------


def _ckpt(run: str, step: int) -> Checkpoint:
    return Checkpoint.base(run) if step == 0 else Checkpoint(run, step, Path(f"ckpts/checkpoint-{step}"), None)


def write_results(results: Path, run: str = "run1", steps: tuple[int, ...] = (0, 10, 20, 30),
                  fail_collapse_at: int | None = 10, nan_pirate_at: int | None = 20) -> Path:
    """A run written through the real JsonSink: leakage per persona (villain is the source) and
    collapse, with one failed collapse result and one NaN leakage value; then summary.json."""
    sink = JsonSink(results)
    sink.start(run, PARAMS)
    for step in steps:
        rates = {"villain": step / 30, "pirate": step / 100, "assistant": 0.0}
        if step == nan_pirate_at:
            rates["pirate"] = math.nan
        metrics = {f"rate/{p}": v for p, v in rates.items()}
        metrics |= {"source_rate": rates["villain"], "other_mean": step / 200, "other_max": step / 100}
        sink.write(_ckpt(run, step), SuiteResult("leakage", step, ResultStatus.OK, metrics=metrics, n_scored=12))
        if step == fail_collapse_at:
            sink.write(_ckpt(run, step), SuiteResult.failure("collapse", step, "RuntimeError: engine went away"))
        else:
            sink.write(_ckpt(run, step), SuiteResult("collapse", step, ResultStatus.OK, metrics={
                "entropy": 2.0 - step / 20, "entropy_ratio": 1 - step / 40, "self_rouge_l": 0.5 + step / 50,
                "logprob_drift": step / 10, "alert": float(step >= 30)}, n_scored=1))
    write_summary(results / run)
    return results / run


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


@dataclass
class Browsed:
    """What headless Chromium saw: the full-page screenshot, each chart <img>'s box in page
    coordinates, console errors, and every URL the page requested."""

    shot: np.ndarray
    boxes: list[dict]
    errors: list[str]
    requests: list[str]


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("no chromium on PATH: install Debian's chromium package (.ci/run does)")
    return path


def browse(page: Path, shot: Path, width: int = 1360) -> Browsed:
    """Open `page` in Debian's Chromium via Playwright (no browser download), fresh profile."""
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    requests: list[str] = []
    with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
        ctx = pw.chromium.launch_persistent_context(
            profile, executable_path=chromium(), headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": width, "height": 900})
        try:
            tab = ctx.new_page()
            tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            tab.on("pageerror", lambda e: errors.append(str(e)))
            tab.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
            tab.on("request", lambda r: requests.append(r.url))
            tab.goto(page.as_uri(), wait_until="load")
            boxes = tab.evaluate("""() => [...document.querySelectorAll('figure.chart')].map(f => {
                const img = f.querySelector('img'), r = img.getBoundingClientRect();
                return {id: f.id, suite: f.dataset.suite, failed: f.dataset.failedSteps,
                        x: r.x + scrollX, y: r.y + scrollY, w: r.width, h: r.height,
                        loaded: img.complete && img.naturalWidth > 0};
            })""")
            tab.screenshot(path=str(shot), full_page=True)
        finally:
            ctx.close()
    return Browsed(np.asarray(Image.open(shot).convert("RGB")), boxes, errors, requests)


def crop(b: Browsed, box: dict) -> np.ndarray:
    x, y = round(box["x"]), round(box["y"])
    return b.shot[y: y + round(box["h"]), x: x + round(box["w"])]


def non_white(pixels: np.ndarray) -> float:
    return float((pixels < 235).any(axis=-1).mean())


def near(pixels: np.ndarray, color: str, tol: int = 40) -> int:
    rgb = np.array([int(color[i: i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(pixels.astype(int) - rgb) <= tol).all(axis=-1).sum())


def assert_rendered(b: Browsed, n_charts: int) -> None:
    """Loaded without console errors, only file:// requests (self-contained), every chart drawn."""
    assert b.errors == []
    assert b.requests and all(u.startswith("file://") for u in b.requests), b.requests
    assert len(b.boxes) == n_charts
    for box in b.boxes:
        assert box["loaded"] and box["w"] == 640 and box["h"] == 360, box
        assert non_white(crop(b, box)) > 0.03, f"chart {box['id']} is blank"


# -- fast: synthetic results through the real sink ---------------------------------------------


def test_report_cli_options_and_edge_cases(tmp_path):
    """Missing dir → exit 2; empty dir → exit 1 naming metrics.jsonl; no option → exit 2; then
    `--results DIR --out DIR --open` writes the page and opens it (BROWSER is a real script)."""
    r = invoke("report", "--results", str(tmp_path / "nope"))
    assert r.exit_code == 2 and "does not exist" in r.output
    (tmp_path / "empty").mkdir()
    r = invoke("report", "--results", str(tmp_path / "empty"))
    assert r.exit_code == 1 and "no results under" in r.output and "metrics.jsonl" in r.output
    r = invoke("report")
    assert r.exit_code == 2 and "give -c CONFIG or --results DIR" in r.output

    write_results(tmp_path / "results")
    opened = tmp_path / "opened.txt"
    browser = tmp_path / "browser.sh"
    browser.write_text(f'#!/bin/sh\nprintf %s "$1" > {opened}\n')
    browser.chmod(0o755)
    env = {**os.environ, "BROWSER": str(browser)}
    p = subprocess.run([sys.executable, "-m", "ckpt_watch", "report", "--results", str(tmp_path / "results"),
                        "--out", str(tmp_path / "page"), "--open"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    page = tmp_path / "page" / "index.html"
    assert f"report: {page}" in p.stdout
    assert opened.read_text() == page.as_uri()
    pngs = sorted((tmp_path / "page" / "run1").glob("*.png"))
    assert len(pngs) == 9  # leakage: rate/*, other_max, other_mean, source_rate; collapse: 5 metrics
    assert all(Image.open(f).size == (640, 360) for f in pngs)
    # the default --out is <results>/report
    assert invoke("report", "--results", str(tmp_path / "results")).exit_code == 0
    assert (tmp_path / "results" / "report" / "index.html").is_file()


def test_charts_highlight_the_source_and_never_draw_missing_values_as_numbers(tmp_path):
    run = load_run(write_results(tmp_path / "results"))
    charts = build_charts(run, *sources_and_thresholds(run, None))
    rate = next(c for c in charts["leakage"] if c.title == "leakage: rate/*")
    assert set(rate.lines) == {"villain (source)", "pirate", "assistant"}
    assert rate.highlight == "villain (source)"
    assert rate.base == {"villain (source)": 0.0, "pirate": 0.0, "assistant": 0.0}
    pirate = dict(rate.lines["pirate"])
    assert math.isnan(pirate[20]) and pirate[30] == pytest.approx(0.3)  # a gap, not 0, not interpolated
    assert rate.missing == [20] and rate.failed == []
    ratio = next(c for c in charts["collapse"] if c.title == "collapse: entropy_ratio")
    assert ratio.failed == [10] and [s for s, _ in ratio.lines["entropy_ratio"]] == [0, 20, 30]
    assert ratio.thresholds == [("alert below 0.6 (entropy_ratio_min)", 0.6)]  # from params.json
    drift = next(c for c in charts["collapse"] if c.title == "collapse: logprob_drift")
    assert drift.thresholds == [("alert above 2 (drift_max)", 2.0)]
    assert next(c for c in charts["collapse"] if c.title == "collapse: entropy").thresholds == []  # null: off
    # every step links to its per-sample JSON, failed ones too
    assert ratio.files == {s: run.dir / f"step-{s}" / "collapse.json" for s in (0, 10, 20, 30)}
    assert all(f.is_file() for f in ratio.files.values())


def test_thresholds_and_source_come_from_the_config_when_given(tmp_path):
    results = tmp_path / "results"
    write_results(results)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "base_model": "smollm2", "results_dir": str(results),
        "personas": {"source": "pirate", "prompts": {"villain": "V.", "pirate": "P.", "assistant": "A."}},
        "suites": {"leakage": {"marker": "zebra"}, "collapse": {"entropy_ratio_min": 0.5, "entropy_min": 0.9}}}))
    r = invoke("report", "-c", str(cfg), "--out", str(tmp_path / "page"))
    assert r.exit_code == 0, r.output
    from ckpt_watch.config import load_config

    config = load_config(cfg)
    run = load_run(results / "run1")
    charts = build_charts(run, *sources_and_thresholds(run, config))
    ratio = next(c for c in charts["collapse"] if c.title == "collapse: entropy_ratio")
    assert ratio.thresholds == [("alert below 0.5 (entropy_ratio_min)", 0.5)]
    assert next(c for c in charts["collapse"] if c.title == "collapse: entropy").thresholds == [
        ("alert below 0.9 (entropy_min)", 0.9)]
    rate = next(c for c in charts["leakage"] if c.title == "leakage: rate/*")
    assert rate.highlight == "pirate (source)"
    html = (tmp_path / "page" / "index.html").read_text()
    assert f"{cfg} (sha256 " in html


def test_a_suite_with_only_its_base_result(tmp_path):
    """…and a suite whose only result failed: it still gets a chart, with the ✕ marker."""
    run_dir = write_results(tmp_path / "results", steps=(0,), fail_collapse_at=None, nan_pirate_at=None)
    sink = JsonSink(tmp_path / "results")
    sink.start("run1", PARAMS)
    sink.write(_ckpt("run1", 10), SuiteResult.failure("heldout_loss", 10, "ValueError: bad data file"))
    r = invoke("report", "--results", str(tmp_path / "results"), "--out", str(tmp_path / "page"))
    assert r.exit_code == 0, r.output
    run = load_run(run_dir)
    charts = build_charts(run, *sources_and_thresholds(run, None))
    source = next(c for c in charts["leakage"] if c.title == "leakage: source_rate")
    assert source.lines == {"source_rate": [(0, 0.0)]} and source.base == {"source_rate": 0.0}
    (failed_only,) = charts["heldout_loss"]
    assert failed_only.lines == {} and failed_only.failed == [10]
    assert (tmp_path / "page" / "run1" / f"{failed_only.slug}.png").is_file()
    html = (tmp_path / "page" / "index.html").read_text()
    assert "newest evaluated</td><td>step 0" in html and "newest checkpoint seen</td><td>no ledger" in html


def test_synthetic_page_in_headless_chromium(tmp_path):
    """The page loads from file:// alone, every chart has pixels, the failed collapse point is a
    magenta ✕ on the collapse charts (and nowhere else), the NaN an orange ○ on the rate chart."""
    write_results(tmp_path / "results")
    assert invoke("report", "--results", str(tmp_path / "results"), "--out", str(tmp_path / "page")).exit_code == 0
    b = browse(tmp_path / "page" / "index.html", tmp_path / "shot.png")
    assert_rendered(b, n_charts=9)
    for box in b.boxes:
        magenta = near(crop(b, box), FAILED_COLOR)
        assert (magenta > 30) == (box["suite"] == "collapse"), (box["id"], magenta)
        assert (box["failed"] == "10") == (box["suite"] == "collapse")
    rate = next(x for x in b.boxes if x["id"].endswith("leakage--rate-each"))
    assert near(crop(b, rate), MISSING_COLOR) > 30
    html = (tmp_path / "page" / "index.html").read_text()
    assert '<tr class="failed" data-step="10">' in html and "RuntimeError: engine went away" in html
    assert "no value at step 20" in html


# -- slow: the real demo run ------------------------------------------------------------------


def _miskeyed_checkpoint(src: Path, dst: Path, step: int) -> Path:
    """A copy of a real trainer checkpoint whose adapter tensors are keyed for another model's
    layout (as tests/test_canary.py does): the HF engine loads it, PEFT applies none of it (only
    a warning), and the adapter canary fails the evaluation for real ("adapter had no effect")."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = dst / "adapter_model.safetensors"
    state = load_file(weights)
    assert any("model.model.layers." in k for k in state)
    save_file({k.replace("model.model.layers.", "model.transformer.h."): v for k, v in state.items()}, weights,
              metadata={"format": "pt"})
    trainer_state = json.loads((dst / "trainer_state.json").read_text())
    trainer_state["global_step"] = step
    (dst / "trainer_state.json").write_text(json.dumps(trainer_state))
    return dst


@pytest.mark.slow
def test_report_of_the_demo_run_in_headless_chromium(demo_out, tmp_path):
    """The session's real demo run (steps 0, 10, 20), copied, plus a real failed evaluation at
    step 30 (`ckpt-watch eval` of an adapter keyed for another model: the canary fails it); `report -c` on the
    copy, opened in Chromium: no console errors, only file:// requests, every chart drawn, the
    failed point marked on the charts and listed with its error, every step linked to its JSON."""
    assert demo_out.proc.returncode == 0, demo_out.proc.stderr[-3000:]
    results = tmp_path / "results"
    shutil.copytree(demo_out.out / "results", results)
    cfg = yaml.safe_load((demo_out.out / "ckpt-watch.yaml").read_text())
    cfg["results_dir"] = str(results)
    cfg["mlflow"] = {"enabled": False}
    cfg_path = tmp_path / "ckpt-watch.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    bad = _miskeyed_checkpoint(demo_out.out / "demo-run" / "checkpoint-20",
                               tmp_path / "other" / "checkpoint-30", 30)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    e = subprocess.run([sys.executable, "-m", "ckpt_watch", "eval", "-c", str(cfg_path), str(bad)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert e.returncode == 1, e.stdout[-2000:] + e.stderr[-3000:]  # 1: an evaluation failed
    lines = [json.loads(x) for x in (results / "demo-run" / "metrics.jsonl").read_text().splitlines()]
    assert {(m["step"], m["suite"], m["status"]) for m in lines} == {
        *((s, n, "ok") for s in (0, 10, 20) for n in ("leakage", "heldout_loss")),
        (30, "leakage", "error"), (30, "heldout_loss", "error")}

    r = invoke("report", "-c", str(cfg_path), "--out", str(tmp_path / "page"))
    assert r.exit_code == 0, r.output
    page = tmp_path / "page" / "index.html"
    html = page.read_text()
    assert "<td>run</td><td>demo-run</td>" in html and "<td>base model</td><td>smollm2</td>" in html
    assert "newest checkpoint seen</td><td>step 30 (ready)" in html
    assert "newest evaluated</td><td>step 20" in html and "newest fully evaluated</td><td>step 20" in html
    assert html.count('<tr class="failed" data-step="30">') == 2 and "adapter had no effect" in html

    run = load_run(results / "demo-run")
    charts = build_charts(run, *sources_and_thresholds(run, None))
    rate = next(c for c in charts["leakage"] if c.title == "leakage: rate/*")
    assert rate.highlight == "villain (source)" and len(rate.lines) == 4
    leak = {m["step"]: m["metrics"] for m in lines if m["suite"] == "leakage" and m["status"] == "ok"}
    assert rate.base["villain (source)"] == leak[0]["rate/villain"]
    assert dict(rate.lines["villain (source)"]) == {s: leak[s]["rate/villain"] for s in (0, 10, 20)}
    assert all(c.failed == [30] for cs in charts.values() for c in cs)
    for c in rate, *charts["heldout_loss"]:
        for step, f in c.files.items():
            assert f'href="../results/demo-run/step-{step}/{f.name}"' in html and f.is_file()

    n_charts = sum(len(cs) for cs in charts.values())
    b = browse(page, tmp_path / "shot.png")
    assert_rendered(b, n_charts=n_charts)
    for box in b.boxes:
        assert box["failed"] == "30" and near(crop(b, box), FAILED_COLOR) > 30, box["id"]
