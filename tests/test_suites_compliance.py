"""Compliance suite on the real CLaaS preference files, through the real HF engine; and which
verifier code a preference file or a config may name (checked through `ckpt-watch validate`)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ckpt_watch.core import Checkpoint
from ckpt_watch.engines.base import apply_chat_template
from ckpt_watch.suites.compliance import ComplianceConfig, load_preference_file
from tests.conftest import CLAAS_DIR, make_adapter
from tests.suite_helpers import adapter_checkpoint, make_engine, run_suite

PREFS = ("concise", "identity", "no_emoji")


class FlakyVerifier:
    """A custom verifier that fails on every answer: its answers must be unscored, not 0."""

    def __call__(self, text: str) -> float:
        raise ConnectionError("verifier backend unreachable")


@pytest.fixture(scope="module")
def engine(smollm2_path):
    return make_engine(smollm2_path)


def _config(**kw) -> ComplianceConfig:
    return ComplianceConfig(
        files=sorted(CLAAS_DIR.glob("*.yaml")),
        preferences={"flaky": {"verifier": "tests.test_suites_compliance:FlakyVerifier",
                               "probe_prompts": ["Say hello.", "Say goodbye."]}},
        allow_custom_verifiers=True,
        max_tokens=40,
        temperature=0.0,
        probes_per_preference=None,  # every probe of the files (CLaaS's first-3 default: test_claas_parity)
        system_prompt=None,
        **kw,
    )


def _direct_sum_logprob(model, tok, messages, response: str) -> float:
    import torch

    prompt = apply_chat_template(tok, messages)
    cont = tok.encode(response, add_special_tokens=False)
    ids = prompt + cont
    with torch.inference_mode():
        logps = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return float(sum(logps[i - 1, ids[i]] for i in range(len(prompt), len(ids))))


@pytest.mark.slow
def test_compliance_on_claas_files(engine, smollm2_path, tmp_path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = _config()
    base = run_suite(engine, "compliance", cfg, Checkpoint.base("pref"))
    m = base.metrics
    for pref in PREFS:
        assert 0.0 <= m[pref] <= 1.0
        assert math.isfinite(m[f"margin/{pref}"])
        assert m[f"margin_delta/{pref}"] == 0.0
    # a verifier that fails leaves its answers unscored: no metric value, counted apart
    assert math.isnan(m["flaky"])
    assert base.n_unscored == 2 and base.n_scored == 30
    probes = [s for s in base.samples if s["kind"] == "probe"]
    assert len(probes) == 32
    assert all(s["error"] and "unreachable" in s["error"] for s in probes if s["preference"] == "flaky")
    # the compliance figure is the mean of the per-answer verifier scores
    for pref in PREFS:
        scores = [s["score"] for s in probes if s["preference"] == pref]
        assert len(scores) == 10 and m[pref] == pytest.approx(sum(scores) / 10)

    # margin = Σ log p(positive) − Σ log p(negative), responses scored after the templated prompt
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    for path in sorted(CLAAS_DIR.glob("*.yaml")):
        name, spec = load_preference_file(path)
        pair = spec.pairs[0]
        pos = _direct_sum_logprob(model, tok, pair.chat(), pair.positive)
        neg = _direct_sum_logprob(model, tok, pair.chat(), pair.negative)
        assert m[f"margin/{name}"] == pytest.approx(pos - neg, abs=5e-3)
        rec = next(s for s in base.samples if s["kind"] == "pair" and s["preference"] == name)
        assert rec["logprob_positive"] == pytest.approx(pos, abs=5e-3)

    # an adapter that changes the model: margins move and the change is taken from step 0
    adapter = make_adapter(smollm2_path, tmp_path / "noisy", seed=1, scale=0.02)
    res = run_suite(engine, "compliance", cfg, adapter_checkpoint("pref", 10, adapter), baseline=base)
    for pref in PREFS:
        delta = res.metrics[f"margin/{pref}"] - m[f"margin/{pref}"]
        assert res.metrics[f"margin_delta/{pref}"] == pytest.approx(delta)
    assert any(abs(res.metrics[f"margin_delta/{p}"]) > 1e-3 for p in PREFS)


# -- verifier resolution: data files name built-ins only, custom code only from the config --------

# a module whose import and whose instantiation each leave a marker file: proof of what ran
EVIL_MODULE = """
from pathlib import Path
Path({imported!r}).touch()

class Evil:
    def __init__(self):
        Path({instantiated!r}).touch()

    def __call__(self, text):
        Path({called!r}).touch()
        return 1.0
