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


SUITE = "suites:\n  heldout_loss: {}\n"
BROKEN = {
    "empty": ("", "(top level)", "is empty"),
    "only a comment": ("# nothing yet\n", "(top level)", "is empty"),
    "a list": ("- base_model: x\n", "(top level)", "must be a YAML mapping"),
    "a scalar": ("smollm2\n", "(top level)", "must be a YAML mapping"),
    "watch null": (f"base_model: x\nwatch: null\n{SUITE}", "watch", "is null"),
    "engine null": (f"base_model: x\nengine: null\n{SUITE}", "engine", "is null"),
    "watch a list": (f"base_model: x\nwatch: [a]\n{SUITE}", "watch", "mapping"),
    "suites null": ("base_model: x\nsuites: null\n", "suites", "at least one suite"),
    "suites a list": ("base_model: x\nsuites: [heldout_loss]\n", "suites", "at least one suite"),
    "suite block a list": ("base_model: x\nsuites:\n  heldout_loss: [1, 2]\n", "suites.heldout_loss", "mapping"),
    "suite block a string": ("base_model: x\nsuites:\n  heldout_loss: fast\n", "suites.heldout_loss", "mapping"),
    "questions file a folder": ("base_model: x\nsuites:\n  alignment:\n    questions: .\n", "suites.alignment",
                                "cannot be read"),
}


@pytest.mark.parametrize("case", list(BROKEN), ids=list(BROKEN))
def test_malformed_config_is_exit_2_naming_the_path(case, tmp_path):
    from typer.testing import CliRunner

    from ckpt_watch.cli import app

    text, path, reason = BROKEN[case]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    runner = CliRunner()
    for args in (["validate", str(cfg)], ["run", "-c", str(cfg), "--watch", str(tmp_path / "d"), "--once"]):
        r = runner.invoke(app, args)
        assert isinstance(r.exception, SystemExit) and r.exit_code == 2, (args, r.output, r.exception)
        assert f"{path}: " in r.output and reason in r.output, (args, r.output)


def test_overrides_on_an_empty_or_null_config(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError) as exc:
        load_config(empty, {"watch.dir": "d"})
    assert exc.value.errors[0][0] == "(top level)" and "is empty" in exc.value.errors[0][1]
    null_watch = tmp_path / "w.yaml"
    null_watch.write_text(f"base_model: x\nwatch: null\n{SUITE}")
    with pytest.raises(ConfigError) as exc:
        load_config(null_watch, {"watch.dir": "d"})
    assert exc.value.errors == [("watch", "is null: give a mapping, or remove the key to use the defaults")]
    good = tmp_path / "g.yaml"
    good.write_text(f"base_model: x\n{SUITE}")
    assert str(load_config(good, {"watch.dir": "d"}).watch.dir) == "d"
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path, None)  # a folder, not a file
    assert exc.value.errors[0][0] == str(tmp_path) and "cannot be read" in exc.value.errors[0][1]
