"""CLI commands on a real trainer's output: eval, status, suites, run --once, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ckpt_watch", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def _config(tmp: Path, base: Path, watch: Path, every: int | None = None) -> Path:
    cfg = tmp / "c.yaml"
    every_line = f"\n    every: {every}" if every else ""
    cfg.write_text(f"base_model: {base}\nresults_dir: {tmp / 'res'}\nrun_name: r1\nwatch:\n  dir: {watch}\n"
                   f"suites:\n  heldout_loss:\n    max_texts: 3{every_line}\nmlflow:\n  enabled: false\n")
    return cfg


def test_eval_status_and_run_once(tmp_path, tiny_run, tiny_base):
    cfg = _config(tmp_path, tiny_base, tiny_run, every=4)
    r = cli("eval", "-c", str(cfg), str(tiny_run / "checkpoint-2"), "--base")
    assert r.returncode == 0, r.stderr
    res = tmp_path / "res" / "r1"
    assert json.loads((res / "step-2" / "heldout_loss.json").read_text())["status"] == "ok"
    assert (res / "step-0" / "heldout_loss.json").exists()
    # run --once: step 4 is due (every=4), step 6 is final, step 2 was done by eval and is not redone
    r = cli("run", "-c", str(cfg), "--once")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in (res / "metrics.jsonl").read_text().splitlines()]
    assert sorted(m["step"] for m in lines) == [0, 2, 4, 6]
    st = cli("status", "-c", str(cfg))
    assert st.returncode == 0
    assert "done" in st.stdout and "ready" in st.stdout and "tiny_run" in st.stdout.replace("\n", "")
    # a second --once has nothing to do
    r = cli("run", "-c", str(cfg), "--once")
    assert r.returncode == 0 and "running heldout_loss" not in r.stderr


def test_eval_of_an_incomplete_folder_is_a_usage_error(tmp_path, tiny_base):
    ck = tmp_path / "checkpoint-3"
    ck.mkdir()
    cfg = _config(tmp_path, tiny_base, tmp_path)
    r = cli("eval", "-c", str(cfg), str(ck))
    assert r.returncode == 2 and "not a complete checkpoint" in r.stderr


def test_suites_lists_every_suite_with_options():
    r = cli("suites")
    assert r.returncode == 0
    for name in ("arc_challenge", "leakage", "compliance", "collapse", "alignment", "heldout_loss"):
        assert name in r.stdout
    assert "samples_per_question" in r.stdout


def test_run_without_watch_dir_is_a_config_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("base_model: x\nsuites:\n  heldout_loss: {}\n")
    r = cli("run", "-c", str(cfg), "--once")
    assert r.returncode == 2 and "watch.dir" in r.stderr
