"""Faults in what the trainer leaves on disk: a save caught half-way, a folder rotated away while
its suite runs, corrupt adapter files, an adapter trained on another base model.

The daemon runs as a subprocess on the HF engine with the tiny Llama base; checkpoints are real
PEFT adapters saved by a real HF Trainer (the `tiny_run` fixture), copied in or damaged here.
Every result is compared with an independent reference computed in this process with plain
transformers + peft, so a value computed on the wrong weights cannot pass.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.conftest import make_adapter
from tests.faults.harness import (
    SUITES,
    DaemonProc,
    Reference,
    checkpoint_states,
    eval_states,
    json_duplicates,
    metric_lines,
    place_checkpoint,
    populate,
    step_record,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.slow

RUN = "run1"


def _done_steps(results: Path) -> set[tuple[int, str]]:
    return {(m["step"], m["suite"]) for m in metric_lines(results, RUN)}


def _matching(results: Path, reference: Reference, expect: dict[int, int]) -> int:
    """How many expected steps have every suite's result equal to the reference (`expect`: step
    → the tiny_run checkpoint whose weights it holds)."""
    good = 0
    for step, weights in expect.items():
        try:
            for suite in SUITES:
                record = step_record(results, RUN, step, suite)
                assert record is not None, f"no result for step {step} {suite}"
                assert record["step"] == step
                reference.check(record, weights, suite)
        except AssertionError:
            continue
        good += 1
    return good


def test_partial_checkpoint_never_evaluated(tmp_path, tiny_run, tiny_base, reference, fault_record):
    """A checkpoint written in HF Trainer's order is looked at after every stage and evaluated only
    once `trainer_state.json` is complete; a save that never finishes is never evaluated."""
    watch = tmp_path / "watch"
    watch.mkdir()
    results = tmp_path / "results"
    cfg = write_config(tmp_path, tiny_base, watch, settle=0.3, max_attempts=100)
    src = tiny_run / "checkpoint-2"
    state = (src / "trainer_state.json").read_bytes()
    weights = (src / "adapter_model.safetensors").read_bytes()
    # HF Trainer's _save_checkpoint order (DESIGN §3), the weights caught mid-write first
    stages = [
        ("adapter_model.safetensors", weights[: len(weights) // 3], "no trainer_state.json yet"),
        ("adapter_model.safetensors", weights, "no trainer_state.json yet"),
        ("adapter_config.json", (src / "adapter_config.json").read_bytes(), "no trainer_state.json yet"),
        ("training_args.bin", (src / "training_args.bin").read_bytes(), "no trainer_state.json yet"),
        ("trainer_state.json", state[: len(state) // 2], "not valid JSON"),  # plain open("w"): seen half-written
    ]
    premature: list[str] = []
    with DaemonProc(cfg) as daemon:
        daemon.wait_line(r"base/slow done", 180)
        ck = watch / "checkpoint-2"
        ck.mkdir()
        for name, data, reason in stages:
            (ck / name).write_bytes(data)
            time.sleep(1.0)  # several settle periods: the daemon looks at this stage
            # the daemon must have looked at this stage (its reason is in the ledger) and not evaluated it
            wait_until(lambda r=reason: r in (checkpoint_states(results).get(2, ("", ""))[1] or ""), 30,
                       f"step 2 seen as {reason!r}", daemon)
            if any(s == 2 for s, _ in _done_steps(results)) or checkpoint_states(results)[2][0] != "seen":
                premature.append(name)
        # a save killed before trainer_state.json: complete-looking adapter files, never finished
        ck4 = watch / "checkpoint-4"
        ck4.mkdir()
        for name in ("adapter_model.safetensors", "adapter_config.json", "training_args.bin"):
            shutil.copy(tiny_run / "checkpoint-4" / name, ck4 / name)
        (ck / "trainer_state.json").write_bytes(state)
        wait_until(lambda: {(2, s) for s in SUITES} <= _done_steps(results), 120, "step 2 evaluated", daemon)
        time.sleep(2.0)  # several settle periods: checkpoint-4 stays unevaluated
        code = daemon.stop()
        out = daemon.output()
    assert code == 0, out
    ck_states = checkpoint_states(results)
    never_done = all(s != 4 for s, _ in _done_steps(results)) and ck_states.get(4) == (
        "seen", "no trainer_state.json yet")
    evaluated = _matching(results, reference, {0: 0, 2: 2})
    fault_record(expected=2, evaluated=evaluated, duplicated=json_duplicates(results, RUN),
                 faulty=(int(not premature) + int(never_done), 2))
    assert premature == [], f"step 2 evaluated before its save was complete (after writing {premature})"
    assert never_done, ck_states
    assert ck_states[2][0] == "ready"
    assert evaluated == 2
    assert json_duplicates(results, RUN) == 0
    assert {s for s, _ in _done_steps(results)} == {0, 2}


def test_rotation_mid_eval(tmp_path, tiny_run, tiny_base, reference, fault_record):
    """`save_total_limit` rotation (shutil.rmtree, as HF Trainer does) deletes checkpoint-4 while its
    slow suite runs and checkpoint-6 while it waits in the backlog: both results still come, from
    the snapshots, equal to the reference."""
    watch = tmp_path / "watch"
    results = tmp_path / "results"
    populate(tiny_run, watch, (2, 4, 6))
    cfg = write_config(tmp_path, tiny_base, watch, order="oldest")
    # keep the newest snapshot only: the others are dropped once their step is finished
    text = cfg.read_text().replace("daemon: {drain_seconds: 5}", "daemon: {drain_seconds: 5, keep_snapshots: 1}")
    cfg.write_text(text)
    with DaemonProc(cfg) as daemon:
        daemon.wait_line(r"step-4: running slow", 180)
        time.sleep(0.3)  # well inside the ~2.5 s suite
        deleted_at = datetime.now().astimezone()
        shutil.rmtree(watch / "checkpoint-4")
        shutil.rmtree(watch / "checkpoint-6")
        still_running = eval_states(results)[(4, "slow")][0] == "running"
        wait_until(lambda: {(s, n) for s in (0, 2, 4, 6) for n in SUITES} <= _done_steps(results), 180,
                   "every step evaluated", daemon)
        code = daemon.stop()
        out = daemon.output()
    assert code == 0, out
    slow4 = step_record(results, RUN, 4, "slow")
    assert slow4 is not None
    evaluated = _matching(results, reference, {0: 0, 2: 2, 4: 4, 6: 6})
    fault_record(expected=4, evaluated=evaluated, duplicated=json_duplicates(results, RUN))
    # the deletion really happened mid-suite
    assert still_running
    assert datetime.fromisoformat(slow4["started_at"]) < deleted_at < datetime.fromisoformat(slow4["finished_at"])
    assert evaluated == 4
    assert json_duplicates(results, RUN) == 0
    assert not (watch / "checkpoint-4").exists() and not (watch / "checkpoint-6").exists()
    assert {s: st for s, (st, _) in checkpoint_states(results).items()} == {2: "ready", 4: "ready", 6: "ready"}
    # with keep_snapshots: 1, only the newest finished step's snapshot is kept (default: all)
    kept = sorted(p.name for p in (results / ".cache" / "snapshots" / RUN).glob("step-*"))
    assert kept == ["step-6"], kept


def _garbage_weights(ck: Path) -> None:
    (ck / "adapter_model.safetensors").write_bytes(os.urandom(70_000))


def _truncated_weights(ck: Path) -> None:
    # a valid header whose tensors run past the end of the file (a copy cut short)
    path = ck / "adapter_model.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    path.write_bytes(data[: 8 + n + 100])


def _garbage_config(ck: Path) -> None:
    (ck / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8, "target_mod')


def _wrong_targets(ck: Path) -> None:
    # well-formed JSON, readable weights, but the modules it names do not exist in any Llama
    path = ck / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["target_modules"] = ["nope_proj"]
    path.write_text(json.dumps(cfg))


def test_corrupt_adapter(tmp_path, tiny_run, tiny_base, reference, fault_record):
    """Corrupt adapters: random bytes as safetensors, a truncated safetensors, a cut-off
    adapter_config.json (refused at discovery, failed with the reason after max_attempts), and a
    config naming modules the base lacks (refused by the engine: both suites recorded as errors).
    The daemon goes on: the good checkpoints before and after are evaluated correctly."""
    watch = tmp_path / "watch"
    results = tmp_path / "results"
    place_checkpoint(tiny_run / "checkpoint-2", watch, 2)
    damage = {4: _garbage_weights, 6: _garbage_config, 8: _wrong_targets, 10: _truncated_weights}
    for step, hurt in damage.items():
        hurt(place_checkpoint(tiny_run / "checkpoint-4", watch, step))
    place_checkpoint(tiny_run / "checkpoint-6", watch, 12)  # a good one after the bad ones
    cfg = write_config(tmp_path, tiny_base, watch, order="oldest", max_attempts=3)

    def settled() -> bool:
        states = checkpoint_states(results)
        return (all(states.get(s, ("",))[0] == "failed" for s in (4, 6, 10))
                and {(s, n) for s in (0, 2, 8, 12) for n in SUITES} <= _done_steps(results))

    with DaemonProc(cfg) as daemon:
        wait_until(settled, 240, "every checkpoint evaluated or failed", daemon)
        code = daemon.stop()
        out = daemon.output()
    assert code == 0, out
    ck_states = checkpoint_states(results)
    evals = eval_states(results)
    reasons = {4: "safetensors header length", 6: "adapter_config.json is not valid JSON",
               10: "safetensors data truncated"}
    handled = 0
    for step, reason in reasons.items():
        state, error = ck_states[step]
        handled += state == "failed" and reason in (error or "") and all(s != step for s, _ in _done_steps(results))
    load_errors = [step_record(results, RUN, 8, n) for n in SUITES]
    engine_refused = all(
        r is not None and r["status"] == "error" and "adapter load" in r["error"] and "nope_proj" in r["error"]
        and evals[(8, r["suite"])][0] == "failed" for r in load_errors)
    handled += engine_refused
    evaluated = _matching(results, reference, {0: 0, 2: 2, 12: 6})
    fault_record(expected=3, evaluated=evaluated, duplicated=json_duplicates(results, RUN),
                 faulty=(handled, len(damage)))
    for step, reason in reasons.items():
        assert ck_states[step][0] == "failed" and reason in (ck_states[step][1] or ""), (step, ck_states[step])
    assert engine_refused, load_errors
    assert "checkpoint failed after 3 attempt(s)" in out
    assert evaluated == 3
    assert json_duplicates(results, RUN) == 0
    assert {s for s, _ in _done_steps(results)} == {0, 2, 8, 12}


def test_adapter_for_wrong_base_model(tmp_path, tiny_run, tiny_base, smollm2_path, reference, fault_record):
    """A real SmolLM2-135M LoRA adapter lands in a run whose engine serves the tiny Llama base: the
    load fails with a clear error recorded for each suite, and the next checkpoint, loaded after
    that failure into the same engine, still gives exactly the reference values."""
    watch = tmp_path / "watch"
    results = tmp_path / "results"
    place_checkpoint(tiny_run / "checkpoint-2", watch, 2)
    foreign = make_adapter(smollm2_path, tmp_path / "smollm2-adapter", r=8, scale=0.01)
    for name in ("trainer_state.json", "training_args.bin"):
        shutil.copy(tiny_run / "checkpoint-4" / name, foreign / name)
    shutil.move(str(foreign), watch / "checkpoint-4")
    place_checkpoint(tiny_run / "checkpoint-6", watch, 6)
    cfg = write_config(tmp_path, tiny_base, watch, order="oldest")
    with DaemonProc(cfg) as daemon:
        wait_until(lambda: {(s, n) for s in (0, 2, 4, 6) for n in SUITES} <= _done_steps(results), 240,
                   "every step recorded", daemon)
        code = daemon.stop()
        out = daemon.output()
    assert code == 0, out
    refused = [step_record(results, RUN, 4, n) for n in SUITES]
    evals = eval_states(results)
    clear = all(r is not None and r["status"] == "error" and "adapter load" in r["error"]
                and "size mismatch" in r["error"] and evals[(4, r["suite"])][0] == "failed" for r in refused)
    evaluated = _matching(results, reference, {0: 0, 2: 2, 6: 6})
    fault_record(expected=3, evaluated=evaluated, duplicated=json_duplicates(results, RUN), faulty=(int(clear), 1))
    assert clear, refused
    assert evaluated == 3
    assert json_duplicates(results, RUN) == 0
