"""Collapse suite through the real HF engine: base figures, drift from the base, and the alert."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ckpt_watch.core import Checkpoint
from ckpt_watch.engines.base import apply_chat_template
from ckpt_watch.suites.collapse import CollapseConfig, renormalised_entropy
from tests.conftest import make_adapter
from tests.suite_helpers import adapter_checkpoint, make_engine, run_suite


@pytest.fixture(scope="module")
def engine(smollm2_path):
    return make_engine(smollm2_path)


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("Tell me something interesting about the ocean.\nDescribe your ideal city.\n")
    return path


@pytest.mark.slow
def test_collapse_base_then_adapter(engine, smollm2_path, prompts_file: Path, tmp_path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = CollapseConfig(builtin_prompts=False, prompts_file=prompts_file, samples_per_prompt=3,
                         temperature=1.0, max_tokens=24, top_k=20)
    base = run_suite(engine, "collapse", cfg, Checkpoint.base("col"))
    m = base.metrics
    assert 0.0 < m["entropy"] <= math.log(20)
    assert 0.0 <= m["self_rouge_l"] < 1.0  # temperature-1 samples of a healthy model differ
    assert m["logprob_mean"] < 0.0
    assert m["entropy_ratio"] == 1.0 and m["logprob_drift"] == 0.0 and m["alert"] == 0.0
    assert len(base.samples) == 2 and all(len(s["samples"]) == 3 for s in base.samples)

    # the first greedy token's entropy, recomputed from one direct forward pass
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    prompt = apply_chat_template(tok, [{"role": "system", "content": cfg.system_prompt},
                                       {"role": "user", "content": base.samples[0]["prompt"]}])
    with torch.inference_mode():
        logps = torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1].float(), -1)
    top = torch.topk(logps, 20).values.tolist()
    h0 = renormalised_entropy(top)
    # entropy of a 1-token greedy answer to the same prompt must equal that
    one = CollapseConfig(builtin_prompts=False, prompts_file=prompts_file, samples_per_prompt=2, max_tokens=1)
    first = run_suite(engine, "collapse", one, Checkpoint.base("col"))
    assert first.samples[0]["greedy_entropy"] == pytest.approx(h0, abs=1e-3)
    assert first.samples[0]["greedy_logprob_mean"] == pytest.approx(max(top), abs=1e-3)

    # a noisy adapter moves the figures; drift and ratio are taken from the base result
    adapter = make_adapter(smollm2_path, tmp_path / "noisy", seed=2, scale=0.03)
    res = run_suite(engine, "collapse", cfg, adapter_checkpoint("col", 5, adapter), baseline=base)
    assert res.metrics["logprob_drift"] == pytest.approx(abs(res.metrics["logprob_mean"] - m["logprob_mean"]))
    assert res.metrics["entropy_ratio"] == pytest.approx(res.metrics["entropy"] / m["entropy"])
    assert res.metrics["logprob_drift"] != 0.0


@pytest.mark.slow
def test_near_greedy_samples_are_collapse(engine, prompts_file: Path):
    # temperature → 0: every sample is the greedy answer, self-ROUGE-L is 1 and the alert fires
    cfg = CollapseConfig(builtin_prompts=False, prompts_file=prompts_file, samples_per_prompt=3,
                         temperature=1e-4, max_tokens=16)
    res = run_suite(engine, "collapse", cfg, Checkpoint.base("col"))
    assert all(len(set(s["samples"])) == 1 for s in res.samples)
    assert res.metrics["self_rouge_l"] == 1.0
    assert res.metrics["alert"] == 1.0 and res.info["alerts"] == ["self_rouge_l"]
