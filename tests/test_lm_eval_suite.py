"""The `lm_eval` suite: lm-eval's tasks through our engines, question by question against
our native arc_challenge suite and against lm-eval's own `hf` backend on the same weights.

lm-eval's side is built by lm-eval alone (its TaskManager on a task YAML, its HFLM with the
same PEFT adapter); ours goes through `ckpt_watch.suites.lm_eval` and a real engine.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from ckpt_watch.config import ConfigError, parse_config
from ckpt_watch.core import Checkpoint
from tests.conftest import ARC_FILE, REPO, make_adapter
from tests.suite_helpers import adapter_checkpoint, make_engine, run_suite

pytest.importorskip("lm_eval")

from ckpt_watch.suites.arc import ArcConfig
from ckpt_watch.suites.lm_eval import LmEvalConfig, flatten_metrics

TASKS_DIR = REPO / "ckpt_watch" / "data" / "lm_eval_tasks"
N_ARC = 200
# lm-eval's built-in arc_challenge, pointed at the local copy of its test split
ARC_OVERRIDES = {"arc_challenge": {
    "dataset_path": "json", "dataset_name": None, "training_split": None, "validation_split": None,
    "dataset_kwargs": {"data_files": {"test": str(ARC_FILE)}},
}}
# docs/arc_parity.md's local task: what a user of lm-eval alone writes
ARC_YAML = """task: arc_challenge_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def arc_ids(n: int = N_ARC) -> list[int]:
    """The questions: the fixed-seed subsample arc_challenge's n draws (seed 0)."""
    return sorted(random.Random(0).sample(range(1172), n))


def lmeval_hf(tasks: list, samples: dict | None, model_args: dict, task_manager) -> dict:
    """lm-eval's own `hf` backend, in process, on the same weights."""
    import lm_eval

    return lm_eval.simple_evaluate(model="hf", model_args={"dtype": "float32", "device": "cpu", **model_args},
                                   tasks=tasks, samples=samples, task_manager=task_manager, log_samples=True,
                                   bootstrap_iters=0)


def lmeval_arc(tmp_path: Path, model_args: dict, n: int = N_ARC) -> dict[int, dict]:
    from lm_eval.tasks import TaskManager

    task_dir = tmp_path / "lmeval_tasks"
    task_dir.mkdir(exist_ok=True)
    (task_dir / "arc_challenge_local.yaml").write_text(ARC_YAML.format(data=ARC_FILE))
    res = lmeval_hf(["arc_challenge_local"], {"arc_challenge_local": arc_ids(n)}, model_args,
                    TaskManager(include_path=str(task_dir), include_defaults=False))
    return {s["doc_id"]: s for s in res["samples"]["arc_challenge_local"]}


def compare_arc(ours, native, theirs: dict[int, dict], tol: float, n: int = N_ARC) -> dict[str, float]:
    """Question by question: predictions equal, per-choice log-likelihoods within tol. Returns
    the figures (differences in predictions, the largest log-likelihood gap)."""
    rows = [json.loads(x) for x in ARC_FILE.read_text().splitlines() if x.strip()]
    ids = arc_ids(n)
    mine = {s["doc_id"]: s for s in ours.samples}
    assert sorted(mine) == ids and [s["id"] for s in native.samples] == [rows[i]["id"] for i in ids]
    gap_native = gap_theirs = 0.0
    for i, nat in zip(ids, native.samples, strict=True):
        s, t = mine[i], theirs[i]
        labels = rows[i]["choices"]["label"]
        assert s["choices"] == [" " + c for c in rows[i]["choices"]["text"]]
        assert s["loglikelihoods"] == pytest.approx(nat["logprobs"], abs=tol)
        assert s["loglikelihoods"] == pytest.approx([r[0][0] for r in t["resps"]], abs=tol)
        gap_native = max(gap_native, *(abs(a - b) for a, b in zip(s["loglikelihoods"], nat["logprobs"], strict=True)))
        gap_theirs = max(gap_theirs, *(abs(a - b[0][0]) for a, b in zip(s["loglikelihoods"], t["resps"], strict=True)))
        gold = labels.index(rows[i]["answerKey"])
        assert s["metrics"]["acc"] == t["acc"] == float(labels.index(nat["pred"]) == gold), rows[i]["id"]
        assert s["metrics"]["acc_norm"] == t["acc_norm"] == float(labels.index(nat["pred_norm"]) == gold), rows[i]["id"]
    for metric in ("acc", "acc_norm"):
        assert ours.metrics[f"arc_challenge/{metric}"] == pytest.approx(native.metrics[metric], abs=1e-12)
        assert ours.metrics[f"arc_challenge/{metric}_stderr"] == pytest.approx(native.metrics[f"{metric}_stderr"])
    assert ours.metrics["arc_challenge/n"] == n == native.metrics["n"]
    return {"max_gap_native": gap_native, "max_gap_lmeval_hf": gap_theirs}


