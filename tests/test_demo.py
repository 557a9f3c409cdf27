"""The README's main job, end to end: `ckpt-watch demo` trains a real LoRA and evaluates it live."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_trains_and_evaluates_every_checkpoint(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([sys.executable, "-m", "ckpt_watch", "demo", "--out", str(out), "--steps", "20",
                        "--save-steps", "10"], capture_output=True, text=True, env=env, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "metrics by training step" in r.stdout and "mlflow ui --backend-store-uri" in r.stdout
    lines = [json.loads(x) for x in (out / "results" / "demo-run" / "metrics.jsonl").read_text().splitlines()]
    got = {(m["step"], m["suite"]) for m in lines}
    assert got == {(s, n) for s in (0, 10, 20) for n in ("leakage", "heldout_loss")}
    assert len(lines) == len(got)
    leak = {m["step"]: m["metrics"] for m in lines if m["suite"] == "leakage"}
    # the marker is learnt by the source persona and is rarer elsewhere
    assert leak[0]["source_rate"] <= 0.1
    assert leak[20]["source_rate"] >= 0.5
    assert leak[20]["source_rate"] > leak[20]["other_mean"]
    # the same points are in the MLflow store, at the training steps
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'results' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ckpt-watch")
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`ckpt_watch.run_name` = 'demo-run'")
    hist = client.get_metric_history(run.info.run_id, "leakage/source_rate")
    assert sorted(p.step for p in hist) == [0, 10, 20]
    assert {p.step: p.value for p in hist}[20] == pytest.approx(leak[20]["source_rate"])
