"""CLI commands on a real trainer's output: eval, status, suites, run --once, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "250"}  # rich tables (status) wide enough not to fold paths
    return subprocess.run([sys.executable, "-m", "ckpt_watch", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


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
    # --- status (issue 14): the new summary (tests/test_status.py checks its values) ---
    assert "newest complete checkpoint: step 6; fully evaluated: step 6 (keeping up)" in st.stdout, st.stdout
    assert "heldout_loss" in st.stdout and "nll " in st.stdout
    # a second --once has nothing to do
    r = cli("run", "-c", str(cfg), "--once")
    assert r.returncode == 0 and "running heldout_loss" not in r.stderr
    # README's other forms: --watch names the trainer's dir, --force redoes what is done
    (tmp_path / "other").mkdir()
    elsewhere = _config(tmp_path / "other", tiny_base, tmp_path / "nothing-here", every=4)
    r = cli("run", "-c", str(elsewhere), "--watch", str(tiny_run), "--once")
    assert r.returncode == 0, r.stderr
    other = [json.loads(x) for x in (tmp_path / "other" / "res" / "r1" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(m["step"] for m in other) == [0, 4, 6]

    def started() -> dict[int, str]:
        return {s: json.loads((res / f"step-{s}" / "heldout_loss.json").read_text())["started_at"]
                for s in (0, 2, 4, 6)}

    before = started()
    r = cli("run", "-c", str(cfg), "--once", "--force")
    assert r.returncode == 0, r.stderr
    after = started()
    assert all(after[s] > before[s] for s in before), (before, after)  # every evaluation was redone
    assert len((res / "metrics.jsonl").read_text().splitlines()) == len(lines)  # one line per (step, suite)


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


_LOG_PROBE = """
import logging, sys, tempfile
from ckpt_watch.cli import setup_logging
setup_logging(verbose=sys.argv[1] == "1")
if sys.argv[1] == "0":  # creating a store is slow: once is enough
    from mlflow.tracking import MlflowClient  # mlflow configures its own loggers at import

    MlflowClient(tracking_uri=f"sqlite:///{tempfile.mkdtemp()}/mlflow.db").search_experiments()
# the HTTP client under openai logs every request at INFO; its logger's name varies with the install
for name in ("httpx", "httpx2", "httpcore2.http11", "some.library"):
    logging.getLogger(name).info('HTTP Request: POST http://127.0.0.1/v1/completions "HTTP/1.1 200 OK" (%s)', name)
logging.getLogger("some.library").warning("a third-party warning")
logging.getLogger("ckpt_watch.daemon").info("our own info line")
logging.getLogger("ckpt_watch.daemon").debug("our own debug line")
"""


def _log_probe(verbose: bool) -> str:
    r = subprocess.run([sys.executable, "-c", _LOG_PROBE, "1" if verbose else "0"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stderr


def test_third_party_loggers_stay_at_warning_by_default():
    """Real MLflow store creation and log records under the names the installed HTTP stack uses."""
    log = _log_probe(verbose=False)
    assert "HTTP/1.1 200" not in log
    assert "Creating initial MLflow database tables" not in log
    assert "a third-party warning" in log and "our own info line" in log
    assert "our own debug line" not in log


def test_verbose_brings_third_party_info_back():
    log = _log_probe(verbose=True)
    for name in ("httpx", "httpx2", "httpcore2.http11", "some.library"):
        assert f'"HTTP/1.1 200 OK" ({name})' in log
    assert "our own debug line" in log


def test_validate_refuses_a_launch_command_whose_python_has_no_vllm(tmp_path):
    """The base interpreter a venv's bin/python links to has no vllm: exit 2 at once, naming the
    field and the interpreter (not a server that dies ~90 s later)."""
    base_python = os.path.realpath(sys.executable)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"base_model: smollm2\nresults_dir: {tmp_path / 'res'}\nsuites:\n  heldout_loss: {{}}\n"
                   "engine:\n  kind: vllm\n  launch:\n"
                   f"    command: [{base_python}, -m, vllm.entrypoints.openai.api_server]\n")
    t0 = time.monotonic()
    r = cli("validate", str(cfg))
    assert time.monotonic() - t0 < 60
    assert r.returncode == 2, r.stdout + r.stderr
    err = " ".join(r.stderr.split())  # rich may wrap the line
    assert "engine.launch.command" in err
    assert f"the interpreter {base_python} cannot import vllm (ModuleNotFoundError: No module named 'vllm')" in err
    # and the daemon refuses the same way, before any ledger or server exists
    r = cli("run", "-c", str(cfg), "--watch", str(tmp_path), "--once")
    assert r.returncode == 2 and "engine.launch.command" in r.stderr
    assert not (tmp_path / "res").exists()
    # a config meant for another machine can skip the check
    r = cli("validate", "--no-engine-check", str(cfg))
    assert r.returncode == 0, r.stderr