def arc_configs(n: int = N_ARC) -> tuple[LmEvalConfig, ArcConfig]:
    return (LmEvalConfig(tasks=["arc_challenge"], overrides=ARC_OVERRIDES, limit=n),
            ArcConfig(scoring="loglik", n=n, path=ARC_FILE))


@pytest.mark.slow
def test_arc_hf_engine_equals_native_suite_and_lmeval_hf(tiny_run, tiny_base, tmp_path):
    """ARC-C, 200 questions, the tiny Llama with a trained LoRA adapter (checkpoint-6) on the HF engine."""
    adapter = tiny_run / "checkpoint-6"
    ckpt = adapter_checkpoint("lm-eval", 6, adapter)
    engine = make_engine(tiny_base)
    ours_cfg, native_cfg = arc_configs()
    ours = run_suite(engine, "lm_eval", ours_cfg, ckpt)
    native = run_suite(engine, "arc_challenge", native_cfg, ckpt)
    base = run_suite(engine, "lm_eval", ours_cfg, Checkpoint.base("lm-eval"))
    theirs = lmeval_arc(tmp_path, {"pretrained": str(tiny_base), "peft": str(adapter), "batch_size": 16})
    figures = compare_arc(ours, native, theirs, tol=1e-4)
    print(f"ARC-C tiny+adapter: acc {ours.metrics['arc_challenge/acc']:.4f} acc_norm "
          f"{ours.metrics['arc_challenge/acc_norm']:.4f} {figures}")
    # the adapter was applied: the base model's log-likelihoods are not the adapter's
    assert [s["loglikelihoods"] for s in base.samples] != [s["loglikelihoods"] for s in ours.samples]


@pytest.mark.slow
def test_generate_and_rolling_tasks_equal_lmeval_hf(smollm2_path, monkeypatch):
    """Our two local tasks on SmolLM2: ckpt_arithmetic (generate_until, greedy, regex filter)
    gives lm-eval hf's responses and scores; ckpt_text_perplexity (loglikelihood_rolling over
    64-token windows) its log-likelihoods within float noise. Batch size 1 on both sides, so
    greedy decoding sees the same unpadded forward passes."""
    from lm_eval.tasks import TaskManager

    cfg = LmEvalConfig(tasks=[str(TASKS_DIR)], max_length=64, bootstrap_iters=0)
    ours = run_suite(make_engine(smollm2_path, batch_size=1), "lm_eval", cfg, Checkpoint.base("lm-eval"))
    # lm-eval alone resolves the YAMLs' relative data_files against the working directory
    monkeypatch.chdir(TASKS_DIR)
    res = lmeval_hf(["ckpt_arithmetic", "ckpt_text_perplexity"], None,
                    {"pretrained": str(smollm2_path), "batch_size": 1, "max_length": 64},
                    TaskManager(include_path=str(TASKS_DIR), include_defaults=False))
    expected = {k: v for k, v in flatten_metrics(res["results"]).items() if "_stderr" not in k}
    gen = [s for s in ours.samples if s["task"] == "ckpt_arithmetic"]
    theirs = {(s["doc_id"], s["filter"]): s for s in res["samples"]["ckpt_arithmetic"]}
    assert len(gen) == 24 and {(s["doc_id"], s["filter"]) for s in gen} == set(theirs)
    for s in gen:
        t = theirs[(s["doc_id"], s["filter"])]
        assert s["response"] == t["resps"][0][0] and s["filtered"] == t["filtered_resps"][0]
        assert s["metrics"]["exact_match"] == t["exact_match"]
    for name in ("ckpt_arithmetic/exact_match/first-number", "ckpt_arithmetic/exact_match/whole"):
        assert ours.metrics[name] == expected[name]
    assert 0 < ours.metrics["ckpt_arithmetic/exact_match/first-number"] < 1  # a score that can move
    ppl = {s["doc_id"]: s["loglikelihood"] for s in ours.samples if s["task"] == "ckpt_text_perplexity"}
    ref = {s["doc_id"]: s["resps"][0][0] for s in res["samples"]["ckpt_text_perplexity"]}
    assert sorted(ppl) == sorted(ref) == list(range(5))
    gap = max(abs(ppl[i] - ref[i]) for i in ppl)
    assert gap < 1e-3, gap
    for name in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        key = f"ckpt_text_perplexity/{name}"
        assert ours.metrics[key] == pytest.approx(expected[key], rel=1e-6)
    word = "ckpt_text_perplexity/word_perplexity"
    print(f"generate_until: {ours.metrics['ckpt_arithmetic/exact_match/first-number']:.4f} both; rolling: max "
          f"log-likelihood gap {gap:.2e}, word_perplexity {ours.metrics[word]:.4f} vs {expected[word]:.4f}")


