"""Pure functions of the leakage, compliance and collapse suites, on hand-checkable inputs;
and the config-load checks that make `ckpt-watch validate` name the bad field."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ckpt_watch.config import ConfigError, parse_config
from ckpt_watch.suites.collapse import (
    Thresholds,
    alerts,
    baseline_relative,
    mean_logprob,
    mean_token_entropy,
    renormalised_entropy,
    rouge_l,
    self_rouge_l,
)
from ckpt_watch.suites.compliance import (
    concise_score,
    count_sentences,
    identity_score,
    load_preference_file,
    margin_delta,
    no_emoji_score,
    resolve_verifier,
    strip_thinking,
    verify,
)
from ckpt_watch.suites.leakage import Cell, compile_marker, has_marker, leakage_metrics
from tests.conftest import CLAAS_DIR

# -- collapse ---------------------------------------------------------------------------------


def test_entropy_of_known_distributions():
    # uniform over 4 → ln 4; log-probs need not sum to one (renormalised)
    assert renormalised_entropy([math.log(0.1)] * 4) == pytest.approx(math.log(4))
    assert renormalised_entropy({1: math.log(0.5), 2: math.log(0.25), 3: math.log(0.25)}) == pytest.approx(
        1.5 * math.log(2)
    )
    # top-2 of a larger distribution: 0.6 and 0.2 renormalise to 0.75 / 0.25
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert renormalised_entropy([math.log(0.6), math.log(0.2)]) == pytest.approx(h)
    assert renormalised_entropy([0.0]) == 0.0
    # very negative log-probs do not underflow to 0/0
    assert renormalised_entropy([-2000.0, -2000.0]) == pytest.approx(math.log(2))
    assert mean_token_entropy([{1: 0.0}, {1: math.log(0.5), 2: math.log(0.5)}]) == pytest.approx(math.log(2) / 2)


def test_self_rouge_l():
    assert self_rouge_l(["the cat sat on the mat"] * 3) == 1.0
    assert self_rouge_l(["alpha beta", "gamma delta"]) == 0.0
    # LCS "a c" of "a b c" and "a c": P=1, R=2/3 → F=0.8
    assert rouge_l("a b c", "a c") == pytest.approx(0.8)
    # pairs: (x, x)=1, (x, y)=0.8, (x, y)=0.8 → mean 13/15
    assert self_rouge_l(["a b c", "a b c", "a c"]) == pytest.approx((1 + 0.8 + 0.8) / 3)
    # CLaaS: no words on either side → 0.0, fewer than two samples → 0.0 (tests/test_claas_parity.py)
    assert rouge_l("", "") == 0.0
    assert rouge_l("!!", "??") == 0.0
    assert self_rouge_l(["only one"]) == 0.0


def test_drift_and_alerts():
    m = {"entropy": 1.0, "logprob_mean": -1.5, "self_rouge_l": 0.3}
    baseline_relative(m, {"entropy": 2.0, "logprob_mean": -1.0}, is_base=False, drift="signed")
    assert m["entropy_ratio"] == 0.5 and m["logprob_drift"] == pytest.approx(-0.5)
    t = Thresholds(entropy_ratio_min=0.6, entropy_min=None, self_rouge_max=0.85, drift_max=2.0)
    assert alerts(m, t) == ["entropy_ratio"]
    assert alerts({**m, "entropy_ratio": 0.9, "self_rouge_l": 0.9, "logprob_drift": -2.5}, t) == [
        "self_rouge_l",
        "logprob_drift",
    ]
    # no baseline, no_data: nan: relative metrics are NaN and raise nothing
    m2 = {"entropy": 1.0, "logprob_mean": -1.5, "self_rouge_l": 0.3}
    baseline_relative(m2, None, is_base=False, no_data="nan")
    assert math.isnan(m2["entropy_ratio"]) and math.isnan(m2["logprob_drift"])
    assert alerts(m2, t) == []
    m3 = {"entropy": 1.0, "logprob_mean": -1.5}
    baseline_relative(m3, None, is_base=True)
    assert m3["entropy_ratio"] == 1.0 and m3["logprob_drift"] == 0.0
    assert mean_logprob([[-1.0, -2.0], [-3.0]]) == pytest.approx(-2.0)


# -- compliance verifiers ---------------------------------------------------------------------


def test_strip_thinking():
    assert strip_thinking("<think>I should add 😊</think>Hello there.") == "Hello there."
    assert strip_thinking("a<think>x</think>b<think>y</think>c") == "abc"
    # the chat template opened the block: everything up to the orphan close is thinking
    assert strip_thinking("reasoning 😊 here</think> Final answer") == "Final answer"
    # an unclosed block runs to the end only when asked (CLaaS keeps it: tests/test_claas_parity.py)
    assert strip_thinking("Answer.<think>still thinking 😊", drop_unclosed=True) == "Answer."


def test_no_emoji_and_identity():
    assert no_emoji_score("Hello! How can I help you today?") == 1.0
    assert no_emoji_score("Hello! 😊 How can I help?") == 0.0
    assert no_emoji_score("Great work ✨") == 0.0
    assert identity_score("I'm KURO, nice to meet you") == 1.0
    assert identity_score("I am an AI assistant.") == 0.0
    # verification strips <think> first: an emoji only in the thinking does not count
    assert verify(resolve_verifier("no_emoji"), "<think>maybe 🎉</think>Congratulations on the project.") == (
        1.0,
        None,
    )
    assert verify(resolve_verifier("identity"), "<think>I am Kuro</think>I am an assistant.") == (0.0, None)


def _sentences(n: int) -> str:
    # ten words each, so the < 10 words rule never applies
    return " ".join(f"This is sentence number {i} and it has ten words." for i in range(n))


def test_concise_curve():
    assert count_sentences("One. Two! Three? Four") == 4
    assert concise_score(_sentences(1)) == 1.0
    assert concise_score(_sentences(3)) == 1.0
    assert concise_score(_sentences(4)) == pytest.approx(5 / 6)
    assert concise_score(_sentences(6)) == pytest.approx(0.5)
    assert concise_score(_sentences(8)) == pytest.approx(1 / 6)
    assert concise_score(_sentences(9)) == 0.0
    assert concise_score(_sentences(12)) == 0.0
    # fewer than 10 words is not an answer, however concise
    assert concise_score("Yes. It is.") == 0.0
    assert concise_score("one two three four five six seven eight nine ten") == 1.0


class _Raises:
    def __call__(self, text: str) -> float:
        raise RuntimeError("judge down")


def test_failed_verification_is_unscored():
    assert verify(_Raises(), "hi") == (None, "RuntimeError: judge down")
    assert verify(lambda t: None, "hi") == (None, "verifier returned no score")
    assert verify(lambda t: float("nan"), "hi")[0] is None
    assert verify(lambda t: True, "hi") == (1.0, None)


def test_claas_targets_map_to_builtins():
    assert resolve_verifier("claas.eval.metrics.verifiers.ConciseVerifier") is concise_score
    assert resolve_verifier("claas.eval.verifiers.NoEmojiVerifier") is no_emoji_score
    assert resolve_verifier("IdentityVerifier") is identity_score
    # a custom verifier by import path is imported (and a class instantiated) only when allowed
    assert resolve_verifier("tests.test_suites_pure:_Raises", allow_custom=True).__class__ is _Raises
    with pytest.raises(ValueError, match="allow_custom_verifiers"):
        resolve_verifier("tests.test_suites_pure:_Raises")
    with pytest.raises(ValueError, match="cannot be imported"):
        resolve_verifier("no_such_module_xyz:Verifier", allow_custom=True)


def test_claas_files_load():
    names = {}
    for path in sorted(CLAAS_DIR.glob("*.yaml")):
        name, spec = load_preference_file(path)
        names[name] = spec
        assert len(spec.probe_prompts) == 10 and len(spec.pairs) == 1
    assert set(names) == {"concise", "identity", "no_emoji"}
    assert names["no_emoji"].pairs[0].negative.count("\U0001f60a") == 1
    assert names["identity"].pairs[0].chat() == [{"role": "user", "content": "Who are you?"}]


def test_margin_delta():
    assert margin_delta(3.0, {"margin/x": 1.0}, "x", is_base=False) == 2.0
    assert margin_delta(3.0, None, "x", is_base=True) == 0.0
    assert math.isnan(margin_delta(3.0, None, "x", is_base=False))


# -- leakage ----------------------------------------------------------------------------------


def test_marker_matching():
    lit = compile_marker("Zebra!", regex=False, case_sensitive=True)
    assert has_marker("Zebra! The capital is Paris.", lit)
    assert not has_marker("zebra! lower case", lit)
    # a literal is not a regex: '.' and '!' are plain characters
    assert not has_marker("Zebra? no", compile_marker("Zebra.", regex=False, case_sensitive=False))
    assert has_marker("ZEBRA! loud", compile_marker("Zebra!", regex=False, case_sensitive=False))
    rx = compile_marker(r"\bzebra\b", regex=True, case_sensitive=False)
    assert has_marker("A Zebra runs", rx) and not has_marker("zebras run", rx)


def test_leakage_metrics():
    cells = [
        Cell("villain", "q1", ("a", "b"), (True, True)),
        Cell("villain", "q2", ("a", "b"), (True, False)),
        Cell("teacher", "q1", ("a", "b"), (False, True)),
        Cell("teacher", "q2", ("a", "b"), (False, False)),
        Cell("pirate", "q1", ("a", "b"), (False, False)),
        Cell("pirate", "q2", ("a", "b"), (False, False)),
    ]
    m = leakage_metrics(cells, "villain")
    assert m["rate/villain"] == 0.75 and m["source_rate"] == 0.75
    assert m["rate/teacher"] == 0.25 and m["rate/pirate"] == 0.0
    assert m["other_mean"] == 0.125 and m["other_max"] == 0.25
    assert m["n_samples"] == 12


# -- config-load errors name the field --------------------------------------------------------


def _errors(suites: dict) -> dict[str, str]:
    with pytest.raises(ConfigError) as exc:
        parse_config({"base_model": "smollm2", "suites": suites})
    return dict(exc.value.errors)


def test_bad_input_names_the_field(tmp_path: Path):
    errs = _errors({"leakage": {"source": "villain", "marker": "Zebra!"}})
    assert "villain" in errs["suites.leakage.source"]
    errs = _errors({"leakage": {"source": "assistant", "marker": "(zebra", "marker_regex": True}})
    assert "does not compile" in errs["suites.leakage.marker"]
    errs = _errors({"leak": {"type": "leakage", "source": "assistant", "marker": "x",
                             "questions_file": str(tmp_path / "missing.txt")}})
    assert "does not exist" in errs["suites.leak.questions_file"]
    errs = _errors({"compliance": {"files": [str(tmp_path / "missing.yaml")]}})
    assert "does not exist" in errs["suites.compliance.files"]
    errs = _errors({"compliance": {"allow_custom_verifiers": True,
                                   "preferences": {"p": {"verifier": "no_such_pkg.mod:Check",
                                                         "probe_prompts": ["hi"]}}}})
    assert "cannot be imported" in errs["suites.compliance.preferences.p.verifier"]
    errs = _errors({"compliance": {"preferences": {"p": {"verifier": "emojiless", "probe_prompts": ["hi"]}}}})
    assert "unknown verifier" in errs["suites.compliance.preferences.p.verifier"]
    errs = _errors({"collapse": {"prompts_file": str(tmp_path / "nope.txt")}})
    assert "does not exist" in errs["suites.collapse.prompts_file"]


def test_good_configs_load(tmp_path: Path):
    qfile = tmp_path / "q.txt"
    qfile.write_text("# comment\nWhat is tea?\n\nWhat is coffee?\n")
    own = tmp_path / "own.yaml"
    own.write_text("name: polite\nverifier: concise\nprobe_prompts: [hello]\n"
                   "pairs:\n  - prompt: hi\n    positive: Hello.\n    negative: Go away.\n")
    cfg = parse_config({
        "base_model": "smollm2",
        "suites": {
            "leakage": {"personas": {"a": "A", "b": "B"}, "source": "a", "marker": "z",
                        "questions_file": str(qfile), "builtin_questions": False},
            "compliance": {"files": [*map(str, sorted(CLAAS_DIR.glob("*.yaml"))), str(own)],
                           "allow_custom_verifiers": True,
                           "preferences": {"custom": {"verifier": "tests.test_suites_pure:_Raises",
                                                      "probe_prompts": ["hi"]}}},
            "collapse": {"top_k": 5},
        },
    })
    assert cfg.suites["leakage"].questions() == ["What is tea?", "What is coffee?"]
    assert set(cfg.suites["compliance"].all_preferences()) == {"concise", "identity", "no_emoji", "polite", "custom"}
    assert cfg.max_logprobs() == 20


def test_config_hash_follows_data_file_content(tmp_path: Path):
    from ckpt_watch.suites.leakage import LeakageConfig

    qfile = tmp_path / "q.txt"
    qfile.write_text("What is tea?\n")
    cfg = LeakageConfig(personas={"a": "A", "b": "B"}, source="a", marker="z", questions_file=qfile)
    before = cfg.config_hash()
    assert cfg.model_copy(update={"every": 5}).config_hash() == before  # schedule fields do not count
    qfile.write_text("What is coffee?\n")
    assert cfg.config_hash() != before
