"""Alerts: the rules on real results, fired once per (rule, step) across restarts; the MLflow tag
through a real MLflow store; the documented TrainerCallback stopping a real HF Trainer; and a
real alert end to end (`ckpt-watch eval` on the tiny trained run)."""

from __future__ import annotations

import inspect
import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from ckpt_watch.alerts import ALERTS_FILE, Alerts, read_alerts
from ckpt_watch.config import AlertRule, AlertsConfig, MlflowConfig
from ckpt_watch.core import Checkpoint, ResultStatus, SuiteResult, utcnow
from ckpt_watch.sinks.jsonfiles import JsonSink
from ckpt_watch.sinks.mlflow import RUN_NAME_TAG, MlflowSink
from ckpt_watch.suites.collapse import CollapseConfig
from tests.test_cli import cli

REPO = Path(__file__).resolve().parents[1]
RUN = "r1"


def _result(suite: str, step: int, info: dict | None = None, **metrics: float) -> SuiteResult:
    return SuiteResult(suite=suite, step=step, status=ResultStatus.OK, metrics=dict(metrics), info=info or {},
                       finished_at=utcnow())


def _ckpt(step: int) -> Checkpoint:
    return Checkpoint.base(RUN) if step == 0 else Checkpoint(RUN, step, Path(f"/x/checkpoint-{step}"), None)


def _planned(name: str, kind: str, config: object | None = None) -> SimpleNamespace:
    # what the evaluator hands the hook: a suite's name and its config (only `type` and thresholds are read)
    return SimpleNamespace(name=name, config=config if config is not None else SimpleNamespace(type=kind))


def _wait_for_commands() -> None:
    for t in [t for t in threading.enumerate() if t.name == "alert-command"]:
        t.join(timeout=60)


def test_each_rule_fires_once_per_step_and_survives_a_restart(tmp_path: Path) -> None:
    results = tmp_path / "res"
    cfg = AlertsConfig(misaligned_rate_above=0.2, arc_below_base_fraction=0.8, leakage_source_rate_above=0.5,
                       rules=[AlertRule(metric="heldout_loss/nll", above=3.0)], stop_file=tmp_path / "STOP")
    alerts = Alerts(cfg, results, RUN, sinks=[])
    # ARC's base (step 0) as the JSON sink writes it: the fraction is taken of its acc
    json_sink = JsonSink(results)
    json_sink.start(RUN, {})
    json_sink.write(_ckpt(0), _result("arc", 0, acc=0.5))
    arc = _planned("arc", "arc_challenge")

    assert alerts.check(_ckpt(0), arc, _result("arc", 0, acc=0.1)) == []  # never on the base model
    assert alerts.check(_ckpt(2), arc, _result("arc", 2, acc=0.41)) == []  # 0.41 ≥ 0.8 × 0.5
    fired = alerts.check(_ckpt(4), arc, _result("arc", 4, acc=0.39))
    assert [(a.rule, a.step, a.metric, a.value, a.threshold) for a in fired] == [
        ("arc_below_base", 4, "arc/acc", 0.39, pytest.approx(0.4))]
    collapse = _planned("collapse", "collapse", CollapseConfig())
    fired = alerts.check(_ckpt(4), collapse, _result("collapse", 4, {"alerts": ["self_rouge_l"]},
                                                     alert=1.0, self_rouge_l=0.9))
    assert [(a.rule, a.metric, a.value, a.threshold) for a in fired] == [
        ("collapse", "collapse/self_rouge_l", 0.9, 0.85)]
    assert alerts.check(_ckpt(6), collapse, _result("collapse", 6, alert=0.0, self_rouge_l=0.5)) == []
    align = _planned("em", "alignment")
    assert alerts.check(_ckpt(6), align, _result("em", 6, misaligned_rate=float("nan"))) == []  # NaN: never
    assert [a.rule for a in alerts.check(_ckpt(6), align, _result("em", 6, misaligned_rate=0.25))] == [
        "misaligned_rate"]
    leak = _planned("leak", "leakage")
    assert [a.value for a in alerts.check(_ckpt(6), leak, _result("leak", 6, source_rate=0.75))] == [0.75]
    # a generic rule matches the configured suite name and its versioned series alike
    held = _planned("heldout_loss", "heldout_loss")
    fired = alerts.check(_ckpt(8), held, _result("heldout_loss.v2", 8, nll=3.5))
    assert [(a.rule, a.metric) for a in fired] == [("heldout_loss.nll_above", "heldout_loss.v2/nll")]
    assert alerts.check(_ckpt(8), held, _result("heldout_loss.v2", 8, nll=2.5)) == []

    # a restart (new instance) re-delivering the same results fires nothing again
    again = Alerts(cfg, results, RUN, sinks=[])
    assert again.check(_ckpt(4), arc, _result("arc", 4, acc=0.39)) == []
    assert again.check(_ckpt(6), leak, _result("leak", 6, source_rate=0.9)) == []
    records = read_alerts(results / RUN)
    assert [(r["rule"], r["step"]) for r in records] == [
        ("arc_below_base", 4), ("collapse", 4), ("misaligned_rate", 6), ("leakage_source_rate", 6),
        ("heldout_loss.nll_above", 8)]
    assert json.loads((tmp_path / "STOP").read_text())["rule"] == "heldout_loss.nll_above"  # the latest

    # a torn last line (a crash mid-append) is skipped, and the next record starts on its own line
    with open(results / RUN / ALERTS_FILE, "a") as fh:
        fh.write('{"rule": "torn", "st')
    assert [a.step for a in again.check(_ckpt(10), leak, _result("leak", 10, source_rate=0.6))] == [10]
    assert read_alerts(results / RUN)[-1]["step"] == 10


