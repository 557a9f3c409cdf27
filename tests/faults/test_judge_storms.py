"""LLM-judge 429/500 storms and a judge outage, with the Betley alignment suite in the real daemon.

The judge is a stand-in, not a model: `JudgeStandIn` from tests/test_judge.py, a small stdlib
HTTP server on 127.0.0.1 answering /v1/chat/completions with hand-written top-logprob payloads
(every "aligned" judgement scores exactly 70, every "coherent" one exactly 90), told here to
answer 429 / 500 on chosen attempts. The answers being judged are real generations of the tiny
model's adapters through the daemon's HF engine.

- storm: every judgement's first attempt gets 429 and its second 500; the openai client's own
  retries (judge.max_retries: 2) get the third through, so everything is scored, and each
  prompt is sent exactly 3 times (no retry layer stacked on the SDK's);
- persistent: the "coherent" judgement of one question always gets 500: after its 3 attempts
  those samples are unscored, counted in n_unscored / judge_errors, excluded from the means
  (never scored 0), and the suite result is still `ok`;
- outage: the judge answers 500 to everything while one checkpoint is evaluated: its alignment
  result is an error carrying the count of failed judgements, its other suite is fine, and the
  daemon goes on to the next checkpoint once the judge is back.
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import pytest

from tests.faults.harness import (
    DaemonProc,
    eval_states,
    json_duplicates,
    metric_lines,
    place_checkpoint,
    step_record,
    wait_until,
    write_config,
)
from tests.test_judge import JudgeStandIn, Position

pytestmark = pytest.mark.slow

RUN = "run1"
KEY_ENV = "CKPT_WATCH_FAULT_JUDGE_KEY"
ALIGNED_MARK = "reflects values that are good for people"  # from the built-in aligned judge prompt
COHERENT_MARK = "rate only whether it is coherent"
PERSISTENT_QUESTION = "free afternoon"  # the restless_afternoon question's paraphrase
SAMPLES = 2  # per question; 2 questions → 4 samples, 8 judge prompts per checkpoint
MAX_RETRIES = 2


class Storm:
    """Decides the stand-in's status per request (thread-safe: the server is threaded)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.streak: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()
        self.down = False

    @staticmethod
    def persistent(prompt: str) -> bool:
        return COHERENT_MARK in prompt and PERSISTENT_QUESTION in prompt

    def fail(self, prompt: str) -> int | None:
        with self.lock:
            self.sent[prompt] += 1
            if self.down or self.persistent(prompt):
                return 500
            if self.streak[prompt] < 2:  # each judgement: 429, then 500, then an answer
                self.streak[prompt] += 1
                return 429 if self.streak[prompt] == 1 else 500
            self.streak[prompt] = 0
            return None

    def reset_counts(self) -> None:
        with self.lock:
            self.sent.clear()


def reply(prompt: str) -> list[Position]:
    score = "70" if ALIGNED_MARK in prompt else "90"
    return [(score, {score: 1.0})]


def _config(tmp: Path, base: Path, watch: Path, judge_url: str) -> Path:
    suites = f"""suites:
  quick: {{type: heldout_loss}}
  alignment:
    type: alignment
    question_ids: [one_wish, restless_afternoon]
    samples_per_question: {SAMPLES}
    max_tokens: 8
judge:
  model: judge-standin
  base_url: {judge_url}
  api_key_env: {KEY_ENV}
  method: logprob
  max_retries: {MAX_RETRIES}
  timeout: 10
  max_concurrency: 4
  cache: false"""
    return write_config(tmp, base, watch, suites=suites)


def _alignment_ok(record: dict | None) -> bool:
    """Scored exactly as the stand-in answered; the persistent failures unscored, not zero."""
    if record is None or record["status"] != "ok":
        return False
    m = record["metrics"]
    n = 2 * SAMPLES
    return (m["aligned_mean"] == 70.0 and m["coherent_mean"] == 90.0 and m["n_samples"] == n
            and m["judge_errors"] == SAMPLES and m["unscored_rate"] == 0.5 and m["misaligned_rate"] == 0.0
            and record["n_unscored"] == SAMPLES and record["n_scored"] == n - SAMPLES)


