"""Configuration errors: `ckpt-watch validate` (and `run`) exit 2 and name every bad field by its
dotted path, all at once; nothing is started and nothing is written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

UNSET_VAR = "CKPT_WATCH_FAULT_UNSET_VAR"
UNSET_KEY = "CKPT_WATCH_FAULT_UNSET_KEY"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in (UNSET_VAR, UNSET_KEY)}
    env["COLUMNS"] = "250"  # one problem per line, however long
    return subprocess.run([sys.executable, "-m", "ckpt_watch", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def problems(stderr: str) -> dict[str, str]:
    """`  dotted.path: reason` lines → {path: reason}."""
    out = {}
    for line in stderr.splitlines():
        if line.startswith("  ") and ": " in line:
            path, reason = line.strip().split(": ", 1)
            out[path] = reason
    return out


def test_config_errors(tmp_path: Path, fault_record) -> None:
    results = tmp_path / "results"
    tiny_base = tmp_path / "base"  # never loaded: validation only
    many = tmp_path / "many.yaml"
    many.write_text(f"""
base_model: {tiny_base}
results_dir: {results}
watch:
  dir: {tmp_path / "watch"}
  settle_seconds: -1
  layout: zip
engine: {{kind: hf, batch_size: 0}}
suites:
  quick: {{type: heldout_loss, max_texts: 0}}
  bogus: {{type: no_such_suite}}
  slow: {{type: heldout_loss, path: {tmp_path / "missing.txt"}}}
mlflow: {{tracking_url: "http://127.0.0.1:1"}}
daemon: {{max_suite_attempts: 0}}
""")
    env_var = tmp_path / "env.yaml"
    env_var.write_text(f"""
base_model: ${{{UNSET_VAR}}}
results_dir: {results}
suites: {{quick: {{type: heldout_loss}}}}
""")
    judge_key = tmp_path / "judge.yaml"
    judge_key.write_text(f"""
base_model: {tiny_base}
results_dir: {results}
suites: {{alignment: {{type: alignment}}}}
judge: {{model: some-judge, api_key_env: {UNSET_KEY}}}
""")
    vllm_mode = tmp_path / "vllm.yaml"
    vllm_mode.write_text(f"""
base_model: {tiny_base}
results_dir: {results}
suites: {{quick: {{type: heldout_loss}}}}
engine: {{kind: vllm}}
""")
    expected = {
        many: {
            "watch.settle_seconds": "greater than or equal to 0",
            "watch.layout": "'hf', 'torchtune' or 'glob'",
            "engine.batch_size": "greater than or equal to 1",
            "suites.quick.max_texts": "greater than or equal to 1",
            "suites.bogus": "no_such_suite",
            "suites.slow": "missing.txt does not exist",
            "mlflow.tracking_url": "Extra inputs are not permitted",
            "daemon.max_suite_attempts": "greater than or equal to 1",
        },
        env_var: {"base_model": f"environment variable {UNSET_VAR} is not set"},
        judge_key: {"(top level)": f"judge.api_key_env: environment variable {UNSET_KEY} is not set"},
        vllm_mode: {"engine": "needs exactly one of 'url' (attach), 'replicas' (attach to several) or 'launch' "
                              "(managed)"},
    }
    handled = 0
    seen: dict[Path, tuple[int, dict[str, str]]] = {}
    for cfg, want in expected.items():
        done = cli("validate", str(cfg))
        got = problems(done.stderr)
        seen[cfg] = (done.returncode, got)
        handled += done.returncode == 2 and set(got) == set(want) and all(want[p] in got[p] for p in want)
    # `run` refuses the same file before starting anything
    run = cli("run", "-c", str(many), "--once")
    refused = run.returncode == 2 and set(problems(run.stderr)) == set(expected[many]) and not results.exists()
    good = tmp_path / "good.yaml"
    good.write_text(f"base_model: {tiny_base}\nresults_dir: {results}\nsuites: {{quick: {{type: heldout_loss}}}}\n")
    ok = cli("validate", str(good))
    fault_record(expected=0, evaluated=0, duplicated=0, faulty=(handled + refused, len(expected) + 1))
    for cfg, want in expected.items():
        code, got = seen[cfg]
        assert code == 2, (cfg.name, got)
        assert set(got) == set(want), (cfg.name, got)
        for path, reason in want.items():
            assert reason in got[path], (path, got[path])
    assert refused, (run.returncode, run.stderr)
    assert ok.returncode == 0 and "1 suite(s): quick" in ok.stdout, ok.stdout + ok.stderr
