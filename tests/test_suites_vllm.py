"""Suites end to end through the real vLLM CPU server: the same numbers as the HF engine."""

from __future__ import annotations

import asyncio

import pytest

from ckpt_watch.config import EngineConfig, parse_config
from ckpt_watch.core import Checkpoint
from ckpt_watch.engines.hf import HFEngine
from ckpt_watch.suites.base import SuiteContext, build_suite
from tests.conftest import ARC_FILE

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_arc_both_scorings_agree_between_vllm_and_hf(vllm_engine, vllm_loop, smollm2_path):
    suites = parse_config({"base_model": str(smollm2_path), "suites": {
        "arc": {"type": "arc_challenge", "n": 20, "seed": 3, "path": str(ARC_FILE)},
        "arc_letter": {"type": "arc_challenge", "scoring": "letter", "n": 20, "seed": 3, "path": str(ARC_FILE)},
    }}).suites
    base = Checkpoint.base("r")

    async def run_all(engine):
        handle = await engine.load(base)
        out = {}
        for name, cfg in suites.items():
            ctx = SuiteContext(engine=engine, handle=handle, checkpoint=base, run_name="r")
            out[name] = await build_suite(name, cfg).run(ctx)
        return out

    via_vllm = vllm_loop.run_until_complete(run_all(vllm_engine))
    hf = HFEngine(str(smollm2_path), EngineConfig(batch_size=16))
    via_hf = asyncio.run(run_all(hf))
    for name in suites:
        v, h = via_vllm[name], via_hf[name]
        assert v.status == h.status == "ok"
        assert v.metrics["n"] == 20
        # same predictions question by question, hence the same accuracies
        assert [s["pred"] for s in v.samples] == [s["pred"] for s in h.samples], name
        assert v.metrics["acc"] == pytest.approx(h.metrics["acc"])
        lp_v = [x for s in v.samples for x in s["logprobs"]]
        lp_h = [x for s in h.samples for x in s["logprobs"]]
        assert max(abs(a - b) for a, b in zip(lp_v, lp_h, strict=True)) < 1e-2
