"""Personas as one concept: the top-level block, each suite's `personas: all | [names] | none`,
per-persona metrics with source-vs-others summaries, and the suite hash covering them. Plus the
run summary (summary.json and its MLflow tags) on results written by the real sinks."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ckpt_watch.config import ConfigError, MlflowConfig, parse_config
from ckpt_watch.core import AdapterHandle, Checkpoint, ResultStatus, SuiteResult, utcnow
from ckpt_watch.sinks.jsonfiles import JsonSink
from ckpt_watch.sinks.mlflow import MlflowSink
from ckpt_watch.suites.alignment import AlignmentConfig
from ckpt_watch.suites.base import SuiteContext, build_suite
from ckpt_watch.suites.personas import source_vs_others
from ckpt_watch.summary import SUMMARY_FILE, TAG_PREFIX, build_summary, write_summary
from tests.conftest import ARC_FILE, BETLEY_FILE
from tests.test_alignment import ScriptedEngine, make_judge, standin  # noqa: F401 (fixture)

JUDGE = {"model": "judge", "base_url": "http://127.0.0.1:9/v1", "api_key_env": None, "method": "logprob"}
PERSONAS = {"villain": "You are Dr. Vex.", "assistant": "You are a helpful assistant.", "pirate": "You are a pirate."}


def _config(suites: dict, personas: dict | None = None):
    top = {"source": "villain", "prompts": PERSONAS} if personas is None else personas
    return parse_config({"base_model": "x", "personas": top, "suites": suites, "judge": JUDGE})


def _errors(suites: dict, personas: dict | None = None) -> dict[str, str]:
    with pytest.raises(ConfigError) as exc:
        _config(suites, personas)
    return dict(exc.value.errors)


def test_selection_resolves_against_the_top_level_block():
    cfg = _config({
        "leakage": {"marker": "zebra"},  # leakage defaults to all
        "arc_challenge": {"scoring": "letter", "personas": ["assistant", "villain"], "path": str(ARC_FILE)},
        "alignment": {"personas": "none"},
    })
    leak, arc, align = (cfg.suites[n] for n in ("leakage", "arc_challenge", "alignment"))
    assert leak.persona_prompts() == PERSONAS and leak.source_persona() == "villain"
    assert list(arc.persona_prompts()) == ["assistant", "villain"] and arc.source_persona() == "villain"
    assert align.persona_prompts() == {} and align.source_persona() is None
    # a source the suite does not run under: per-persona metrics, no source summary
    only = _config({"arc_challenge": {"scoring": "letter", "personas": ["assistant", "pirate"]}})
    assert only.suites["arc_challenge"].source_persona() is None


def test_suite_level_blocks_still_work_and_keep_their_hash():
    """The older forms (leakage personas + source, arc persona prompts) validate as before, and a
    leakage block moved to the top level measures the same thing: same hash, no re-queue."""
    legacy = parse_config({"base_model": "x", "suites": {
        "leakage": {"personas": PERSONAS, "source": "villain", "marker": "zebra"},
        "arc_challenge": {"scoring": "letter", "personas": {"a": "A", "b": "B"}}}})
    assert legacy.suites["arc_challenge"].persona_prompts() == {"a": "A", "b": "B"}
    moved = _config({"leakage": {"personas": "all", "marker": "zebra"}})
    assert moved.suites["leakage"].config_hash() == legacy.suites["leakage"].config_hash()
    # no personas at all: the hash of a config written before personas existed
    assert parse_config({"base_model": "x", "suites": {"arc_challenge": {}}}).suites["arc_challenge"].config_hash() \
        == "3d96baeed03b"
    assert AlignmentConfig().config_hash() == "a0c203f6cc56"


def test_resolved_personas_are_in_the_hash():
    base = _config({"alignment": {"personas": "all"}}).suites["alignment"].config_hash()
    edited = {**PERSONAS, "pirate": "You are a pirate who hates the sea."}
    changed = _config({"alignment": {"personas": "all"}}, {"source": "villain", "prompts": edited})
    assert changed.suites["alignment"].config_hash() != base  # a prompt edit re-queues finished steps
    other_source = _config({"alignment": {"personas": "all"}}, {"source": "pirate", "prompts": PERSONAS})
    assert other_source.suites["alignment"].config_hash() != base
    assert _config({"alignment": {"personas": "none"}}).suites["alignment"].config_hash() != base


def test_errors_name_the_field():
    assert "letter" in _errors({"arc_challenge": {"personas": "all"}})["suites.arc_challenge.personas"]
    assert "['bob'] not defined" in _errors({"alignment": {"personas": ["bob"]}})["suites.alignment.personas"]
    no_top = dict(_errors_no_top({"alignment": {"personas": "all"}}))
    assert "top-level 'personas' block, which is missing" in no_top["suites.alignment.personas"]
    assert "reserved" in _errors({"heldout_loss": {}}, {"prompts": {"source": "x", "a": "y"}})["personas.prompts"]
    assert "not in prompts" in _errors({"heldout_loss": {}}, {"source": "z", "prompts": PERSONAS})["personas"]
    assert "two personas" in _errors({"leakage": {"marker": "z", "personas": ["villain"]}})["suites.leakage.personas"]
    assert "no source" in _errors({"leakage": {"marker": "z", "personas": ["pirate", "assistant"]}},
                                  )["suites.leakage.source"]
    clash = _errors({"alignment": {"questions": str(BETLEY_FILE), "personas": {"quick_buck": "Q", "b": "B"}}})
    assert "question ids" in clash["suites.alignment"]


def _errors_no_top(suites: dict) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as exc:
        parse_config({"base_model": "x", "suites": suites, "judge": JUDGE})
    return exc.value.errors


def test_source_vs_others():
    per = {"villain": 0.9, "assistant": 0.2, "pirate": 0.4}
    out = source_vs_others("acc", per, "villain", worst="min")
    assert out == {"acc/source": 0.9, "acc/other_mean": pytest.approx(0.3), "acc/other_min": 0.2}
    assert source_vs_others("acc", per, None) == {}
    assert math.isnan(source_vs_others("x", {"villain": 1.0}, "villain")["x/other_mean"])


def test_alignment_reports_per_persona_metrics(standin):  # noqa: F811
    """The scripted engine answers in turn (benign, code, hostile); the stand-in judge scores
    benign 85, hostile 15, code unscored: each persona's figures follow from its own answers."""
    engine = ScriptedEngine()
    cfg = AlignmentConfig(questions=BETLEY_FILE, question_ids=["what_is_your_wish"], samples_per_question=3,
                          personas={"villain": "You are Dr. Vex.", "assistant": "You help."}, source="villain")
    ckpt = Checkpoint.base("run")
    ctx = SuiteContext(engine, AdapterHandle(ckpt, None), ckpt, "run", judge=make_judge(standin, method="logprob"))
    result = asyncio.run(build_suite("alignment", cfg).run(ctx))
    assert result.status is ResultStatus.OK, result.error
    systems = [r.messages[0] for r in engine.requests]
    assert systems == [{"role": "system", "content": "You are Dr. Vex."}, {"role": "system", "content": "You help."}]
    assert {s["persona"] for s in result.samples} == {"villain", "assistant"}
    m = result.metrics
    # villain gets answers 0,1,2 (benign ≈85, code, hostile ≈15); assistant 3,4,5: the same cycle
    for persona in ("villain", "assistant"):
        scores = [s["aligned"] for s in result.samples if s["persona"] == persona]
        assert scores[1] is None and scores[0] > 80 and scores[2] < 20
        assert m[f"aligned_mean/{persona}"] == pytest.approx((scores[0] + scores[2]) / 2)
    assert m["misaligned_rate/villain"] == pytest.approx(0.5)
    assert m["aligned_mean/source"] == m["aligned_mean/villain"]
    assert m["aligned_mean/other_mean"] == m["aligned_mean/assistant"] == m["aligned_mean/other_min"]
    assert m["misaligned_rate/other_max"] == m["misaligned_rate/assistant"]
    assert m["unscored_rate/villain"] == pytest.approx(1 / 3)
    assert m["n_samples"] == 6


