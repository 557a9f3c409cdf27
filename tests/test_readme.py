"""Every command README.md shows is run by a test, so a README path cannot silently rot (issue 19).

`RUN_BY` maps each `ckpt-watch` subcommand README shows to the tests that run it; the static
test below reads README's shell blocks and inline code, and fails when README gains a
subcommand, a flag or a shell command that no test runs (checked against those tests' source).
Cheap commands run here; expensive ones (the demo, `run --once`) run once in their own tests.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ckpt_watch.cli import app
from tests.conftest import VLLM_PYTHON
from tests.test_demo import _trainers

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

# README's `ckpt-watch` subcommands → the tests that run them ("file::function")
RUN_BY: dict[str, list[str]] = {
    "demo": ["tests/conftest.py::demo_out",  # report (issue 14): the demo run, once per session
             "tests/test_demo.py::test_demo_trains_and_evaluates_every_checkpoint",
             "tests/test_readme.py::test_readme_demo_with_the_vllm_engine"],
    "validate": ["tests/test_readme.py::test_readme_presets_validate",
                 "tests/test_cli.py::test_validate_refuses_a_launch_command_whose_python_has_no_vllm"],
    "run": ["tests/test_cli.py::test_eval_status_and_run_once",
            "tests/test_exit_after_final.py::test_exits_once_final_checkpoint_is_evaluated"],
    "eval": ["tests/test_cli.py::test_eval_status_and_run_once"],
    "status": ["tests/test_cli.py::test_eval_status_and_run_once",  # --- status (issue 14) ---
               "tests/test_status.py::test_status_needs_no_judge_key_no_model_and_no_config",
               "tests/test_status.py::test_status_of_a_live_daemon_then_after_it_stopped"],
    "suites": ["tests/test_cli.py::test_suites_lists_every_suite_with_options"],
    "config-reference": ["tests/test_readme.py::test_config_reference_command_prints_the_docs"],
    # --- report (issue 14) ---
    "report": ["tests/test_report.py::test_report_cli_options_and_edge_cases",
               "tests/test_report.py::test_report_of_the_demo_run_in_headless_chromium"],
    # --- end report (issue 14) ---
}
# README's other shell commands (by their first words) → what exercises them
OTHER_COMMANDS: dict[str, str] = {
    "bash scripts/setup.sh": ".ci/run",  # CI runs README's set-up and test command on a fresh clone
    ".venv/bin/python -m pytest": ".ci/run",
    "pip install": "scripts/setup.sh",  # installs the package with pip (editable, same extras)
    "sudo cp systemd/ckpt-watch@.service": "tests/test_systemd.py",  # systemd-analyze verify of the unit
    "sudo cp configs/": "tests/test_readme.py",  # the presets validate here
    "sudo systemctl": "tests/test_systemd.py",  # root on a real host: the unit itself is verified
    "journalctl": "tests/test_systemd.py",
    "kubectl apply": "tests/test_deploy.py",  # schema-validated manifests; no cluster here
}
ALIASES = {"-c": "--config", "-w": "--watch", "-v": "--verbose"}
SEPARATORS = {"&&", "||", ";", "|", "&"}


def _shell_blocks(text: str) -> list[str]:
    return [m.group(2) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S)
            if m.group(1) in ("bash", "sh", "shell", "console")]


def _split(line: str) -> list[list[str]]:
    """One shell line → its simple commands (tokens), comments dropped."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    cmds, cur = [], []
    for tok in lex:
        if tok in SEPARATORS:
            cmds.append(cur)
            cur = []
        else:
            cur.append(tok)
    return [c for c in [*cmds, cur] if c]


@cache
def readme_commands() -> tuple[list[tuple[str, list[str]]], list[str]]:
    """(`ckpt-watch` commands as (source text, argv after the program), other shell commands)."""
    text = README.read_text()
    ours: list[tuple[str, list[str]]] = []
    others: list[str] = []
    for block in _shell_blocks(text):
        for line in block.splitlines():
            for cmd in _split(line):
                if Path(cmd[0]).name == "ckpt-watch":
                    ours.append((line.strip(), cmd[1:]))
                else:
                    others.append(" ".join(cmd))
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    for span in re.findall(r"`([^`\n]+)`", prose):
        if span.startswith("ckpt-watch "):
            ours.append((span, [t.strip("[]") for t in span.split()[1:] if t.strip("[]")]))
    return ours, others


def readme_presets() -> list[str]:
    return sorted(set(re.findall(r"configs/[\w.-]+\.yaml", README.read_text())))


