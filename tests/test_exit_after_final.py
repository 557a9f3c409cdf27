"""`run --exit-after-final`: a daemon that ends by itself once the training run's final checkpoint
and everything due before it are evaluated (a Kubernetes Job's sidecar, deploy/kubernetes/)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.faults.harness import ledger_rows
from tests.test_daemon_discovery import wait_for

pytestmark = pytest.mark.slow


def _copy_checkpoint(src: Path, watch: Path) -> None:
    """Land a checkpoint the way a trainer's rename does: written under tmp-*, then renamed."""
    tmp = watch / f"tmp-{src.name}"
    shutil.copytree(src, tmp)
    tmp.rename(watch / src.name)


def test_exits_once_final_checkpoint_is_evaluated(tmp_path: Path, tiny_run: Path, tiny_base: Path) -> None:
    watch = tmp_path / "out"
    watch.mkdir()
    for step in (2, 4):
        _copy_checkpoint(tiny_run / f"checkpoint-{step}", watch)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"""
base_model: {tiny_base}
results_dir: {tmp_path / "results"}
run_name: r1
watch: {{dir: {watch}, settle_seconds: 0.2}}
engine: {{kind: hf}}
suites:
  heldout_loss: {{max_texts: 2}}
mlflow: {{enabled: false}}
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ckpt_watch", "run", "-c", str(cfg), "--exit-after-final"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def done() -> set[int]:
            return {r[0] for r in ledger_rows(tmp_path / "results", "SELECT step FROM evals WHERE state='done'")}

        wait_for(lambda: done() == {0, 2, 4}, 300, "steps 0, 2, 4 evaluated", proc)
        time.sleep(3)  # idle with every available checkpoint evaluated, but not the final one: still running
        assert proc.poll() is None, proc.stdout.read()
        _copy_checkpoint(tiny_run / "checkpoint-6", watch)  # global_step 6 == max_steps: the final one
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out[-3000:]
    assert done() == {0, 2, 4, 6}
    assert "final checkpoint (step 6)" in out
    rows = ledger_rows(tmp_path / "results", "SELECT step, suite, state FROM evals")
    assert sorted(rows) == [(s, "heldout_loss", "done") for s in (0, 2, 4, 6)]
