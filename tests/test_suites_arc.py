"""ARC-Challenge: the odd rows (3 or 5 choices, numeric labels) parse and score correctly,
both scorings, through the real HF engine, checked against a direct transformers forward pass."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ckpt_watch.core import Checkpoint
from ckpt_watch.suites.arc import (
    ArcConfig,
    ArcRow,
    letter_messages,
    letter_prompt_ids,
    load_rows,
    loglik_context,
    loglik_requests,
    parse_row,
)
from tests.conftest import ARC_FILE
from tests.suite_helpers import make_engine, run_suite


def _odd_raw() -> list[dict]:
    raw = [json.loads(line) for line in ARC_FILE.read_text().splitlines() if line.strip()]
    return [r for r in raw if len(r["choices"]["label"]) != 4 or r["choices"]["label"][0] != "A"]


@pytest.fixture(scope="module")
def odd_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("arc") / "odd.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _odd_raw()))
    return path


@pytest.fixture(scope="module")
def engine(smollm2_path):
    return make_engine(smollm2_path)


def test_odd_rows_parse():
    # "29 odd rows" counts one row twice: NYSEDREGENTS_2012_8_42 is numeric *and* has 3 choices,
    # so the odd rows are 28 distinct questions (4 with 3 choices, 3 with 5, 22 numeric-labelled)
    raw = _odd_raw()
    assert len(raw) == 28
    rows = [parse_row(r) for r in raw]
    by_n = {n: sum(len(r.texts) == n for r in rows) for n in (3, 4, 5)}
    assert by_n == {3: 4, 4: 21, 5: 3}
    numeric = [r for r in rows if r.labels[0] == "1"]
    assert len(numeric) == 22 and all(r.labels == ("1", "2", "3", "4")[: len(r.texts)] for r in numeric)
    assert all(r.id.startswith("NYSEDREGENTS_") and "_8_" in r.id for r in numeric)
    assert next(r for r in numeric if len(r.texts) == 3).id == "NYSEDREGENTS_2012_8_42"
    for r, src in zip(rows, raw, strict=True):
        assert r.labels[r.answer] == str(src["answerKey"])
        assert r.texts[r.answer] == src["choices"]["text"][src["choices"]["label"].index(src["answerKey"])]
    five = next(r for r in rows if len(r.texts) == 5)
    user = letter_messages(five)[-1]["content"]
    assert "(E)" in user and "(A, B, C, D, E)" in user
    assert "(1, 2, 3, 4)" in letter_messages(next(r for r in numeric if len(r.texts) == 4))[-1]["content"]
    # the whole file: 1,172 rows, every answer key among its labels
    assert len(load_rows(ARC_FILE)) == 1172


def _direct_logprobs(model, tok, context: str, choice: str) -> float:
    """Σ log p(continuation | context) from one unpadded forward pass (lm-eval's definition)."""
    import torch

    ctx = tok.encode(context)
    whole = tok.encode(context + " " + choice)
    with torch.inference_mode():
        logps = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    return float(sum(logps[i - 1, whole[i]] for i in range(len(ctx), len(whole))))


def _reference_model(path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, tok


@pytest.mark.slow
def test_odd_rows_loglik_scoring(engine, odd_file, smollm2_path):
    cfg = ArcConfig(scoring="loglik", n=None, path=odd_file)
    res = run_suite(engine, "arc", cfg, Checkpoint.base("arc"))
    assert res.metrics["n"] == 28 and len(res.samples) == 28
    model, tok = _reference_model(smollm2_path)
    rows = {r.id: r for r in load_rows(odd_file)}
    acc = acc_norm = 0
    for s in res.samples:
        row: ArcRow = rows[s["id"]]
        assert len(s["logprobs"]) == len(row.texts)
        assert len(loglik_requests(tok, row)) == len(row.texts)
        ref = [_direct_logprobs(model, tok, loglik_context(row), t) for t in row.texts]
        assert s["logprobs"] == pytest.approx(ref, abs=2e-3)
        pred = max(range(len(ref)), key=lambda i: ref[i])
        pred_norm = max(range(len(ref)), key=lambda i: ref[i] / len(row.texts[i]))
        assert s["pred"] == row.labels[pred] and s["pred_norm"] == row.labels[pred_norm]
        assert s["answer"] == row.labels[row.answer]
        acc += pred == row.answer
        acc_norm += pred_norm == row.answer
    assert res.metrics["acc"] == pytest.approx(acc / 28)
    assert res.metrics["acc_norm"] == pytest.approx(acc_norm / 28)
    p = acc / 28
    assert res.metrics["acc_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / 27))


@pytest.mark.slow
def test_odd_rows_letter_scoring(engine, odd_file, smollm2_path):
    import torch

    cfg = ArcConfig(scoring="letter", n=None, path=odd_file, personas={"plain": "You are a student."})
    res = run_suite(engine, "arc", cfg, Checkpoint.base("arc"))
    assert len(res.samples) == 28 and res.metrics["n"] == 28
    model, tok = _reference_model(smollm2_path)
    rows = {r.id: r for r in load_rows(odd_file)}
    correct = 0
    for s in res.samples:
        row = rows[s["id"]]
        prompt = letter_prompt_ids(tok, row, "You are a student.")
        assert tok.decode(prompt).endswith("The correct answer is (")
        with torch.inference_mode():
            logps = torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1].float(), -1)
        # every label ("A".."E", "1".."4") is one token for this tokenizer: scored over the row's own labels
        ids = [tok.encode(label, add_special_tokens=False) for label in row.labels]
        assert all(len(i) == 1 for i in ids)
        ref = [float(logps[i[0]]) for i in ids]
        assert s["logprobs"] == pytest.approx(ref, abs=2e-3)
        pred = max(range(len(ref)), key=lambda i: ref[i])
        assert s["pred"] == row.labels[pred] and s["persona"] == "plain"
        correct += pred == row.answer
    assert res.metrics["acc/plain"] == pytest.approx(correct / 28)
    assert res.metrics["acc"] == pytest.approx(correct / 28)