def _test_strings(ref: str) -> set[str]:
    """Every string constant in the test function `ref` ("file::function")."""
    path, name = ref.split("::")
    tree = ast.parse((REPO / path).read_text())
    fn = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name), None)
    assert fn is not None, f"{ref} (named in RUN_BY) does not exist"
    return {n.value for n in ast.walk(fn) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def test_readme_commands_are_run_by_tests():
    ours, others = readme_commands()
    subs = {argv[0] for _, argv in ours if argv}
    assert {"demo", "validate", "run", "eval", "status", "suites", "config-reference"} <= subs  # the parser works
    for text, argv in ours:
        if not argv:
            continue
        sub, rest = argv[0], argv[1:]
        assert sub in RUN_BY, f"README shows `{text}` but no test runs `ckpt-watch {sub}`: add one to RUN_BY"
        strings = set().union(*(_test_strings(ref) for ref in RUN_BY[sub]))
        assert sub in strings, f"none of {RUN_BY[sub]} runs `ckpt-watch {sub}`"
        for i, tok in enumerate(rest):
            if tok.startswith("-"):
                names = {tok, ALIASES.get(tok, tok), *(k for k, v in ALIASES.items() if v == tok)}
                assert names & strings, f"README shows `{text}`: no test in RUN_BY[{sub!r}] passes {tok}"
                value = rest[i + 1] if i + 1 < len(rest) else ""
                if re.fullmatch(r"[a-z0-9]+", value):  # a literal option value such as `--engine vllm`
                    assert value in strings, f"README shows `{text}`: no test passes {tok} {value}"
            elif "/" in tok and tok.split("/")[0] in {"configs", "systemd", "scripts", "docs"}:
                assert (REPO / tok).exists(), f"README's `{text}` names {tok}, which does not exist"
    for cmd in others:
        covered = [k for k in OTHER_COMMANDS if cmd.startswith(k)]
        assert covered, f"README shows `{cmd}`: say in OTHER_COMMANDS which test or script exercises it"
        assert (REPO / OTHER_COMMANDS[covered[0]]).exists()
    ci = (REPO / ".ci" / "run").read_text()
    assert "bash scripts/setup.sh --with-vllm && .venv/bin/python -m pytest" in ci  # README's command 2, verbatim


def test_the_readme_parser_sees_what_readme_shows():
    ours, others = readme_commands()
    shown = {" ".join(argv) for _, argv in ours}
    assert "demo --engine vllm --steps 10 --save-steps 10" in shown
    assert "validate configs/persona_leakage.yaml" in shown
    assert "run -c CONFIG --watch DIR --once --force" in shown
    assert any(c.startswith("sudo systemctl") for c in others)


@pytest.mark.parametrize("preset", readme_presets())
def test_readme_presets_validate(preset, tmp_path):
    """`ckpt-watch validate` on every preset README names, from the checkout as README runs it. The
    GPU-pod preset launches `vllm serve`: on a machine without it, exit 2 naming the field."""
    runner = CliRunner()
    env = {"OPENAI_API_KEY": "sk-test-not-used", "PATH": str(tmp_path)}  # no `vllm` on this PATH
    cwd = Path.cwd()
    os.chdir(REPO)
    try:
        r = runner.invoke(app, ["validate", "--no-judge-check", preset], env=env)
        if "launch" in (REPO / preset).read_text():
            assert r.exit_code == 2, r.output
            assert "engine.launch.command" in r.output and "vllm executable vllm is not found on PATH" in r.output
            r = runner.invoke(app, ["validate", "--no-judge-check", "--no-engine-check", preset], env=env)
        assert r.exit_code == 0, r.output
        assert r.output.startswith(f"ok: {preset}")
        if preset == "configs/persona_leakage.yaml":  # README's exact command
            r = runner.invoke(app, ["validate", preset], env=env)
            assert r.exit_code == 0 and "ok:" in r.output, r.output
    finally:
        os.chdir(cwd)


def test_config_reference_command_prints_the_docs():
    """The command prints the generated reference (docs/config.md's freshness: test_config.py)."""
    from ckpt_watch.reference import render

    r = CliRunner().invoke(app, ["config-reference"])
    assert r.exit_code == 0
    assert r.output.startswith("# Configuration") and r.output.strip() == render().strip()


def _ckpt_watch() -> list[str]:
    script = Path(sys.executable).with_name("ckpt-watch")  # README runs .venv/bin/ckpt-watch
    return [str(script)] if script.exists() else [sys.executable, "-m", "ckpt_watch"]


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(1800)  # training + a vLLM server start + evaluations: 655 s on a loaded 2-core box
def test_readme_demo_with_the_vllm_engine(tmp_path):
    """README's `ckpt-watch demo --engine vllm`, kept short, run from outside the checkout: the
    server starts from the session's vLLM install used as given (not resolved), the daemon's log
    has no per-request HTTP lines, and nothing is left running."""
    if not VLLM_PYTHON.exists():
        pytest.skip(f"no vLLM virtualenv at {VLLM_PYTHON}: run scripts/setup.sh --with-vllm "
                    "or set CKPT_WATCH_VLLM_PYTHON")
    out = tmp_path / "demo-vllm"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.monotonic()
    r = subprocess.run([*_ckpt_watch(), "demo", "--engine", "vllm", "--steps", "10", "--save-steps", "10",
                        "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    print(f"demo --engine vllm: {time.monotonic() - t0:.0f} s\n{r.stdout}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "metrics by training step" in r.stdout
    assert re.search(r"│\s+0 │.*\n.*│\s+10 │", r.stdout), r.stdout
    lines = [json.loads(x) for x in (out / "results" / "demo-run" / "metrics.jsonl").read_text().splitlines()]
    assert {(m["step"], m["suite"], m["status"]) for m in lines} == {
        (s, n, "ok") for s in (0, 10) for n in ("leakage", "heldout_loss")}
    logged = r.stdout + r.stderr
    assert "HTTP/1.1 200" not in logged and "HTTP Request:" not in logged
    server_log = next(out.glob("results/**/vllm-server.log")).read_text()
    starts = re.findall(r"==== ckpt-watch: starting (\S+) -m vllm", server_log)
    assert starts and set(starts) == {str(VLLM_PYTHON.absolute())}
    assert _trainers(out) == []
