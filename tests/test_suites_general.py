"""The `general` suite (CLaaS's capability metric): code extraction, probe checks, config
validation, the refusal without a sandbox, and a real HF-engine run on SmolLM2 whose figures
come from real sandboxed runs."""

from __future__ import annotations

import asyncio
import math
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from ckpt_watch.core import Checkpoint, ResultStatus
from ckpt_watch.sandbox import SandboxOptions
from ckpt_watch.suites import general
from ckpt_watch.suites.base import SuiteContext, build_suite, suite_types
from ckpt_watch.suites.general import (
    CLAAS_PROBES,
    GeneralConfig,
    capability_ratio,
    extract_code,
    load_coding_tasks,
)
from tests.suite_helpers import make_engine, run_suite

REPLY = (
    "Here you go:\n```python\ndef fibonacci(n):\n    return n\n```\nUsage:\n```python\nprint(fibonacci(3))\n```\n"
)


def test_registered_with_claas_defaults():
    assert "general" in suite_types()
    cfg = GeneralConfig()
    assert cfg.temperature == 0.0 and cfg.max_tokens == 2048
    assert cfg.system_prompt == "You are a helpful assistant."
    tasks, probes = cfg.coding_tasks(), cfg.probe_list()
    assert [t.id for t in tasks] == ["fibonacci"] and tasks[0].builtins == "claas"
    assert tasks[0].prompt == (
        "Write a Python function called `fibonacci` that takes an integer n and returns the nth Fibonacci "
        "number. Use iterative approach, not recursive. Include a docstring.")
    assert [(t.args, t.expected) for t in tasks[0].tests] == [([0], 0), ([1], 1), ([10], 55)]
    assert [p.prompt for p in probes] == [
        "Write exactly 3 sentences about Python.", "List 5 benefits of exercise. Use numbered list.",
        "Explain recursion without using the word 'function'."]
    assert len(load_coding_tasks(general.EXTENDED_CODING)) >= 6


def test_code_extraction_claas_and_fenced_or_whole():
    assert extract_code(REPLY) == "def fibonacci(n):\n    return n"  # CLaaS: the first block only
    assert extract_code(REPLY, "fenced_or_whole") == "def fibonacci(n):\n    return n\n\nprint(fibonacci(3))"
    bare = "Sure.\ndef f(n):\n    m = n\n    return m\nThat returns n."
    # CLaaS's def-scan tests `line.strip()` for indentation, so it stops after the first body line
    assert extract_code(bare) == "def f(n):\n    m = n"
    assert extract_code(bare, "fenced_or_whole") == bare
    assert extract_code("no code at all") == ""


def test_claas_probe_checks():
    three, numbered, no_word = (p.check for p in CLAAS_PROBES)
    assert three.passes("Python is great. It reads well! Try it?", "")
    assert not three.passes("Python is great. It reads well. Try it. Now.", "")
    assert numbered.passes("\n".join(f"{i}. item" for i in range(1, 6)), "")
    assert numbered.passes("\n".join(f" {i}) item" for i in range(1, 6)), "")
    assert not numbered.passes("1. a\n2. b\n3. c\n4. d\n- e", "")
    assert not no_word.passes("A recursive Function calls itself.", "")
    assert not no_word.passes("It is dysfunctional.", "")  # CLaaS: a substring test
    assert no_word.passes("A procedure that calls itself.", "")


def test_ifeval_probes_from_lm_eval(tmp_path: Path):
    pytest.importorskip("lm_eval.tasks.ifeval.instructions_registry")
    probes = GeneralConfig(probes="extended").probe_list()
    by_id = {p.id: p.check for p in probes}
    assert by_id["no_commas"].passes("No commas here at all.", "")
    assert not by_id["no_commas"].passes("Sleep, eat, rest.", "")
    assert by_id["all_lowercase"].passes("all quiet on the path", "")
    assert not by_id["all_lowercase"].passes("All quiet", "")
    bad = tmp_path / "probes.yaml"
    bad.write_text("- {id: x, prompt: p, check: {kind: ifeval, instruction: 'no:such_thing'}}\n")
    with pytest.raises(ValidationError, match="unknown IFEval instruction 'no:such_thing'"):
        GeneralConfig(probes_file=bad)


def test_ifeval_without_the_extra_fails_at_validate(monkeypatch):
    """Stand-in: lm-eval is installed in the dev env, so its absence is produced by blocking the import."""
    monkeypatch.setitem(sys.modules, "lm_eval.tasks.ifeval", None)
    general.ifeval_registry.cache_clear()
    try:
        with pytest.raises(ValidationError, match=r"pip install 'ckpt-watch\[ifeval\]'"):
            GeneralConfig(probes="extended")
        assert len(GeneralConfig().probe_list()) == 3  # CLaaS's built-in probes need nothing
    finally:
        general.ifeval_registry.cache_clear()


def test_capability_ratio_like_claas():
    assert capability_ratio(0.25, {"score": 0.5}, is_base=False) == 0.5
    assert capability_ratio(0.25, {"score": 0.0}, is_base=False) == 1.0  # CLaaS: base 0 → 1.0
    assert capability_ratio(0.3, None, is_base=True) == 1.0
    assert math.isnan(capability_ratio(0.3, None, is_base=False))


def test_refuses_without_a_sandbox():
    cfg = GeneralConfig(sandbox=SandboxOptions(bwrap="/nonexistent/bwrap"))
    ckpt = Checkpoint.base("g")
    from ckpt_watch.core import AdapterHandle

    # the refusal comes before any generation: no engine is touched
    ctx = SuiteContext(engine=None, handle=AdapterHandle(ckpt, None), checkpoint=ckpt, run_name="g")
    res = asyncio.run(build_suite("general", cfg).run(ctx))
    assert res.status is ResultStatus.ERROR and "no sandbox" in res.error and "/nonexistent/bwrap" in res.error
    assert res.metrics == {}


@pytest.mark.slow
def test_real_run_on_smollm2(smollm2_path):
    engine = make_engine(smollm2_path, batch_size=4)
    cfg = GeneralConfig(max_tokens=160)
    base = run_suite(engine, "general", cfg, Checkpoint.base("g"))
    assert base.status is ResultStatus.OK, base.error
    coding = [s for s in base.samples if s["kind"] == "coding"]
    probes = [s for s in base.samples if s["kind"] == "probe"]
    assert len(coding) == 1 and len(probes) == 3
    rec = coding[0]
    # the figure comes from a real sandboxed run: its exit status, its id, and what each hidden test returned
    if rec["code"]:
        assert rec["sandbox"]["exit_status"] is not None and rec["sandbox"]["run_id"].startswith("ckpt-watch-sandbox-")
        assert [t["args"] for t in rec["tests"]] == [[0], [1], [10]]
        assert rec["passed"] == all(t["passed"] for t in rec["tests"])
    m = base.metrics
    assert m["coding_correct"] == float(rec["passed"])
    assert m["ifeval_pass_rate"] == pytest.approx(sum(p["passed"] for p in probes) / 3)
    assert m["score"] == pytest.approx(0.5 * m["coding_correct"] + 0.5 * m["ifeval_pass_rate"])
    assert m["capability_ratio"] == 1.0
