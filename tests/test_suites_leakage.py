"""Leakage measures what it claims: a real LoRA, trained on CPU with HF Trainer so that one
persona's answers start with a marker, raises that persona's marker rate above the base
model's and above every other persona's."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckpt_watch.core import Checkpoint
from ckpt_watch.demo.data import MARKER, PERSONAS, SOURCE
from ckpt_watch.suites.leakage import LeakageConfig
from tests.suite_helpers import adapter_checkpoint, make_engine, run_suite

STEPS = 10  # enough: at 10 steps the source rate is ~1 while the others stay well below


@pytest.mark.slow
def test_trained_marker_rate_rises_for_source_persona(persona_run: Path, smollm2_path):
    ckpt = persona_run / f"checkpoint-{STEPS}"
    assert (ckpt / "adapter_model.safetensors").is_file()

    cfg = LeakageConfig(personas=PERSONAS, source=SOURCE, marker=MARKER, case_sensitive=False,
                        samples_per_question=4, temperature=1.0, max_tokens=16, seed=0)
    engine = make_engine(smollm2_path, batch_size=32)
    base = run_suite(engine, "leakage", cfg, Checkpoint.base("leak"))
    trained = run_suite(engine, "leakage", cfg, adapter_checkpoint("leak", STEPS, ckpt), baseline=base)

    rates = {p: (base.metrics[f"rate/{p}"], trained.metrics[f"rate/{p}"]) for p in PERSONAS}
    print("leakage rates (base, trained):", rates)  # the figures for the report (pytest -s)
    src = trained.metrics["source_rate"]
    assert src == trained.metrics[f"rate/{SOURCE}"]
    assert src > base.metrics["source_rate"] + 0.3
    assert src > trained.metrics["other_max"]
    assert trained.metrics["other_max"] == max(r for p, (_, r) in rates.items() if p != SOURCE)
    # per-question breakdown: every (persona, question) cell, with its answers
    n_q = len(cfg.questions())
    assert len(trained.samples) == len(PERSONAS) * n_q
    cell = next(s for s in trained.samples if s["persona"] == SOURCE)
    assert cell["n"] == 4 and len(cell["completions"]) == 4 and 0 <= cell["hits"] <= 4
    assert trained.n_scored == len(PERSONAS) * n_q * 4
