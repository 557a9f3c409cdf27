"""Config validation: every example config validates; bad input names its field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ckpt_watch.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_validate(path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-used")
    monkeypatch.chdir(REPO)
    cfg = load_config(path)
    assert cfg.suites


def test_errors_carry_dotted_paths():
    with pytest.raises(ConfigError) as exc:
        parse_config({
            "base_model": "x",
            "watch": {"settle_seconds": -1},
            "engine": {"kind": "vllm"},
            "suites": {"arc": {"type": "arc_challenge", "n": 0, "bogus": 1}},
            "unknown_top": 3,
        })
    paths = {p for p, _ in exc.value.errors}
    assert "watch.settle_seconds" in paths
    assert "suites.arc.n" in paths
    assert "suites.arc.bogus" in paths
    assert "unknown_top" in paths
    assert "engine" in paths  # vllm needs url or launch
    with pytest.raises(ConfigError) as exc:
        parse_config({"base_model": "x", "watch": {"layout": "glob"}, "suites": {"heldout_loss": {}}})
    assert exc.value.errors == [("watch", "layout 'glob' needs 'pattern'")]
    with pytest.raises(ConfigError) as exc:
        parse_config({"base_model": "x", "watch": {"layout": "glob", "pattern": "c*", "step_regex": "(["},
                      "suites": {"heldout_loss": {}}})
    assert "step_regex does not compile" in exc.value.errors[0][1]


def test_unknown_suite_type_is_named():
    with pytest.raises(ConfigError) as exc:
        parse_config({"base_model": "x", "suites": {"foo": {}}})
    (path, reason), = exc.value.errors
    assert path == "suites.foo" and "foo" in reason


def test_env_interpolation(monkeypatch):
    monkeypatch.setenv("CKW_RESULTS", "/data/res")
    cfg = parse_config({"base_model": "x", "results_dir": "${CKW_RESULTS}", "run_name": "${CKW_RUN:-r1}",
                        "suites": {"heldout_loss": {}}})
    assert str(cfg.results_dir) == "/data/res" and cfg.run_name == "r1"
    monkeypatch.delenv("CKW_MISSING", raising=False)
    with pytest.raises(ConfigError) as exc:
        parse_config({"base_model": "${CKW_MISSING}", "suites": {"heldout_loss": {}}})
    assert exc.value.errors == [("base_model", "environment variable CKW_MISSING is not set")]


def test_validate_command_exit_codes(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base_model: x\nsuites:\n  arc_challenge:\n    n: -5\n    scoring: nope\n")
    r = subprocess.run([sys.executable, "-m", "ckpt_watch", "validate", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "suites.arc_challenge.n" in r.stderr and "suites.arc_challenge.scoring" in r.stderr
    good = tmp_path / "good.yaml"
    good.write_text("base_model: x\nsuites:\n  heldout_loss: {}\n")
    r = subprocess.run([sys.executable, "-m", "ckpt_watch", "validate", str(good)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "ckpt_watch", "validate", str(tmp_path / "none.yaml")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "not found" in r.stderr


def test_config_reference_matches_the_models():
    from ckpt_watch.reference import render

    committed = (REPO / "docs" / "config.md").read_text()
    assert committed.strip() == render().strip(), "regenerate: ckpt-watch config-reference > docs/config.md"
