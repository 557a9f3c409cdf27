"""The managed vLLM server's launch command is checked before anything starts (issue 19).

Real interpreters throughout: the base interpreter this test suite's virtualenv links to (it has
no vllm), a real virtualenv made here, and `.venv-vllm` when the session has one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckpt_watch.config import LaunchConfig
from ckpt_watch.core import EngineError
from ckpt_watch.engines.preflight import (
    FIELD,
    VLLMPreflightError,
    check_vllm_command,
    check_vllm_python,
    vllm_interpreter,
)
from ckpt_watch.engines.vllm_server import ManagedServer
from tests.conftest import VLLM_PYTHON

BASE_PYTHON = Path(os.path.realpath(sys.executable))  # what a venv's bin/python resolves to: no vllm
API_SERVER = ["-m", "vllm.entrypoints.openai.api_server"]


def fake_venv_with_vllm(root: Path) -> Path:
    """A real virtualenv whose site-packages holds a stand-in `vllm` package (importable only
    through that venv's own bin/python, the very property a resolve()d path loses)."""
    subprocess.run([str(BASE_PYTHON), "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    site = next(root.glob("lib/python3*/site-packages"))
    (site / "vllm").mkdir()
    (site / "vllm" / "__init__.py").write_text("__version__ = 'stand-in'\n")
    return root / "bin" / "python"


def test_an_interpreter_without_vllm_is_refused_with_its_name_and_the_fix():
    t0 = time.monotonic()
    with pytest.raises(VLLMPreflightError) as exc:
        check_vllm_command([str(BASE_PYTHON), *API_SERVER])
    assert time.monotonic() - t0 < 30
    msg = str(exc.value)
    assert f"the interpreter {BASE_PYTHON} cannot import vllm (ModuleNotFoundError: No module named 'vllm')" in msg
    assert "virtualenv's bin/python as it is" in msg
    assert exc.value.field == FIELD == "engine.launch.command"
    assert isinstance(exc.value, EngineError)


def test_a_venv_python_is_used_as_given_not_resolved(tmp_path):
    python = fake_venv_with_vllm(tmp_path / "venv")
    assert python.is_symlink() and os.path.realpath(python) == str(BASE_PYTHON)
    check_vllm_command([str(python), *API_SERVER])  # imports the stand-in through the venv
    with pytest.raises(VLLMPreflightError, match="cannot import vllm"):
        check_vllm_command([str(python.resolve()), *API_SERVER])


def test_missing_interpreter_and_missing_vllm_executable(tmp_path):
    with pytest.raises(VLLMPreflightError, match=r"interpreter .*nope/bin/python .*does not exist"):
        check_vllm_command([str(tmp_path / "nope" / "bin" / "python"), *API_SERVER])
    with pytest.raises(VLLMPreflightError, match="the vllm executable vllm is not found on PATH"):
        check_vllm_command(["vllm", "serve"], env={"PATH": str(tmp_path)})
    with pytest.raises(VLLMPreflightError, match="empty"):
        check_vllm_command([])


def test_vllm_serve_checks_the_console_scripts_interpreter(tmp_path):
    python = fake_venv_with_vllm(tmp_path / "venv")
    script = tmp_path / "venv" / "bin" / "vllm"
    script.write_text(f"#!{python}\nimport sys\n")
    script.chmod(0o755)
    assert vllm_interpreter(["vllm", "serve"], env={"PATH": str(script.parent)}) == python
    check_vllm_command(["vllm", "serve"], env={"PATH": str(script.parent)})
    script.write_text(f"#!{BASE_PYTHON}\nimport sys\n")
    with pytest.raises(VLLMPreflightError, match=f"the interpreter {BASE_PYTHON} cannot import vllm"):
        check_vllm_command(["vllm", "serve"], env={"PATH": str(script.parent)})


def test_commands_it_does_not_understand_are_left_alone():
    assert vllm_interpreter([sys.executable, "-c", "print(1)"]) is None
    assert vllm_interpreter(["docker", "run", "vllm/vllm-openai"]) is None
    check_vllm_command([str(BASE_PYTHON), "-c", "import sys"])  # nothing to check, nothing raised


def test_managed_server_start_fails_fast_without_spawning(tmp_path):
    server = ManagedServer("some-model", LaunchConfig(command=[str(BASE_PYTHON), *API_SERVER]),
                           log_path=tmp_path / "vllm-server.log", max_lora_rank=8, max_logprobs=20)
    t0 = time.monotonic()
    with pytest.raises(EngineError, match=f"the interpreter {BASE_PYTHON} cannot import vllm"):
        server.start()
    assert time.monotonic() - t0 < 30
    assert server.pid is None and not (tmp_path / "vllm-server.log").exists()


@pytest.mark.slow
@pytest.mark.vllm
def test_the_sessions_vllm_interpreter_passes():
    if not VLLM_PYTHON.exists():
        pytest.skip(f"no vLLM virtualenv at {VLLM_PYTHON}: run scripts/setup.sh --with-vllm")
    check_vllm_python(VLLM_PYTHON)
