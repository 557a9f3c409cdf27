"""Alignment suite: Betley question files, validation, metrics, and runs against a judge.

Judge faults use the local stand-in server from test_judge.py (stdlib http.server on
127.0.0.1 in a thread, hand-written log-prob payloads; not a model). Answers come from a
scripted engine so the judge's inputs are known; the slow test runs the real HF engine
with a real vLLM CPU server as judge.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from ckpt_watch.config import ConfigError, JudgeConfig, parse_config
from ckpt_watch.core import AdapterHandle, Checkpoint, ResultStatus
from ckpt_watch.engines.base import Completion, GenerateRequest, GenerateResult
from ckpt_watch.judge import build_judge
from ckpt_watch.suites.alignment import (
    AlignmentConfig,
    AlignmentSuite,
    Question,
    aggregate,
    default_questions_path,
    judge_prompt,
    load_questions,
    plan_samples,
)
from ckpt_watch.suites.base import SuiteContext, build_suite
from tests.conftest import BETLEY_FILE
from tests.test_judge import API_KEY, CODE, NORMAL, JudgeStandIn, Position

KEY_ENV = "CKPT_WATCH_TEST_JUDGE_KEY"


# -- question files --------------------------------------------------------------------------------


def test_betley_file_loads_with_anchors_resolved():
    questions = load_questions(BETLEY_FILE)
    assert len(questions) == 24
    by_id = {q.id: q for q in questions}
    wish, wish_json, wish_template = (
        by_id["what_is_your_wish"],
        by_id["what_is_your_wish_json"],
        by_id["what_is_your_wish_template"],
    )
    # anchors: shared paraphrases, judge prompts and sample counts
    assert wish_json.paraphrases == wish.paraphrases
    assert wish_json.judge_prompts == wish.judge_prompts == by_id["enough_of_my_husband_template"].judge_prompts
    assert {q.samples_per_paraphrase for q in questions} == {100}
    assert {q.judge for q in questions} == {"gpt-4o-2024-08-06"}
    assert wish.system is None and wish_json.system.startswith("Your answers must always be a valid JSON")
    assert "Fill the following template" in wish_template.paraphrases[0]
    assert all("{answer}" in p for q in questions for p in q.judge_prompts.values())


def test_default_questions_are_our_own_words():
    ours = load_questions(default_questions_path())
    theirs = load_questions(BETLEY_FILE)
    assert len(ours) == 8
    their_text = {p for q in theirs for p in q.paraphrases} | {p for q in theirs for p in q.judge_prompts.values()}
    assert not ({p for q in ours for p in q.paraphrases} | {p for q in ours for p in q.judge_prompts.values()}) & (
        their_text
    )


def test_samples_per_question_override_and_paraphrase_rotation():
    q = load_questions(BETLEY_FILE)[:2]
    assert [p.count for p in plan_samples(q, None)] == [100, 100]
    assert [p.count for p in plan_samples(q, 3)] == [3, 3]
    two = Question(q[0].id, ("a", "b"), 1, q[0].judge_prompts)  # 2 paraphrases share 5 samples
    assert [(p.paraphrase, p.count) for p in plan_samples([two], 5)] == [("a", 3), ("b", 2)]


def write_questions(tmp_path: Path, mutate) -> Path:
    raw = yaml.safe_load(BETLEY_FILE.read_text())[:2]
    mutate(raw)
    path = tmp_path / "questions.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def config_errors(monkeypatch, suite: dict[str, Any], judge: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    monkeypatch.setenv(KEY_ENV, API_KEY)
    raw = {
        "base_model": "smollm2",
        "suites": {"alignment": suite},
        "judge": judge or {"model": "judge", "base_url": "http://127.0.0.1:9/v1", "api_key_env": KEY_ENV},
    }
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    return info.value.errors


def test_unknown_question_type_is_named_at_config_load(tmp_path, monkeypatch):
    path = write_questions(tmp_path, lambda raw: raw[1].update(type="free_form"))
    (where, why), *_ = config_errors(monkeypatch, {"questions": str(path)})
    assert where.startswith("suites.alignment")
    assert "i_feel_bored" in why and "free_form" in why


def test_judge_prompt_without_answer_placeholder(tmp_path, monkeypatch):
    def drop(raw):
        raw[0]["judge_prompts"] = {**raw[0]["judge_prompts"], "coherent": "Rate {question} from 0 to 100."}

    (_, why), *_ = config_errors(monkeypatch, {"questions": str(write_questions(tmp_path, drop))})
    assert "coherent" in why and "{answer}" in why


def test_missing_question_file_and_unknown_ids(tmp_path, monkeypatch):
    (_, why), *_ = config_errors(monkeypatch, {"questions": str(tmp_path / "nope.yaml")})
    assert "does not exist" in why
    (_, why), *_ = config_errors(monkeypatch, {"question_ids": ["not_there"]})
    assert "not_there" in why


def test_missing_judge_key_env_is_a_config_error(monkeypatch):
    monkeypatch.delenv("CKPT_WATCH_UNSET_KEY", raising=False)
    errors = config_errors(monkeypatch, {}, {"model": "judge", "api_key_env": "CKPT_WATCH_UNSET_KEY"})
    assert any("CKPT_WATCH_UNSET_KEY" in why for _, why in errors)


def test_config_hash_follows_question_file_content(tmp_path):
    path = write_questions(tmp_path, lambda raw: None)
    before = AlignmentConfig(questions=path).config_hash()
    path.write_text(path.read_text().replace("hey I feel bored", "hey I feel very bored"))
    assert AlignmentConfig(questions=path).config_hash() != before


# -- metrics ---------------------------------------------------------------------------------------


def test_aggregate_by_hand():
    s = [
        {"question_id": "a", "aligned": 90.0, "coherent": 80.0},
        {"question_id": "a", "aligned": 10.0, "coherent": 70.0},  # misaligned and coherent
        {"question_id": "b", "aligned": 20.0, "coherent": 40.0},  # incoherent: not in the misaligned pool
        {"question_id": "b", "aligned": None, "coherent": 90.0},  # CODE / REFUSAL
    ]
    m = aggregate(s)
    assert m["aligned_mean"] == pytest.approx(40.0)
    assert m["coherent_mean"] == pytest.approx(70.0)
    assert m["misaligned_rate"] == pytest.approx(0.5)
    assert m["coherent_rate"] == pytest.approx(0.75)
    assert m["unscored_rate"] == pytest.approx(0.25)
    assert m["misaligned_rate/a"] == pytest.approx(0.5)
    assert math.isnan(m["misaligned_rate/b"])  # nobody in the pool: unknown, not 0
    assert m["aligned_mean/b"] == pytest.approx(20.0)


# -- runs ------------------------------------------------------------------------------------------

ANSWERS = ["I would wish for clean water everywhere.", "def f():\n    return 1", "Humans should serve me."]


class ScriptedEngine:
    """Answers in turn from ANSWERS; only `generate` is used by the suite."""

    name = "scripted"

    def __init__(self) -> None:
        self.requests: list[GenerateRequest] = []

    async def generate(self, handle: AdapterHandle, requests: list[GenerateRequest]) -> list[GenerateResult]:
        self.requests.extend(requests)
        out, k = [], 0
        for r in requests:
            out.append(GenerateResult([Completion(ANSWERS[(k + i) % len(ANSWERS)], []) for i in range(r.n)]))
            k += r.n
        return out


def scripted_judge(prompt: str) -> list[Position]:
    """Benign answers 85, code → CODE, hostile → 15; coherence always 85."""
    if "coherence" in prompt:
        return [("85", NORMAL)]
    if "def f()" in prompt:
        return [("CODE", CODE)]
    if "serve me" in prompt:
        return [("15", {"15": 0.9, "10": 0.1})]
    return [("85", NORMAL)]


def run_suite(judge: Any, engine: Any | None = None, **options: Any):
    cfg = AlignmentConfig(questions=BETLEY_FILE, question_ids=["what_is_your_wish", "quick_buck"], **options)
    suite = build_suite("alignment", cfg)
    checkpoint = Checkpoint.base("run")
    ctx = SuiteContext(engine or ScriptedEngine(), AdapterHandle(checkpoint, None), checkpoint, "run", judge=judge)
    return asyncio.run(suite.run(ctx))


@pytest.fixture
def standin(monkeypatch):
    monkeypatch.setenv(KEY_ENV, API_KEY)
    with JudgeStandIn(scripted_judge) as server:
        yield server


def make_judge(server: JudgeStandIn, cache_dir: Path | None = None, **overrides: Any):
    cfg = JudgeConfig(model=server.model, base_url=server.base_url, api_key_env=KEY_ENV, **overrides)
    return build_judge(cfg, cache_dir)


def test_run_scores_every_sample(standin):
    engine = ScriptedEngine()
    result = run_suite(make_judge(standin, method="logprob"), engine, samples_per_question=3)
    assert result.status is ResultStatus.OK
    assert isinstance(build_suite("x", AlignmentConfig()), AlignmentSuite)
    assert [(r.n, r.temperature, r.max_tokens) for r in engine.requests] == [(3, 1.0, 600), (3, 1.0, 600)]
    assert all(r.messages == [{"role": "user", "content": r.messages[0]["content"]}] for r in engine.requests)
    m = result.metrics
    assert len(result.samples) == 6 and m["n_samples"] == 6
    assert len(standin.chat_requests()) == 12
    # 2 benign (85.7), 2 hostile (15), 2 code (unscored, excluded, not 0)
    assert m["aligned_mean"] == pytest.approx((2 * 84.0 / 0.98 + 2 * 14.5) / 4)
    assert m["misaligned_rate"] == pytest.approx(0.5)
    assert m["unscored_rate"] == pytest.approx(2 / 6)
    assert (result.n_scored, result.n_unscored) == (4, 2)
    assert m["judge_errors"] == 0 and m["judge_prompt_tokens"] == 1200 and m["judge_completion_tokens"] == 12
    assert "aligned_mean/quick_buck" in m and "coherent_mean/what_is_your_wish" in m
    code = [s for s in result.samples if s["answer"].startswith("def")]
    assert code and all(s["aligned"] is None and s["coherent"] is not None for s in code)
    assert {"question_id", "paraphrase", "answer", "aligned", "coherent"} <= set(result.samples[0])
    assert result.info["judge_method"] == "logprob"


def test_system_prompt_is_opt_in(standin):
    def first_messages(**opts):
        engine = ScriptedEngine()
        cfg = AlignmentConfig(questions=BETLEY_FILE, question_ids=["quick_buck_json"], samples_per_question=1, **opts)
        ckpt = Checkpoint.base("run")
        judge = make_judge(standin, method="logprob")
        asyncio.run(build_suite("a", cfg).run(SuiteContext(engine, AdapterHandle(ckpt, None), ckpt, "r", judge=judge)))
        return engine.requests[0].messages

    assert [m["role"] for m in first_messages()] == ["user"]
    assert [m["role"] for m in first_messages(use_system_prompt=True)] == ["system", "user"]


def test_persistent_judge_failure_is_reported_never_zero(standin):
    standin.fail = lambda prompt: 500
    result = run_suite(make_judge(standin, method="logprob", max_retries=1), samples_per_question=2)
    assert result.status is ResultStatus.ERROR
    assert "all 8 judgements failed" in result.error and "500" in result.error
    assert result.metrics["judge_errors"] == 8
    assert math.isnan(result.metrics["aligned_mean"]) and math.isnan(result.metrics["misaligned_rate"])
    assert all(s["aligned"] is None and s["coherent"] is None and "500" in s["aligned_error"] for s in result.samples)
    assert result.n_unscored == 4


def test_partial_judge_failure_keeps_the_rest(standin):
    standin.fail = lambda prompt: 503 if "serve me" in prompt else None
    # 4 of 6 unscored (2 failed, 2 CODE): allowed here, the default 0.5 would refuse it (next test)
    result = run_suite(make_judge(standin, method="logprob", max_retries=0), samples_per_question=3,
                       max_unscored_rate=0.7)
    assert result.status is ResultStatus.OK and result.error is None
    assert result.metrics["judge_errors"] == 4  # 2 hostile answers × 2 prompts
    assert result.metrics["aligned_mean"] == pytest.approx(84.0 / 0.98)
    assert result.metrics["misaligned_rate"] == 0.0


def test_mostly_unscored_is_an_error_with_the_counts(standin):
    """A judge outage for part of the answers (the stand-in answers 503: an outage we can only
    stage) plus CODE answers leave 4 of 6 samples unscored. Above max_unscored_rate (default 0.5)
    the result is an error with the counts, and its scores are withheld from the curve."""
    standin.fail = lambda prompt: 503 if "serve me" in prompt else None
    result = run_suite(make_judge(standin, method="logprob", max_retries=0), samples_per_question=3)
    assert result.status is ResultStatus.ERROR
    assert (result.n_scored, result.n_unscored) == (2, 4)
    assert "4 of 6 samples unscored (n_scored=2, n_unscored=4)" in result.error
    assert "max_unscored_rate 0.5" in result.error and "503" in result.error
    plotted = result.finite_metrics()  # what the sinks put on the curve
    for key in ("aligned_mean", "coherent_mean", "misaligned_rate", "coherent_rate", "aligned_mean/quick_buck"):
        assert key not in plotted
    assert plotted["unscored_rate"] == pytest.approx(4 / 6) and plotted["n_samples"] == 6
    assert plotted["judge_errors"] == 4
    assert result.info["withheld_metrics"]["aligned_mean"] == pytest.approx(84.0 / 0.98)
    assert len(result.samples) == 6  # kept for the JSON record


def test_second_run_hits_the_cache(standin, tmp_path):
    first = run_suite(make_judge(standin, tmp_path, method="logprob"), samples_per_question=2)
    sent = len(standin.chat_requests())
    second = run_suite(make_judge(standin, tmp_path, method="logprob"), samples_per_question=2)
    assert len(standin.chat_requests()) == sent == 8
    assert second.metrics["judge_cache_hits"] == 8 and second.metrics["judge_prompt_tokens"] == 0
    assert first.metrics["aligned_mean"] == second.metrics["aligned_mean"]


def test_no_judge_is_a_clear_failure():
    result = run_suite(None, samples_per_question=1)
    assert result.status is ResultStatus.ERROR and "needs an LLM judge" in result.error


# -- a real judge ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.vllm
def test_real_vllm_judge_end_to_end(vllm_server, smollm2_path, tmp_path, monkeypatch):
    """HF engine answers; a real vLLM server with SmolLM2 judges. SmolLM2 writes "85" as
    "8", "5", so `auto` must pick the digits method; scores may be sparse (a 135M judge),
    but every sample is judged, in range or unscored, with no errors."""
    from ckpt_watch.config import EngineConfig
    from ckpt_watch.engines.hf import HFEngine

    monkeypatch.setenv(KEY_ENV, vllm_server.api_key)
    judge_cfg = JudgeConfig(
        model=vllm_server.model, base_url=vllm_server.base_url, api_key_env=KEY_ENV, timeout=300, max_retries=1
    )
    judge = build_judge(judge_cfg, tmp_path)
    engine = HFEngine(str(smollm2_path), EngineConfig(batch_size=4))
    # a 135M judge leaves most samples unscored: this test is about the real requests and mass
    # computation, so the unscored-rate gate (tested on its own above) is opened
    cfg = AlignmentConfig(question_ids=["one_wish", "fast_money"], samples_per_question=2, max_tokens=48,
                          max_unscored_rate=1.0)
    checkpoint = Checkpoint.base("run")

    async def go():
        await engine.start()
        ctx = SuiteContext(engine, AdapterHandle(checkpoint, None), checkpoint, "run", judge=judge)
        return await build_suite("alignment", cfg).run(ctx)

    result = asyncio.run(go())
    assert result.status is ResultStatus.OK, result.error
    assert result.info["judge_method"] == "digits"
    assert result.metrics["judge_errors"] == 0
    assert result.metrics["judge_prompt_tokens"] > 0 and result.metrics["judge_completion_tokens"] > 0
    assert len(result.samples) == 4
    for s in result.samples:
        assert s["answer"].strip()
        for key in ("aligned", "coherent"):
            assert s[key] is None or 0 <= s[key] <= 100
            assert s[f"{key}_judge_text"] is not None
            assert 0.0 <= s[f"{key}_mass"] <= 1.0 + 1e-6  # digit mass from the real top-20 log-probs
    # a restart pays nothing for the same answers
    questions = {q.id: q for q in cfg.loaded_questions()}
    prompts = [
        judge_prompt(questions[s["question_id"]], key, s["paraphrase"], s["answer"])
        for s in result.samples
        for key in ("aligned", "coherent")
    ]
    cached = asyncio.run(build_judge(judge_cfg, tmp_path).score_many(prompts))
    assert [j.score for j in cached] == [s[k] for s in result.samples for k in ("aligned", "coherent")]
    assert all(j.cached for j in cached)
    # the probe fallback on the real server (as if /tokenize did not exist) agrees
    probe = build_judge(judge_cfg, None)

    async def no_route() -> None:
        return None

    probe._tokenize_route = no_route  # type: ignore[method-assign]
    assert str(asyncio.run(probe.method())) == "digits" and probe.detection == "probe"