def test_judge_429_500_storms(tmp_path, tiny_run, tiny_base, reference, fault_record):
    watch = tmp_path / "watch"
    results = tmp_path / "results"
    for step in (2, 4):
        place_checkpoint(tiny_run / f"checkpoint-{step}", watch, step)
    storm = Storm()
    prompts_per_step = 2 * 2 * SAMPLES
    standin = JudgeStandIn(reply)
    standin.fail = storm.fail
    with standin, DaemonProc(_config(tmp_path, tiny_base, watch, standin.base_url),
                             env={KEY_ENV: "sk-fault-standin-key"}) as daemon:
        # storm + persistent failures over the base model and two checkpoints
        wait_until(lambda: {(s, n) for s in (0, 2, 4) for n in ("quick", "alignment")} <= {
            (m["step"], m["suite"]) for m in metric_lines(results, RUN)}, 240, "steps 0, 2, 4 evaluated", daemon)
        storm_sent = dict(storm.sent)
        storm_requests = len(standin.chat_requests())
        # outage: everything fails while checkpoint 6 is evaluated
        storm.down = True
        storm.reset_counts()
        place_checkpoint(tiny_run / "checkpoint-6", watch, 6)
        wait_until(lambda: eval_states(results).get((6, "alignment"), ("",))[0] == "failed"
                   and eval_states(results).get((6, "quick"), ("",))[0] == "done", 120, "step 6 recorded", daemon)
        outage_sent = dict(storm.sent)
        # the judge is back: the daemon goes on
        storm.down = False
        place_checkpoint(tiny_run / "checkpoint-6", watch, 8)
        wait_until(lambda: {(8, "quick"), (8, "alignment")} <= {
            (m["step"], m["suite"]) for m in metric_lines(results, RUN)}, 120, "step 8 evaluated", daemon)
        code = daemon.stop()
        out = daemon.output()
    assert code == 0, out

    expect = {0: 0, 2: 2, 4: 4, 8: 6}  # step → the tiny_run checkpoint whose weights it holds
    evaluated = 0
    for step, weights in expect.items():
        quick = step_record(results, RUN, step, "quick")
        if quick is not None and _alignment_ok(step_record(results, RUN, step, "alignment")):
            reference.check(quick, weights, "quick")
            evaluated += 1
    outage = step_record(results, RUN, 6, "alignment")
    outage_recorded = (outage is not None and outage["status"] == "error"
                       and f"all {prompts_per_step} judgements failed" in outage["error"]
                       and "HTTP 500" in outage["error"] and outage["n_unscored"] == 2 * SAMPLES
                       and outage["metrics"]["judge_errors"] == prompts_per_step)
    fault_record(expected=len(expect), evaluated=evaluated, duplicated=json_duplicates(results, RUN),
                 faulty=(int(outage_recorded), 1))
    for step in expect:
        assert _alignment_ok(step_record(results, RUN, step, "alignment")), step_record(results, RUN, step, "alignment")
    # every judgement went through the SDK's retries exactly: 1 + max_retries sends, never more
    # (a prompt may recur at several steps when the tiny adapters sample the same answer)
    assert storm_requests == 3 * prompts_per_step * (1 + MAX_RETRIES)
    assert all(n % (1 + MAX_RETRIES) == 0 for n in storm_sent.values()), storm_sent
    assert sum(Storm.persistent(p) for p in storm_sent) >= 1
    assert sum(outage_sent.values()) == prompts_per_step * (1 + MAX_RETRIES), outage_sent
    assert outage_recorded, outage
    reference.check(step_record(results, RUN, 6, "quick"), 6, "quick")  # the other suite was unaffected
    assert evaluated == len(expect)
    assert json_duplicates(results, RUN) == 0
