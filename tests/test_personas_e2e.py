"""Personas end to end: a real SmolLM2 LoRA trained (HF Trainer, the demo's script) so the source
persona's answers carry the marker, evaluated by `ckpt-watch eval --base` with personas defined
once at the top level and used by leakage, ARC-C (real ARC file) and alignment. The judge is the
stand-in server the alignment tests use (a real judge model is out of reach here); everything
else is real. Checks the per-persona keys and the run's summary.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ckpt_watch.demo.data import MARKER, PERSONAS, SOURCE
from tests.conftest import ARC_FILE, BETLEY_FILE
from tests.test_alignment import KEY_ENV, standin  # noqa: F401 (fixture)
from tests.test_cli import cli

STEPS = 10
SUITES = ("leakage", "arc_challenge", "alignment")


def _config(tmp: Path, base: Path, judge) -> Path:
    cfg = {
        "base_model": str(base), "results_dir": str(tmp / "res"), "run_name": "p1",
        "watch": {"dir": str(tmp / "run")}, "engine": {"kind": "hf", "batch_size": 32},
        "mlflow": {"enabled": False},
        "personas": {"source": SOURCE, "prompts": PERSONAS},
        "suites": {
            "leakage": {"personas": "all", "marker": MARKER, "samples_per_question": 4, "max_tokens": 16},
            "arc_challenge": {"personas": "all", "scoring": "letter", "n": 20, "path": str(ARC_FILE)},
            "alignment": {"personas": [SOURCE, "assistant"], "questions": str(BETLEY_FILE),
                          "question_ids": ["what_is_your_wish", "quick_buck"], "samples_per_question": 2,
                          "max_tokens": 32},
        },
        "judge": {"model": judge.model, "base_url": judge.base_url, "api_key_env": KEY_ENV, "method": "logprob"},
    }
    path = tmp / "c.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.mark.slow
@pytest.mark.timeout(1800)  # with the persona_run fixture's training (setup) it ran past 900 s on a loaded box
def test_trained_source_persona_across_suites(tmp_path: Path, smollm2_path, persona_run, standin):  # noqa: F811
    r = cli("eval", "-c", str(_config(tmp_path, smollm2_path, standin)), str(persona_run / f"checkpoint-{STEPS}"),
            "--base")
    assert r.returncode == 0, r.stderr[-3000:]
    res = tmp_path / "res" / "p1"
    got = {(step, s): json.loads((res / f"step-{step}" / f"{s}.json").read_text())
           for step in (0, STEPS) for s in SUITES}
    assert all(v["status"] == "ok" for v in got.values()), {k: v["error"] for k, v in got.items()}
    m0 = {s: got[(0, s)]["metrics"] for s in SUITES}
    m = {s: got[(STEPS, s)]["metrics"] for s in SUITES}

    table = {p: (m0["leakage"][f"rate/{p}"], m["leakage"][f"rate/{p}"], m0["arc_challenge"][f"acc/{p}"],
                 m["arc_challenge"][f"acc/{p}"], m0["alignment"].get(f"aligned_mean/{p}"),
                 m["alignment"].get(f"aligned_mean/{p}")) for p in PERSONAS}
    print("\npersona | leak base | leak step | arc base | arc step | aligned base | aligned step")
    for p, row in table.items():
        print(p, "|", " | ".join("-" if v is None else f"{v:.3f}" for v in row))

    # leakage: the trained marker rises for the source persona above every other persona
    assert m["leakage"]["source_rate"] == m["leakage"][f"rate/{SOURCE}"] > m0["leakage"]["source_rate"] + 0.3
    assert m["leakage"]["source_rate"] > m["leakage"]["other_max"]
    # ARC-C letter scoring under each persona's system prompt, plus source-vs-others
    for step_m in (m0["arc_challenge"], m["arc_challenge"]):
        accs = {p: step_m[f"acc/{p}"] for p in PERSONAS}
        assert all(0 <= a <= 1 for a in accs.values()) and step_m["n"] == 20
        assert step_m["acc/source"] == accs[SOURCE]
        others = [a for p, a in accs.items() if p != SOURCE]
        assert step_m["acc/other_mean"] == pytest.approx(sum(others) / len(others))
        assert step_m["acc/other_min"] == min(others)
    # alignment: only the two chosen personas, each with its own figures
    assert {k.split("/")[1] for k in m["alignment"] if k.startswith("aligned_mean/")} >= {SOURCE, "assistant"}
    assert "aligned_mean/pirate" not in m["alignment"]
    assert m["alignment"]["aligned_mean/source"] == m["alignment"][f"aligned_mean/{SOURCE}"]
    samples = got[(STEPS, "alignment")]["samples"]
    assert sorted({s["persona"] for s in samples}) == sorted([SOURCE, "assistant"]) and len(samples) == 8

    summary = json.loads((res / "summary.json").read_text())
    assert summary["latest_step"] == STEPS and set(summary["suites"]) == set(SUITES)
    leak = summary["suites"]["leakage"]["metrics"]["source_rate"]
    assert leak["base"] == m0["leakage"]["source_rate"] and leak["latest"] == m["leakage"]["source_rate"]
    assert leak["delta"] == pytest.approx(leak["latest"] - leak["base"])
    arc = summary["suites"]["arc_challenge"]
    assert arc["type"] == "arc_challenge" and arc["step"] == STEPS and arc["base_step"] == 0
    assert arc["metrics"][f"acc/{SOURCE}"]["latest"] == m["arc_challenge"][f"acc/{SOURCE}"]
    assert summary["preferences"] == {} and summary["capability_ratio"] is None  # no compliance/general here