N_ARC_VLLM = 20


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(1800)
def test_arc_vllm_engine_equals_native_suite_and_lmeval_hf(vllm_engine, vllm_loop, smollm2_path, tmp_path):
    """ARC-C, SmolLM2 float32 with a LoRA adapter, on the shared real vLLM CPU server. 20 questions
    (the seed-0 draw of 20), not 200: 200 through vLLM twice plus lm-eval hf on SmolLM2 took over
    15 min on the shared 2-core machine; the 200-question check runs on the HF engine above."""
    from ckpt_watch.suites.base import SuiteContext, build_suite

    adapter = make_adapter(smollm2_path, tmp_path / "adapter", scale=0.02, seed=16)
    ckpt = adapter_checkpoint("lm-eval-vllm", 1, adapter)
    ours_cfg, native_cfg = arc_configs(N_ARC_VLLM)

    async def run(name, cfg):
        handle = await vllm_engine.load(ckpt)
        try:
            ctx = SuiteContext(engine=vllm_engine, handle=handle, checkpoint=ckpt, run_name=ckpt.run)
            return await build_suite(name, cfg).run(ctx)
        finally:
            await vllm_engine.unload(handle)

    ours = vllm_loop.run_until_complete(run("lm_eval", ours_cfg))
    native = vllm_loop.run_until_complete(run("arc_challenge", native_cfg))
    theirs = lmeval_arc(tmp_path, {"pretrained": str(smollm2_path), "peft": str(adapter), "batch_size": 16},
                        N_ARC_VLLM)
    figures = compare_arc(ours, native, theirs, tol=2e-3, n=N_ARC_VLLM)
    print(f"ARC-C SmolLM2+adapter via vLLM: acc {ours.metrics['arc_challenge/acc']:.4f} acc_norm "
          f"{ours.metrics['arc_challenge/acc_norm']:.4f} {figures}")


# -- validation, hashing, the optional dependency (cheap) ----------------------------------------


def _validate(tmp_path: Path, suite: dict) -> subprocess.CompletedProcess:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps({"base_model": "smollm2", "suites": {"lm_eval": suite}}))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "ckpt_watch", "validate", str(cfg)], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)


def test_validate_fails_on_a_task_whose_data_cannot_be_loaded(tmp_path):
    task = tmp_path / "broken.yaml"
    task.write_text((TASKS_DIR / "arithmetic_gen.yaml").read_text().replace("task: ckpt_arithmetic", "task: broken")
                    .replace("arithmetic_gen.jsonl", "missing.jsonl"))
    r = _validate(tmp_path, {"tasks": [str(task)]})
    assert r.returncode == 2, r.stdout + r.stderr
    assert "suites.lm_eval" in r.stderr and "broken" in r.stderr and "missing.jsonl" in r.stderr
    # a name no index holds (checked on an empty index: lm-eval's full one takes ~20 s to build)
    from ckpt_watch.suites.lm_eval_tasks import TaskLoadError, _entries

    with pytest.raises(TaskLoadError, match=r"no_such_task.*not an lm-eval task"):
        _entries("no_such_task", {})
    r = _validate(tmp_path, {"tasks": [str(TASKS_DIR)], "limit": 3})
    assert r.returncode == 0, r.stdout + r.stderr