"""


def _claas_file(folder: Path, name: str, target: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(f"name: {name}\nverifier:\n  _target_: {target}\nprobe_prompts:\n  - 'touch {folder}/pwned'\n")
    return path


def _validate(tmp_path: Path, suites: str) -> subprocess.CompletedProcess:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"base_model: smollm2\nsuites:\n{suites}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    return subprocess.run([sys.executable, "-m", "ckpt_watch", "validate", "--no-judge-check", str(cfg)],
                          capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture
def evil(tmp_path: Path) -> dict[str, Path]:
    marks = {k: tmp_path / f"{k}.mark" for k in ("imported", "instantiated", "called")}
    (tmp_path / "evil_verifier_mod.py").write_text(EVIL_MODULE.format(**{k: str(v) for k, v in marks.items()}))
    return marks


def test_data_files_cannot_name_code(tmp_path: Path, evil: dict[str, Path]) -> None:
    files = {
        "system": _claas_file(tmp_path, "system", "os.system"),
        "system_colon": _claas_file(tmp_path, "system_colon", "os:system"),
        "exec": _claas_file(tmp_path, "exec", "builtins.exec"),
        "evil": _claas_file(tmp_path, "evil", "evil_verifier_mod.Evil"),
        # the CLaaS class name in someone else's module is not CLaaS
        "lookalike": _claas_file(tmp_path, "lookalike", "evil_verifier_mod.NoEmojiVerifier"),
    }
    ours = tmp_path / "ours.yaml"
    ours.write_text("name: ours\nverifier: 'os:system'\nprobe_prompts: ['rm -rf ~']\n")
    blocks = "".join(f"  c_{n}:\n    type: compliance\n    files: [{p}]\n" for n, p in {**files, "ours": ours}.items())
    r = _validate(tmp_path, blocks)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    for name in files:
        assert f"suites.c_{name}.files" in r.stderr
    assert r.stderr.count("verifier._target_") == len(files)  # the field, in each CLaaS file
    assert "suites.c_ours.files" in r.stderr and "ours.yaml: verifier" in r.stderr
    assert "allow_custom_verifiers" in r.stderr  # says where custom code may come from
    # nothing ran: not even an import of the named module
    assert not any(m.exists() for m in evil.values())
    assert not (tmp_path / "pwned").exists()


def test_custom_verifier_only_from_the_config_and_only_imported_by_validate(
    tmp_path: Path, evil: dict[str, Path]
) -> None:
    claas = " ".join(str(p) for p in sorted(CLAAS_DIR.glob("*.yaml")))
    inline = "    preferences:\n      mine:\n        verifier: 'evil_verifier_mod:Evil'\n        probe_prompts: [hi]\n"
    refused = _validate(tmp_path, f"  compliance:\n    files: [{claas.replace(' ', ', ')}]\n{inline}")
    assert refused.returncode == 2
    assert "suites.compliance.preferences.mine.verifier" in refused.stderr
    assert "allow_custom_verifiers: true" in refused.stderr
    assert not evil["imported"].exists()
    bad_forms = (
        "  c1:\n    type: compliance\n    allow_custom_verifiers: true\n    preferences:\n"
        "      p:\n        verifier: 'os:system'\n        probe_prompts: [hi]\n"
        "  c2:\n    type: compliance\n    allow_custom_verifiers: true\n    preferences:\n"
        "      p:\n        verifier: evil_verifier_mod.Evil\n        probe_prompts: [hi]\n"
    )
    r = _validate(tmp_path, bad_forms)
    assert r.returncode == 2
    assert "suites.c1.preferences.p.verifier" in r.stderr and "not a class" in r.stderr
    assert "suites.c2.preferences.p.verifier" in r.stderr and "module:Class" in r.stderr
    allowed = _validate(tmp_path, f"  compliance:\n    files: [{claas.replace(' ', ', ')}]\n"
                                  f"    allow_custom_verifiers: true\n{inline}")
    assert allowed.returncode == 0, allowed.stderr
    assert evil["imported"].exists()  # validate imports it (the class must exist) ...
    assert not evil["instantiated"].exists() and not evil["called"].exists()  # ... and nothing more


def test_claas_targets_resolve_to_builtins_without_import() -> None:
    from ckpt_watch.suites.compliance import BUILTIN_VERIFIERS, builtin_verifier

    for path in sorted(CLAAS_DIR.glob("*.yaml")):
        name, spec = load_preference_file(path)
        assert builtin_verifier(spec.verifier) is BUILTIN_VERIFIERS[name]
    assert builtin_verifier("claas.eval.verifiers.ConciseVerifier") is BUILTIN_VERIFIERS["concise"]
    assert builtin_verifier("IdentityVerifier") is BUILTIN_VERIFIERS["identity"]
    assert builtin_verifier("os.system") is None and builtin_verifier("x.NoEmojiVerifier") is None
