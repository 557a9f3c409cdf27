"""Before a managed vLLM server starts: can its launch command start vLLM at all?

A launch command that names an interpreter without vLLM (a venv's `bin/python` resolved to
the base interpreter it links to, a typo, a missing `--with-vllm` setup) would otherwise be
found out from the server's log after it exits — or, worse, after `startup_timeout`. This
runs `<python> -c "import vllm"` through the very interpreter the command names (used as
given: a virtualenv is found from the path Python is started by, so it must not be resolved)
and raises `VLLMPreflightError` naming the interpreter and how to fix it.

Commands it understands: `[python, ..., -m, vllm...]` and `[vllm, serve]` (the executable
must be on PATH; its shebang's interpreter is checked too). Anything else (a wrapper script,
`docker run ...`) is left to start and be judged by its own log.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from ckpt_watch.core import EngineError

log = logging.getLogger(__name__)

FIELD = "engine.launch.command"
PREFLIGHT_TIMEOUT = 60.0  # importing vllm (and torch) takes a few seconds; a busy CPU more
FIX = ("point engine.launch.command at an interpreter that has vLLM installed — a virtualenv's "
       "bin/python as it is, not the base interpreter its symlink resolves to — or install vllm there")

_ok: set[tuple[str, int]] = set()  # interpreters that imported vllm, by (path, mtime): checked once


class VLLMPreflightError(EngineError):
    """The launch command cannot start vLLM: no such interpreter/executable, or vllm does not import.

    `field` is the config path to report (`engine.launch.command`); `reason` the short cause
    without the fix, for callers that list several candidates.
    """

    def __init__(self, reason: str, fix: str = FIX):
        self.field = FIELD
        self.reason = reason
        super().__init__(f"{reason}; {fix}")


def _find_executable(name: str, env: Mapping[str, str] | None) -> Path | None:
    """`name` as Popen would find it: a path (relative to the cwd) if it has a slash, else on PATH."""
    if os.sep in name:
        p = Path(name).absolute()  # absolute, never resolve(): a venv's python is a symlink
        return p if p.is_file() and os.access(p, os.X_OK) else None
    path = (env or os.environ).get("PATH", os.defpath)
    found = shutil.which(name, path=path)
    return Path(found).absolute() if found else None


def _shebang_python(script: Path) -> Path | None:
    """The interpreter a console script's `#!` line names, when it is a direct path to a python."""
    try:
        with script.open("rb") as f:
            first = f.readline(512).decode(errors="replace")
    except OSError:
        return None
    if not first.startswith("#!"):
        return None
    parts = first[2:].split()
    if not parts or not Path(parts[0]).name.startswith("python"):
        return None  # `/usr/bin/env python3`, `/bin/sh` wrappers: the executable's presence is all we check
    return Path(parts[0])


def vllm_interpreter(command: Sequence[str], env: Mapping[str, str] | None = None) -> Path | None:
    """The Python interpreter that will import vllm for this launch command, or None when the
    command is not one this module understands. Raises VLLMPreflightError if the command's
    executable does not exist."""
    if not command:
        raise VLLMPreflightError("engine.launch.command is empty", fix="set it, e.g. [vllm, serve]")
    exe, args = command[0], list(command[1:])
    module = args[args.index("-m") + 1] if "-m" in args[:-1] else None
    if module is not None and (module == "vllm" or module.startswith("vllm.")):
        python = _find_executable(exe, env)
        if python is None:
            raise VLLMPreflightError(f"the interpreter {exe} in engine.launch.command does not exist "
                                     "or is not executable")
        return python
    if Path(exe).name == "vllm":
        script = _find_executable(exe, env)
        if script is None:
            where = "on PATH" if os.sep not in exe else "at that path"
            raise VLLMPreflightError(f"the vllm executable {exe} is not found {where}",
                                     fix="install vLLM (pip install vllm), put its bin folder on PATH, or "
                                         "launch it as [<venv>/bin/python, -m, vllm.entrypoints.openai.api_server]")
        return _shebang_python(script)
    return None


def check_vllm_python(python: str | Path, env: Mapping[str, str] | None = None,
                      timeout: float = PREFLIGHT_TIMEOUT) -> None:
    """Raise VLLMPreflightError unless `python -c "import vllm"` succeeds. A timeout is not a
    verdict (a loaded machine): it is logged and the launch goes ahead."""
    path = Path(python).absolute()
    try:
        key = (str(path), path.stat().st_mtime_ns)
    except OSError:
        raise VLLMPreflightError(f"the interpreter {path} does not exist") from None
    if key in _ok:
        return
    try:
        r = subprocess.run([str(path), "-c", "import vllm"], env=dict(env) if env is not None else None,
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        log.warning("%s took over %.0f s to import vllm; starting the server anyway", path, timeout)
        return
    except OSError as exc:
        raise VLLMPreflightError(f"the interpreter {path} cannot be run: {exc}") from None
    if r.returncode != 0:
        lines = [x for x in (r.stderr or r.stdout).strip().splitlines() if x.strip()]
        cause = lines[-1].strip() if lines else f"exit code {r.returncode}"
        raise VLLMPreflightError(f"the interpreter {path} cannot import vllm ({cause})")
    _ok.add(key)


def check_vllm_command(command: list[str], env: Mapping[str, str] | None = None,
                       timeout: float = PREFLIGHT_TIMEOUT) -> None:
    """Check that a managed-server launch command can start vLLM; raise VLLMPreflightError if not.

    `env` is the environment the server will get (PATH, PYTHONPATH...); default os.environ.
    """
    python = vllm_interpreter(command, env)
    if python is not None:
        check_vllm_python(python, env=env, timeout=timeout)