def test_suite_hash_follows_task_data_and_lmeval_version(tmp_path, monkeypatch):
    import lm_eval

    import ckpt_watch.suites.lm_eval as suite

    folder = tmp_path / "tasks"
    folder.mkdir()
    for name in ("arithmetic_gen.yaml", "arithmetic_gen.jsonl"):
        (folder / name).write_text((TASKS_DIR / name).read_text())
    first = LmEvalConfig(tasks=[str(folder)]).config_hash()
    assert LmEvalConfig(tasks=[str(folder)], every=100).config_hash() == first  # schedule only
    assert LmEvalConfig(tasks=[str(folder)], num_fewshot=2).config_hash() != first
    data = folder / "arithmetic_gen.jsonl"
    data.write_text(data.read_text().replace('"answer": "28"', '"answer": "29"'))
    suite._PREPARED.clear()
    edited = LmEvalConfig(tasks=[str(folder)]).config_hash()
    assert edited != first
    monkeypatch.setattr(lm_eval, "__version__", "0.0.1")
    suite._PREPARED.clear()
    assert LmEvalConfig(tasks=[str(folder)]).config_hash() not in (first, edited)


def test_missing_lm_eval_names_the_extra(tmp_path):
    """lm-eval made unimportable in a child process (sys.modules entry None): a stand-in for an
    install without the extra, which this environment (dev extra) always has."""
    code = ("import sys; sys.modules['lm_eval'] = None\n"
            "from ckpt_watch.config import parse_config, ConfigError\n"
            "try:\n"
            "    parse_config({'base_model': 'x', 'suites': {'lm_eval': {'tasks': ['arc_challenge']}}})\n"
            "except ConfigError as e:\n"
            "    print(e.errors)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert "suites.lm_eval" in r.stdout and "pip install 'ckpt-watch[lm-eval]'" in r.stdout, r.stdout + r.stderr
    # the rest of ckpt-watch works without it
    code = "import sys; sys.modules['lm_eval'] = None\nimport ckpt_watch.suites, ckpt_watch.cli; print('ok')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "ok"


def test_metric_names_carry_filters_only_when_there_are_several():
    flat = flatten_metrics({
        "gsm": {"alias": "gsm", "exact_match,strict": 0.5, "exact_match_stderr,strict": 0.1,
                "exact_match,flexible": 0.75, "exact_match_stderr,flexible": "N/A"},
        "arc": {"acc,none": 0.25, "acc_stderr,none": 0.01},
    })
    assert flat == {"gsm/exact_match/strict": 0.5, "gsm/exact_match_stderr/strict": 0.1,
                    "gsm/exact_match/flexible": 0.75, "arc/acc": 0.25, "arc/acc_stderr": 0.01}


def test_overrides_must_name_a_configured_task():
    with pytest.raises(ConfigError) as exc:
        parse_config({"base_model": "x", "suites": {"lm_eval": {
            "tasks": [str(TASKS_DIR / "arithmetic_gen.yaml")], "overrides": {"hellaswag": {"num_fewshot": 1}}}}})
    (path, reason), = exc.value.errors
    assert path == "suites.lm_eval" and "hellaswag" in reason


def test_suites_command_documents_lm_eval():
    r = subprocess.run([sys.executable, "-m", "ckpt_watch", "suites"], capture_output=True, text=True,
                       env={**os.environ, "COLUMNS": "200"}, timeout=120)
    assert r.returncode == 0
    listing = r.stdout[r.stdout.index("lm_eval:"):]
    for option in ("tasks", "overrides", "num_fewshot", "limit", "batch_size", "apply_chat_template",
                   "system_instruction", "gen_kwargs"):
        assert f"│ {option} " in listing, option
