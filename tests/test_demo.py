"""The README's main job, end to end: `ckpt-watch demo` trains a real LoRA and evaluates it live;
where `--engine vllm` finds its interpreter; the trainer never outlives the demo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ckpt_watch.demo.run import DemoError, project_root, vllm_python
from tests.test_preflight import BASE_PYTHON, fake_venv_with_vllm

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_trains_and_evaluates_every_checkpoint(demo_out):
    """`ckpt-watch demo --steps 20 --save-steps 10`, run once per session by conftest's `demo_out`
    (tests/test_report.py reports on the same run)."""
    out, r = demo_out.out, demo_out.proc
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


def _trainers(out: Path) -> list[int]:
    """Live (non-zombie) pids whose command line is this demo's trainer."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if b"ckpt_watch.demo.train" in cmd and str(out / "demo-run").encode() in cmd and state != "Z":
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_demo_stops_its_trainer_when_the_evaluation_side_fails(tmp_path):
    """The daemon fails for real right after the trainer starts: its results dir is a file."""
    out = tmp_path / "demo"
    out.mkdir()
    (out / "results").write_text("not a directory\n")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    try:
        r = subprocess.run([sys.executable, "-m", "ckpt_watch", "demo", "--out", str(out), "--steps", "20"],
                           capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode != 0
        assert "training a LoRA for 20 steps" in r.stdout  # the trainer was started
        assert "stopping the trainer" in r.stderr
        assert _trainers(out) == []
    finally:
        for pid in _trainers(out):  # without the fix: the orphan keeps training
            os.kill(pid, signal.SIGKILL)


def test_vllm_python_is_the_checkouts_venv_as_given(tmp_path, monkeypatch):
    """Not resolve()d (a venv's bin/python is a symlink to the base interpreter, which loses the
    venv), and anchored at the project root, not the current directory."""
    assert project_root() == REPO  # an editable install: the checkout beside the package
    python = fake_venv_with_vllm(tmp_path / ".venv-vllm")
    monkeypatch.chdir(tmp_path.parent)
    assert vllm_python(environ={}, root=tmp_path) == str(python)
    assert Path(vllm_python(environ={}, root=tmp_path)).is_symlink()


def test_vllm_python_env_first_then_the_venv_then_a_message_naming_both(tmp_path):
    python = fake_venv_with_vllm(tmp_path / "checkout" / ".venv-vllm")
    env = {"CKPT_WATCH_VLLM_PYTHON": str(python)}
    assert vllm_python(environ=env, root=tmp_path / "elsewhere") == str(python)
    # an interpreter without vllm in the variable: the checkout's venv is next
    env = {"CKPT_WATCH_VLLM_PYTHON": str(BASE_PYTHON)}
    assert vllm_python(environ=env, root=tmp_path / "checkout") == str(python)
    with pytest.raises(DemoError) as exc:
        vllm_python(environ=env, root=tmp_path / "elsewhere")
    msg = str(exc.value)
    assert f"$CKPT_WATCH_VLLM_PYTHON: the interpreter {BASE_PYTHON} cannot import vllm" in msg
    assert f"the project's .venv-vllm: the interpreter {tmp_path / 'elsewhere'}/.venv-vllm/bin/python does not exist" \
        in msg
    assert "bash scripts/setup.sh --with-vllm" in msg and "set CKPT_WATCH_VLLM_PYTHON" in msg
    # a package install (no checkout) and no variable
    with pytest.raises(DemoError) as exc:
        vllm_python(environ={}, root=None)
    assert "$CKPT_WATCH_VLLM_PYTHON is not set" in str(exc.value)
    assert "installed as a package" in str(exc.value)