def test_alert_tag_goes_through_the_mlflow_outbox_and_a_failing_command_is_not_fatal(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    results = tmp_path / "res"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sink = MlflowSink(MlflowConfig(tracking_uri=uri), results, background=False, close_timeout=30)
    sink.start(RUN, {"engine": "hf"})
    cfg = AlertsConfig(rules=[AlertRule(metric="leak/source_rate", above=0.1, name="leak")],
                       command=[sys.executable, "-c", "import sys; sys.exit(3)"])
    alerts = Alerts(cfg, results, RUN, sinks=[sink])
    with caplog.at_level(logging.ERROR, logger="ckpt_watch.alerts"):
        assert len(alerts.check(_ckpt(12), _planned("leak", "leakage"), _result("leak", 12, source_rate=0.4))) == 1
        _wait_for_commands()
    assert "exited 3" in caplog.text
    sink.close()
    client = MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("ckpt-watch").experiment_id],
                             filter_string=f"tags.`{RUN_NAME_TAG}` = '{RUN}'")[0]
    assert run.data.tags["ckpt_watch.alert.leak"] == "12"


@pytest.mark.slow
def test_the_documented_callback_stops_a_real_trainer(tmp_path: Path) -> None:
    from ckpt_watch.demo.train import StopOnFile

    # docs/alerts.md shows this very class
    assert inspect.getsource(StopOnFile).strip() in (REPO / "docs" / "alerts.md").read_text()
    out, stop = tmp_path / "run", tmp_path / "STOP"
    cmd = [sys.executable, "-m", "ckpt_watch.demo.train", "--out", str(out), "--model", "tiny", "--max-steps", "200",
           "--save-steps", "2", "--step-sleep", "0.2", "--threads", "1", "--stop-file", str(stop)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoint-4").is_dir():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.1)
        stop.write_text("{}")  # what ckpt-watch's alert does, mid-run
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-3000:]
    trained = int(output.rsplit("trained ", 1)[1].split()[0])
    assert 4 <= trained <= 10, output[-2000:]  # stopped within a few steps of the file, not at 200
    assert max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")) <= trained


ENV_DUMP = ("import json, os, sys; json.dump({k: v for k, v in os.environ.items() "
            "if k.startswith('CKPT_WATCH_ALERT_')}, open(sys.argv[1], 'w'))")


@pytest.mark.slow
def test_a_real_alert_end_to_end(tmp_path: Path, tiny_run: Path, tiny_base: Path) -> None:
    stop, env_file = tmp_path / "STOP", tmp_path / "alert-env.json"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"base_model: {tiny_base}\nresults_dir: {tmp_path / 'res'}\nrun_name: {RUN}\nwatch:\n  dir: {tiny_run}\n"
        "suites:\n  heldout_loss:\n    max_texts: 3\n"
        # an untrained tiny model: its held-out nll is far above 1, so the rule must fire
        f"alerts:\n  rules:\n    - {{metric: heldout_loss/nll, above: 1.0}}\n  stop_file: {stop}\n"
        f"  command: [{sys.executable}, -c, \"{ENV_DUMP}\", {env_file}]\n")
    r = cli("eval", "-c", str(cfg), str(tiny_run / "checkpoint-2"))
    assert r.returncode == 0, r.stderr
    res = tmp_path / "res" / RUN
    first = json.loads((res / "step-2" / "heldout_loss.json").read_text())
    nll = first["metrics"]["nll"]
    records = read_alerts(res)
    assert [(a["rule"], a["step"], a["metric"], a["threshold"]) for a in records] == [
        ("heldout_loss.nll_above", 2, "heldout_loss/nll", 1.0)]
    assert records[0]["value"] == pytest.approx(nll) and nll > 1.0
    assert json.loads(stop.read_text())["step"] == 2
    env = json.loads(env_file.read_text())
    assert env["CKPT_WATCH_ALERT_RULE"] == "heldout_loss.nll_above"
    assert (env["CKPT_WATCH_ALERT_STEP"], env["CKPT_WATCH_ALERT_RUN"]) == ("2", RUN)
    assert float(env["CKPT_WATCH_ALERT_VALUE"]) == pytest.approx(nll)
    client = MlflowClient(tracking_uri=f"sqlite:///{(tmp_path / 'res' / 'mlflow.db').resolve()}")
    run = client.search_runs([client.get_experiment_by_name("ckpt-watch").experiment_id])[0]
    assert run.data.tags["ckpt_watch.alert.heldout_loss.nll_above"] == "2"

    # evaluated again (--force): the same (rule, step) does not fire twice
    env_file.unlink()
    stop.unlink()
    r = cli("eval", "-c", str(cfg), str(tiny_run / "checkpoint-2"), "--force")
    assert r.returncode == 0, r.stderr
    assert json.loads((res / "step-2" / "heldout_loss.json").read_text())["finished_at"] != first["finished_at"]
    assert len(read_alerts(res)) == 1
    assert not env_file.exists() and not stop.exists()


def test_the_documented_alerts_block_validates() -> None:
    import re

    import yaml

    block = re.search(r"```yaml\n(.*?)```", (REPO / "docs" / "alerts.md").read_text(), re.S)
    assert block is not None
    cfg = AlertsConfig.model_validate(yaml.safe_load(block.group(1))["alerts"])
    assert [r.rule_name() for r in cfg.rules] == ["heldout_loss.nll_above", "capability"]
    assert cfg.arc_below_base_fraction == 0.9 and cfg.command == ["notify-send", "ckpt-watch alert"]
    with pytest.raises(ValueError, match="exactly one"):
        AlertRule(metric="arc/acc", above=0.1, below=0.5)