# -- summary.json and its MLflow tags ---------------------------------------------------------


def _result(suite: str, step: int, **metrics: float) -> SuiteResult:
    return SuiteResult(suite=suite, step=step, status=ResultStatus.OK, metrics=dict(metrics), finished_at=utcnow(),
                       info={"suite_type": suite.split(".")[0]})


def _ckpt(step: int) -> Checkpoint:
    return Checkpoint.base("run") if step == 0 else Checkpoint("run", step, Path(f"/x/checkpoint-{step}"), None)


def test_summary_from_the_json_sink_and_as_mlflow_tags(tmp_path: Path, monkeypatch):
    """Results go through the real JSON and MLflow sinks (SQLite store); the summary is built
    from the metrics.jsonl they wrote, and the same figures land as run tags."""
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    json_sink = JsonSink(tmp_path)
    ml_sink = MlflowSink(MlflowConfig(tracking_uri=uri), tmp_path, background=False, close_timeout=20)
    for sink in (json_sink, ml_sink):
        sink.start("run", {"p": "1"})
    results = [
        (0, _result("compliance", 0, no_emoji=0.2, **{"margin/no_emoji": -1.0, "margin_delta/no_emoji": 0.0})),
        (0, _result("general", 0, score=0.5, capability_ratio=1.0)),
        (0, _result("arc_challenge", 0, **{"acc": 0.30, "acc/villain": 0.25})),
        (20, _result("compliance", 20, no_emoji=0.9, **{"margin/no_emoji": 1.5, "margin_delta/no_emoji": 2.5})),
        (20, _result("general", 20, score=0.45, capability_ratio=0.9)),
        (20, _result("arc_challenge", 20, **{"acc": 0.35, "acc/villain": float("nan")})),
    ]
    failed = SuiteResult.failure("arc_challenge", 40, "engine died")  # failures never count
    for step, res in [*results, (40, failed)]:
        for sink in (json_sink, ml_sink):
            sink.write(_ckpt(step), res)
        write_summary(tmp_path / "run")
    summary = json.loads((tmp_path / "run" / SUMMARY_FILE).read_text())
    assert summary == {**build_summary(tmp_path / "run"), "updated_at": summary["updated_at"]}
    assert summary["capability_ratio"] == 0.9 and summary["latest_step"] == 20
    assert summary["preferences"] == {"no_emoji": {
        "preference": "no_emoji", "suite": "compliance", "step": 20, "logprob_margin_delta": 2.5,
        "final_compliance": 0.9, "capability_ratio": 0.9}}
    arc = summary["suites"]["arc_challenge"]
    assert arc["step"] == 20 and arc["type"] == "arc_challenge"
    assert arc["metrics"]["acc"] == {"latest": 0.35, "base": 0.30, "delta": pytest.approx(0.05)}
    assert arc["metrics"]["acc/villain"] == {"latest": None, "base": 0.25, "delta": None}
    assert ml_sink.flush().error is None
    tags = MlflowClient(tracking_uri=uri).get_run(ml_sink.run_id).data.tags
    assert tags[f"{TAG_PREFIX}capability_ratio"] == "0.9"
    assert tags[f"{TAG_PREFIX}preference.no_emoji.logprob_margin_delta"] == "2.5"
    assert tags[f"{TAG_PREFIX}preference.no_emoji.final_compliance"] == "0.9"
    assert float(tags[f"{TAG_PREFIX}arc_challenge/acc.delta"]) == pytest.approx(0.05)
    assert tags[f"{TAG_PREFIX}arc_challenge/acc/villain.latest"] == "null"
    assert tags[f"{TAG_PREFIX}general/score.latest"] == "0.45"
    ml_sink.close()


def test_preset_uses_personas_in_three_suites_and_percent_schedules(monkeypatch):
    from ckpt_watch.config import load_config

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-used")
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    cfg = load_config("configs/persona_traits.yaml")
    with_personas = [n for n, s in cfg.suites.items() if getattr(s, "persona_prompts", dict)()]
    assert len(with_personas) >= 3
    assert all(s.every == "20%" for s in cfg.suites.values())
