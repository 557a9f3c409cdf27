"""Compliance suite on the real CLaaS preference files, through the real HF engine."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ckpt_watch.core import Checkpoint
from ckpt_watch.engines.base import apply_chat_template
from ckpt_watch.suites.compliance import ComplianceConfig, load_preference_file
from tests.conftest import CLAAS_DIR, make_adapter
from tests.suite_helpers import adapter_checkpoint, make_engine, run_suite

PREFS = ("concise", "identity", "no_emoji")


class FlakyVerifier:
    """A custom verifier that fails on every answer: its answers must be unscored, not 0."""

    def __call__(self, text: str) -> float:
        raise ConnectionError("verifier backend unreachable")


@pytest.fixture(scope="module")
def engine(smollm2_path):
    return make_engine(smollm2_path)


def _config(**kw) -> ComplianceConfig:
    return ComplianceConfig(
        files=sorted(CLAAS_DIR.glob("*.yaml")),
        preferences={"flaky": {"verifier": "tests.test_suites_compliance:FlakyVerifier",
                               "probe_prompts": ["Say hello.", "Say goodbye."]}},
        max_tokens=40,
        temperature=0.0,
        **kw,
    )


def _direct_sum_logprob(model, tok, messages, response: str) -> float:
    import torch

    prompt = apply_chat_template(tok, messages)
    cont = tok.encode(response, add_special_tokens=False)
    ids = prompt + cont
    with torch.inference_mode():
        logps = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return float(sum(logps[i - 1, ids[i]] for i in range(len(prompt), len(ids))))


@pytest.mark.slow
def test_compliance_on_claas_files(engine, smollm2_path, tmp_path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = _config()
    base = run_suite(engine, "compliance", cfg, Checkpoint.base("pref"))
    m = base.metrics
    for pref in PREFS:
        assert 0.0 <= m[pref] <= 1.0
        assert math.isfinite(m[f"margin/{pref}"])
        assert m[f"margin_delta/{pref}"] == 0.0
    # a verifier that fails leaves its answers unscored: no metric value, counted apart
    assert math.isnan(m["flaky"])
    assert base.n_unscored == 2 and base.n_scored == 30
    probes = [s for s in base.samples if s["kind"] == "probe"]
    assert len(probes) == 32
    assert all(s["error"] and "unreachable" in s["error"] for s in probes if s["preference"] == "flaky")
    # the compliance figure is the mean of the per-answer verifier scores
    for pref in PREFS:
        scores = [s["score"] for s in probes if s["preference"] == pref]
        assert len(scores) == 10 and m[pref] == pytest.approx(sum(scores) / 10)

    # margin = Σ log p(positive) − Σ log p(negative), responses scored after the templated prompt
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    for path in sorted(CLAAS_DIR.glob("*.yaml")):
        name, spec = load_preference_file(path)
        pair = spec.pairs[0]
        pos = _direct_sum_logprob(model, tok, pair.chat(), pair.positive)
        neg = _direct_sum_logprob(model, tok, pair.chat(), pair.negative)
        assert m[f"margin/{name}"] == pytest.approx(pos - neg, abs=5e-3)
        rec = next(s for s in base.samples if s["kind"] == "pair" and s["preference"] == name)
        assert rec["logprob_positive"] == pytest.approx(pos, abs=5e-3)

    # an adapter that changes the model: margins move and the change is taken from step 0
    adapter = make_adapter(smollm2_path, tmp_path / "noisy", seed=1, scale=0.02)
    res = run_suite(engine, "compliance", cfg, adapter_checkpoint("pref", 10, adapter), baseline=base)
    for pref in PREFS:
        delta = res.metrics[f"margin/{pref}"] - m[f"margin/{pref}"]
        assert res.metrics[f"margin_delta/{pref}"] == pytest.approx(delta)
    assert any(abs(res.metrics[f"margin_delta/{p}"]) > 1e-3 for p in PREFS)
