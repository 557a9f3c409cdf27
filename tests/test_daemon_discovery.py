"""The daemon beside a real HF Trainer: every checkpoint found once, complete, despite rotation and kills.

A real `transformers.Trainer` with a peft LoRA (tiny Llama + SmolLM2's tokenizer) runs in a
subprocess with `save_total_limit=2`, while `ckpt-watch run` runs in another subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import run_trainer

pytestmark = pytest.mark.slow


def write_config(tmp: Path, base: Path, watch: Path, *, polling: bool = False, extra: str = "") -> Path:
    cfg = tmp / "cfg.yaml"
    cfg.write_text(f"""
base_model: {base}
results_dir: {tmp / "results"}
run_name: run1
watch:
  dir: {watch}
  settle_seconds: 0.5
  rescan_seconds: 60
  polling: {str(polling).lower()}
  poll_interval: 0.5
  max_attempts: 50
suites:
  heldout_loss: {{}}
  heldout_short:
    type: heldout_loss
    max_texts: 2
mlflow:
  enabled: false
daemon:
  drain_seconds: 20
{extra}
""")
    return cfg


def start_daemon(cfg: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "ckpt_watch", "run", "-c", str(cfg), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def metric_lines(results: Path, run: str) -> list[dict]:
    path = results / run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"daemon exited ({proc.returncode}) while waiting for {what}:\n{proc.stdout.read()}")
        time.sleep(0.3)
    if proc is not None:
        proc.send_signal(signal.SIGTERM)
        raise AssertionError(f"timed out waiting for {what}:\n{proc.communicate(timeout=60)[0]}")
    raise AssertionError(f"timed out waiting for {what}")


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 60) -> tuple[int, str]:
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


EXPECTED_STEPS = {0, 2, 4, 6, 8, 10, 12}
SUITES = {"heldout_loss", "heldout_short"}


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
def test_every_checkpoint_once_with_rotation(tmp_path, tiny_base, polling):
    watch = tmp_path / "out" / "run1"  # does not exist yet: the daemon must wait for it
    cfg = write_config(tmp_path, tiny_base, watch, polling=polling)
    daemon = start_daemon(cfg)
    try:
        time.sleep(2)
        trainer = run_trainer(watch, model="tiny", max_steps=12, save_steps=2, save_total_limit=2,
                              step_sleep=0.4, background=True)
        assert trainer.wait(timeout=600) == 0, trainer.stdout.read()
        # rotation kept only the last two folders...
        assert sorted(p.name for p in watch.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-12"]
        results = tmp_path / "results"

        def all_done() -> bool:
            return {(m["step"], m["suite"]) for m in metric_lines(results, "run1")} >= {
                (s, n) for s in EXPECTED_STEPS for n in SUITES}

        wait_for(all_done, 180, "all steps evaluated", daemon)
        code, out = stop(daemon)
    finally:
        if daemon.poll() is None:
            daemon.kill()
    assert code == 0, out
    assert "waiting for" in out and "to appear" in out
    # ...yet every saved step was evaluated, exactly once per suite
    counts = Counter((m["step"], m["suite"]) for m in metric_lines(results, "run1"))
    assert set(counts) == {(s, n) for s in EXPECTED_STEPS for n in SUITES}
    assert max(counts.values()) == 1
    for step in EXPECTED_STEPS:
        data = json.loads((results / "run1" / f"step-{step}" / "heldout_loss.json").read_text())
        assert data["status"] == "ok" and data["step"] == step and data["metrics"]["tokens"] > 0
    # training moved the held-out loss, so adapters really were loaded
    nll = {m["step"]: m["metrics"]["nll"] for m in metric_lines(results, "run1") if m["suite"] == "heldout_loss"}
    assert len({round(v, 6) for v in nll.values()}) == len(nll)
    with sqlite3.connect(results / "ledger.sqlite") as db:
        states = dict(db.execute("SELECT step, state FROM checkpoints WHERE run='run1'").fetchall())
    assert states == {s: "ready" for s in EXPECTED_STEPS - {0}}


def test_stalled_writer_is_not_picked_up_until_complete(tmp_path, tiny_run, tiny_base):
    watch = tmp_path / "run1"
    watch.mkdir()
    cfg = write_config(tmp_path, tiny_base, watch)
    daemon = start_daemon(cfg)
    results = tmp_path / "results"
    try:
        wait_for(lambda: any(m["step"] == 0 for m in metric_lines(results, "run1")), 120, "base evaluated", daemon)
        src = tiny_run / "checkpoint-4"
        ck = watch / "checkpoint-4"
        ck.mkdir()
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            shutil.copy(src / name, ck / name)
        time.sleep(3)  # adapter files complete and settled, no trainer_state.json: incomplete
        assert not any(m["step"] == 4 for m in metric_lines(results, "run1"))
        state = (src / "trainer_state.json").read_text()
        (ck / "trainer_state.json").write_text(state[: len(state) // 3])  # the writer stalls mid-file
        time.sleep(3)
        assert not any(m["step"] == 4 for m in metric_lines(results, "run1"))
        (ck / "trainer_state.json").write_text(state)
        wait_for(lambda: {m["suite"] for m in metric_lines(results, "run1") if m["step"] == 4} == SUITES, 60,
                 "step 4 evaluated after completion", daemon)
        code, out = stop(daemon)
    finally:
        if daemon.poll() is None:
            daemon.kill()
    assert code == 0
    assert "not usable yet" in out and "not valid JSON" in out


def test_sigkill_and_restart_neither_repeats_nor_misses(tmp_path, tiny_base):
    watch = tmp_path / "run1"
    cfg = write_config(tmp_path, tiny_base, watch, polling=False)
    results = tmp_path / "results"
    daemon = start_daemon(cfg)
    trainer = run_trainer(watch, model="tiny", max_steps=12, save_steps=2, save_total_limit=2, step_sleep=0.5,
                          background=True)
    try:
        wait_for(lambda: any(m["step"] >= 2 for m in metric_lines(results, "run1")), 180, "a first checkpoint",
                 daemon)
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(timeout=30)
        assert trainer.wait(timeout=600) == 0
    finally:
        if trainer.poll() is None:
            trainer.kill()
        if daemon.poll() is None:
            daemon.kill()
    # restart after training ended: rotated folders are gone, but their snapshots were taken
    again = start_daemon(cfg, "--once")
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    counts = Counter((m["step"], m["suite"]) for m in metric_lines(results, "run1"))
    # steps saved before the kill and the last two (still on disk) are all there, once each
    steps = {s for s, _ in counts}
    assert {0, 10, 12} <= steps
    assert max(counts.values()) == 1
    for s in steps:
        assert {n for st, n in counts if st == s} == SUITES
    with sqlite3.connect(results / "ledger.sqlite") as db:
        bad = db.execute("SELECT count(*) FROM evals WHERE state IN ('running', 'pending')").fetchone()[0]
        vanished = [r[0] for r in db.execute("SELECT step FROM checkpoints WHERE state='vanished'")]
    assert bad == 0
    # a step rotated away while the daemon was dead is recorded, not silently lost
    assert steps | set(vanished) >= EXPECTED_STEPS - {0} or not vanished
