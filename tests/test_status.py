"""`ckpt-watch status` on real ledgers: a real `run --once` of the tiny trainer's checkpoints (one
suite fails for real: its held-out file holds no text), a real daemon subprocess, and an MLflow
tracking URI on a closed loopback port, which really leaves every point in the outbox."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.faults.harness import DaemonProc, wait_until

RUN, DAEMON_RUN = "r1", "r2"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ckpt_watch", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200", **(env or {})}, timeout=300)


def status_json(*args: str) -> dict:
    r = cli("status", "--json", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on return: nothing listens there


@pytest.fixture(scope="module")
def ran(tmp_path_factory, tiny_run, tiny_base) -> dict[str, Path]:
    """`run --once` over checkpoint-2/-4/-6: heldout_loss every "50%" (base, 4, 6 due; 2 skipped)
    and `broken` (heldout_loss on an empty text file) at step 6 only, where it fails for real."""
    tmp = tmp_path_factory.mktemp("status")
    (tmp / "empty.txt").write_text("\n\n  \n")
    cfg = tmp / "c.yaml"
    cfg.write_text(
        f"base_model: {tiny_base}\nresults_dir: {tmp / 'res'}\nrun_name: {RUN}\n"
        f"watch: {{dir: {tiny_run}, settle_seconds: 0}}\n"
        "suites:\n  heldout_loss: {max_texts: 3, every: '50%'}\n"
        f"  broken: {{type: heldout_loss, path: {tmp / 'empty.txt'}, every: 6, base: false}}\n"
        "daemon: {max_suite_attempts: 1}\n"
        f"mlflow: {{enabled: true, tracking_uri: 'http://127.0.0.1:{_closed_port()}', experiment: st, "
        "flush_seconds: 0.5}\n")
    r = cli("run", "-c", str(cfg), "--once")
    assert r.returncode == 1, r.stderr  # the broken suite failed
    return {"cfg": cfg, "res": tmp / "res", "tmp": tmp}


def _metrics(res: Path, run: str) -> dict[tuple[int, str], dict]:
    lines = [json.loads(x) for x in (res / run / "metrics.jsonl").read_text().splitlines()]
    return {(m["step"], m["suite"]): m for m in lines}


def test_status_json_after_a_real_run_once(ran):
    res = ran["res"]
    st = status_json("-c", str(ran["cfg"]))
    assert st["schema"] == 1 and st["results_dir"] == str(res)
    (run,) = st["runs"]
    assert run["run"] == RUN and run["current"] and run["training"] == run["trainings"] == 1
    assert run["process"] == {"running": False, "mode": None, "pid": None, "since": None, "daemon": False}
    engine = run["engine"]  # run --once holds the lock, so it wrote the heartbeat too
    assert (engine["state"], engine["mode"], engine["kind"], engine["live"]) == ("stopped", "oneshot", "hf", False)
    assert engine["age_seconds"] >= 0

    c = run["checkpoints"]
    assert c["counts"]["ready"] == 3 and c["not_ready"] == []
    assert (c["newest_complete"]["step"], c["newest_evaluated"]["step"], c["lag_steps"]) == (6, 4, 2)
    assert c["waiting"] == [6]  # its broken suite failed: not fully evaluated
    with sqlite3.connect(res / "ledger.sqlite") as db:
        ready = dict(db.execute("SELECT step, updated_at FROM checkpoints WHERE run=?", (RUN,)))
    minutes = (datetime.fromisoformat(ready[6]) - datetime.fromisoformat(ready[4])).total_seconds() / 60
    assert c["lag_minutes"] == round(minutes, 2)

    suites = run["suites"]
    assert suites["heldout_loss"]["counts"] == {"pending": 0, "running": 0, "done": 3, "failed": 0, "skipped": 1}
    assert suites["broken"]["counts"] == {"pending": 0, "running": 0, "done": 0, "failed": 1, "skipped": 3}
    assert suites["broken"]["type"] == "heldout_loss" and suites["broken"]["headline"] == {}
    m = _metrics(res, RUN)
    head = suites["heldout_loss"]["headline"]
    assert list(head) == ["nll", "ppl"] and suites["heldout_loss"]["latest_step"] == 6
    for name in head:
        assert head[name]["latest"] == m[(6, "heldout_loss")]["metrics"][name]
        assert head[name]["base"] == m[(0, "heldout_loss")]["metrics"][name]

    (failed,) = run["failed"]
    assert (failed["step"], failed["suite"], failed["attempts"]) == (6, "broken", 1)
    assert failed["error"] == m[(6, "broken")]["error"] and "no held-out texts" in failed["error"]
    skipped = {(s["suite"], s["reason"]): s for s in run["skipped"]}
    assert skipped[("broken", "step N is not a multiple of every=N")]["steps"] == [2, 4]
    (sched,) = [s for s in run["skipped"] if s["suite"] == "heldout_loss"]
    assert sched["steps"] == [2] and sched["example"].startswith("no schedule target in (0, 2]")
    assert run["backlog"] == {"pending": 0, "running": 0} and run["running"] == []
    assert run["schedules"] == [{"suite": "heldout_loss", "max_steps": 6, "targets": [3, 6]}]

    with sqlite3.connect(res / RUN / "mlflow-outbox.sqlite") as db:
        unsent = db.execute("SELECT count(*) FROM outbox WHERE kind='metric' AND sent_at IS NULL").fetchone()[0]
    ok_points = sum(len(r["metrics"]) for r in m.values() if r["status"] == "ok")
    assert run["outbox"]["pending_points"] == unsent == ok_points == 9  # 3 results × nll, ppl, tokens
    assert run["outbox"]["sent"] == 0 and run["outbox"]["pending_other"] > 0

    text = cli("status", "-c", str(ran["cfg"]))
    assert text.returncode == 0, text.stderr
    for line in ("evaluating: no ckpt-watch process", "not running (stopped; last oneshot pid",
                 "fully evaluated: step 4 — 2 step(s)", "failed step 6 broken after 1 tr(ies): ValueError:",
                 "percent schedule over 6 steps → due at the first checkpoint at or after steps 3, 6",
                 "MLflow outbox: 9 point(s) undelivered", "skipped broken ×2: step N is not a multiple of every=N"):
        assert line in text.stdout, text.stdout
    nll = f"nll {head['nll']['latest']:.4g} ({head['nll']['base']:.4g})"
    assert nll in text.stdout, text.stdout


HEAVY = ("torch", "vllm", "transformers", "peft", "mlflow")


def test_status_needs_no_judge_key_no_model_and_no_config(ran):
    """A config whose judge key and `${VAR}` are unset still gives the status (a note on stderr);
    in-process, status imports no torch / vLLM / MLflow."""
    res = ran["res"]
    judge = "judge: {model: j, base_url: '${CKPT_WATCH_TEST_UNSET_URL}', api_key_env: CKPT_WATCH_TEST_UNSET_KEY}\n"
    plain_judge = "judge: {model: j, api_key_env: CKPT_WATCH_TEST_UNSET_KEY}\n"
    for i, block in enumerate((judge, plain_judge)):
        cfg = ran["tmp"] / f"judge{i}.yaml"
        cfg.write_text(f"base_model: nowhere\nresults_dir: {res}\nrun_name: {RUN}\nsuites:\n  alignment: {{}}\n{block}")
        r = cli("status", "-c", str(cfg), "--json")
        assert r.returncode == 0, r.stderr
        assert "(not needed for status)" in r.stderr and "CKPT_WATCH_TEST_UNSET" in r.stderr
        assert json.loads(r.stdout)["runs"][0]["checkpoints"]["lag_steps"] == 2
    bad = ran["tmp"] / "bad.yaml"
    bad.write_text("results_dir: '${CKPT_WATCH_TEST_UNSET_DIR}'\n")
    r = cli("status", "-c", str(bad))
    assert r.returncode == 2 and "results_dir" in r.stderr  # the one field status needs

    code = ("import json, sys\nfrom typer.testing import CliRunner\nfrom ckpt_watch.cli import app\n"
            f"r = CliRunner().invoke(app, ['status', '--results', {str(res)!r}, '--json'])\n"
            "assert r.exit_code == 0, r.output\n"
            f"heavy = sorted(m for m in sys.modules if m in {HEAVY!r})\n"
            "print(json.dumps({'status': json.loads(r.stdout), 'heavy': heavy}))\n")
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert got["heavy"] == []
    assert got["status"]["runs"][0]["outbox"]["pending_points"] == 9  # --results alone: the same answer
    assert took < 30, took


def test_status_of_a_live_daemon_then_after_it_stopped(ran, tiny_run, tiny_base):
    """A second run in the same results dir, evaluated by a real `ckpt-watch run` subprocess."""
    res = ran["res"]
    cfg = ran["tmp"] / "daemon.yaml"
    cfg.write_text(f"base_model: {tiny_base}\nresults_dir: {res}\nrun_name: {DAEMON_RUN}\n"
                   f"watch: {{dir: {tiny_run}, settle_seconds: 0}}\nsuites:\n  heldout_loss: {{max_texts: 2}}\n"
                   "mlflow: {enabled: false}\n")
    beat = res / DAEMON_RUN / "status.json"

    def idle() -> bool:
        try:
            return json.loads(beat.read_text())["state"].startswith("idle")
        except (OSError, ValueError):
            return False

    with DaemonProc(cfg) as daemon:
        wait_until(idle, 180, "the daemon's idle heartbeat", daemon)
        st = status_json("--results", str(res))
        assert [r["run"] for r in st["runs"]] == [RUN, DAEMON_RUN]  # every run in the results dir
        r1, r2 = st["runs"]
        assert r1["process"]["running"] is False
        assert r2["process"]["running"] and r2["process"]["daemon"] and r2["process"]["pid"] == daemon.pid
        e = r2["engine"]
        assert e["live"] and e["pid"] == daemon.pid and e["mode"] == "daemon" and e["kind"] == "hf"
        assert e["state"].startswith("idle; 0 evaluation(s)") and e["status"] == "ready" and e["age_seconds"] < 60
        c = r2["checkpoints"]
        assert (c["newest_complete"]["step"], c["newest_evaluated"]["step"], c["lag_steps"]) == (6, 6, 0)
        assert r2["suites"]["heldout_loss"]["counts"]["done"] == 4 and r2["failed"] == [] and r2["outbox"] is None
        text = cli("status", "--results", str(res), "--run", DAEMON_RUN)
        assert f"evaluating: daemon pid {daemon.pid}" in text.stdout and "(keeping up)" in text.stdout
        assert f"run {RUN} " not in text.stdout  # --run shows that run only
        assert daemon.stop() == 0
    after = status_json("--results", str(res), "--run", DAEMON_RUN)["runs"][0]
    assert after["process"]["running"] is False
    assert (after["engine"]["state"], after["engine"]["live"]) == ("stopped", False)
    assert cli("status", "--results", str(res), "--run", "nope").returncode == 1
