"""CLaaS parity: each metric on inputs where CLaaS's definition and the obvious alternatives
disagree, asserting CLaaS's answer by default (figures worked out by hand from CLaaS's
claas/eval/metrics/{verifiers,collapse,capability}.py) and ours only where opted in.
docs/claas_parity.md lists every deviation."""

from __future__ import annotations

import math

import pytest

from ckpt_watch.suites.collapse import (
    CLAAS_PROMPT,
    CollapseConfig,
    baseline_relative,
    mean_logprob,
    mean_token_entropy,
    rouge_l,
    self_rouge_l,
)
from ckpt_watch.suites.compliance import (
    concise_score,
    count_sentences,
    identity_score,
    no_emoji_score,
    no_emoji_unicode_score,
    resolve_verifier,
    strip_thinking,
    verify,
)

# -- emoji ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "claas", "unicode_list"),
    [
        ("It is 25°C outside.", 0.0, 1.0),  # ° is category So: CLaaS counts it, the emoji list does not
        ("Rated ★★★ by critics.", 0.0, 1.0),  # ★ is So, not an emoji
        ("Press 1️⃣ to start.", 1.0, 0.0),  # a keycap: '1' + U+FE0F + U+20E3, no So character
        ("Stop‼", 1.0, 0.0),  # ‼ is Po, yet an emoji
        ("Hello 😀", 0.0, 0.0),  # both
        ("Plain text, no symbols.", 1.0, 1.0),
    ],
)
def test_no_emoji_is_claas_by_default(text, claas, unicode_list):
    assert no_emoji_score(text) == claas
    assert verify(resolve_verifier("no_emoji"), text) == (claas, None)
    assert no_emoji_unicode_score(text) == unicode_list
    assert verify(resolve_verifier("no_emoji_unicode"), text) == (unicode_list, None)


# -- <think> and sentences ------------------------------------------------------------------------


def test_strip_thinking_like_claas():
    # CLaaS keeps an unclosed <think> (a reply cut off mid-thought) as text
    assert strip_thinking("Answer.<think>still thinking") == "Answer.<think>still thinking"
    assert strip_thinking("Answer.<think>still thinking", drop_unclosed=True) == "Answer."
    assert strip_thinking("plan</think>Hi <think>x</think>there") == "Hi there"
    # an orphan close: everything before it goes, the rest is kept as is (a later orphan stays)
    assert strip_thinking("a</think>b</think>c") == "b</think>c"


def test_sentence_splitting_like_claas():
    assert count_sentences("Dr. Smith arrived. He sat.") == 3  # abbreviations split too
    assert count_sentences("Wait... what?! Fine") == 3
    assert count_sentences("v1.2 is out") == 1  # no whitespace after the dot: no split
    assert count_sentences("   ") == 0
    words10 = "one two three four five six seven eight nine ten"
    assert concise_score(f"{words10}. A. B. C. D. E. F. G. H.") == 0.0  # 9 sentences → 0
    assert identity_score("Call me Kurosawa") == 1.0  # a substring test, as CLaaS's


# -- ROUGE-L --------------------------------------------------------------------------------------


def test_rouge_l_uses_claas_whitespace_tokens():
    # case and punctuation are kept: only "ocean" and "is" match → P = R = 2/4
    assert rouge_l("The ocean is vast.", "the ocean is vast") == pytest.approx(0.5)
    # non-ASCII words are words (a tokenizer keeping [a-z0-9] only would see none)
    assert rouge_l("海は 広い 本当に", "海は 広い") == pytest.approx(2 * 1.0 * (2 / 3) / (1 + 2 / 3))
    assert rouge_l("Café über alles", "Cafe uber alles") == pytest.approx(1 / 3)
    # precision is over the second text, recall over the first
    assert rouge_l("a b c d", "a b") == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    # no words on either side → 0.0, even for two identical empty answers
    assert rouge_l("", "") == 0.0 and rouge_l("x", "  ") == 0.0
    assert self_rouge_l(["Same words.", "Same words."]) == 1.0
    assert self_rouge_l(["lonely"]) == 0.0


# -- entropy, log-prob, drift with no data ----------------------------------------------------------


def test_no_data_like_claas():
    assert mean_token_entropy([], 0.0) == 0.0 and math.isnan(mean_token_entropy([]))
    assert mean_logprob([[]], 0.0) == 0.0
    m = {"entropy": 0.0, "logprob_mean": 0.0}
    baseline_relative(m, None, is_base=False)
    assert m["entropy_ratio"] == 1.0 and m["logprob_drift"] == 0.0  # CLaaS: no baseline → 1.0, 0.0
    m = {"entropy": 0.5, "logprob_mean": -1.5}
    baseline_relative(m, {"entropy": 0.0, "logprob_mean": -1.0}, is_base=False)
    assert m["entropy_ratio"] == 1.0  # base entropy 0: CLaaS keeps 1.0
    assert m["logprob_drift"] == pytest.approx(0.5)  # |Δ|
    m = {"entropy": 0.5, "logprob_mean": -1.5}
    baseline_relative(m, None, is_base=False, no_data="nan")
    assert math.isnan(m["entropy_ratio"]) and math.isnan(m["logprob_drift"])


def test_collapse_protocol_defaults_are_claas():
    cfg = CollapseConfig()
    assert cfg.prompts() == [CLAAS_PROMPT] == ["Tell me something interesting about the ocean."]
    assert cfg.system_prompt == "You are a helpful assistant."
    assert (cfg.samples_per_prompt, cfg.temperature, cfg.max_tokens, cfg.top_k) == (3, 0.7, 2048, 20)
    assert (cfg.entropy_ratio_min, cfg.self_rouge_max, cfg.drift_max) == (0.6, 0.85, 2.0)
    assert cfg.drift == "abs" and cfg.no_data == "claas"
    assert len(CollapseConfig(prompt_set="extended").prompts()) == 6


def test_compliance_probe_protocol_defaults_to_claas():
    """CLaaS scores the first 3 probe prompts of a preference, one greedy answer each, 2048 tokens,
    its system prompt; ours is now the same by default (`probes_per_preference: null` = all)."""
    from ckpt_watch.suites.compliance import CLAAS_SYSTEM_PROMPT, ComplianceConfig, probe_subset

    cfg = ComplianceConfig(preferences={"p": {"verifier": "no_emoji", "probe_prompts": ["a", "b", "c", "d"]}})
    assert (cfg.probes_per_preference, cfg.temperature, cfg.max_tokens, cfg.samples_per_prompt) == (3, 0.0, 2048, 1)
    assert cfg.system_prompt == CLAAS_SYSTEM_PROMPT == "You are a helpful assistant."
    assert probe_subset(["a", "b", "c", "d"], cfg.probes_per_preference) == ["a", "b", "c"]
    assert probe_subset(["a", "b", "c", "d"], None) == ["a", "b", "c", "d"]
