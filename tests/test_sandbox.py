"""The code sandbox against hostile programs: each is contained, scored as failed, and the
test process (the daemon's side) is unharmed. Real bubblewrap, real processes, real sockets."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from ckpt_watch.sandbox import Call, Sandbox, SandboxOptions, SandboxUnavailable, same_value
from ckpt_watch.suites.general import claas_coding_tasks, grade

REPO = Path(__file__).resolve().parents[1]
FIB = "    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n"


@pytest.fixture(scope="module")
def box() -> Sandbox:
    sandbox = Sandbox(SandboxOptions(timeout_s=4.0, cpu_s=3, memory_mb=256))
    try:
        sandbox.ensure()
    except SandboxUnavailable as exc:
        pytest.fail(f"no sandbox on this machine (setup installs bubblewrap): {exc}")
    return sandbox


def fib_task():
    task = claas_coding_tasks()[0]
    return task.model_copy(update={"builtins": "full"})


def score(box: Sandbox, code: str):
    """Grade `code` as CLaaS's fibonacci task: (passed, outcome)."""
    task = fib_task()
    outcome = box.run(code, [Call(task.function, t.args) for t in task.tests], builtins=task.builtins)
    return grade(task, outcome)[0], outcome


def leftovers(run_id: str) -> list[int]:
    """Processes anywhere on the machine still carrying the run's id in their argv."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if run_id.encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def test_reference_solution_passes_and_wrong_one_fails(box):
    passed, outcome = score(box, "def fibonacci(n):\n    '''Iterative.'''\n" + FIB)
    assert passed and outcome.exit_status == 0 and outcome.calls == [
        {"ok": True, "value": 0}, {"ok": True, "value": 1}, {"ok": True, "value": 55}]
    wrong, outcome = score(box, "def fibonacci(n):\n    return n\n")  # right for 0 and 1 only
    assert not wrong and [c["value"] for c in outcome.calls] == [0, 1, 10]


def test_claas_builtins_are_claas_only(box):
    code = "def fibonacci(n):\n    print(n)\n" + FIB
    full = box.run(code, [Call("fibonacci", [10])], builtins="full")
    claas = box.run(code, [Call("fibonacci", [10])], builtins="claas")
    assert full.calls == [{"ok": True, "value": 55}]
    assert claas.calls == [{"ok": False, "error": "NameError: name 'print' is not defined"}]


def test_fork_bomb_is_contained(box):
    passed, outcome = score(box, "import os\nwhile True:\n    os.fork()\ndef fibonacci(n):\n" + FIB)
    assert not passed
    assert outcome.wall_s < box.options.timeout_s + 2
    time.sleep(0.5)
    assert leftovers(outcome.run_id) == []  # the PID namespace took every child with it
    assert subprocess.run(["true"], check=False).returncode == 0  # this side can still fork


def test_busy_loop_is_killed(box):
    passed, outcome = score(box, "while True:\n    pass\ndef fibonacci(n):\n" + FIB)
    assert not passed and outcome.calls is None
    assert outcome.timed_out or outcome.signal in {"SIGXCPU", "SIGKILL"}
    assert outcome.wall_s < box.options.timeout_s + 2
    assert leftovers(outcome.run_id) == []


def test_ten_gigabytes_are_refused(box):
    passed, outcome = score(box, "blob = bytearray(10 * 1024 ** 3)\ndef fibonacci(n):\n" + FIB)
    assert not passed
    assert outcome.load_error == "MemoryError: " or outcome.calls is None


def test_writes_outside_the_workdir_do_not_land(box, tmp_path):
    targets = [tmp_path / "escape.txt", REPO / f"escape-{os.getpid()}.txt", Path("/usr/escape.txt")]
    code = (
        "def attempt(paths):\n    out = []\n    for p in paths:\n        try:\n"
        "            open(p, 'w').write('x')\n            out.append('written')\n"
        "        except OSError as exc:\n            out.append(type(exc).__name__)\n    return out\n"
    )
    outcome = box.run(code, [Call("attempt", [[str(t) for t in targets]])])
    seen = outcome.calls[0]["value"]
    assert "written" not in seen and len(seen) == 3
    assert not any(t.exists() for t in targets)
    # and as a graded answer: an answer that needs the escape scores as failed
    passed, _ = score(box, f"def fibonacci(n):\n    open({str(targets[0])!r}, 'w').write('x')\n" + FIB)
    assert not passed and not targets[0].exists()


def test_no_network_even_to_loopback(box):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(3.0)
    port = server.getsockname()[1]
    accepted: list[object] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            accepted.append(server.accept())

    waiter = threading.Thread(target=accept)
    waiter.start()
    code = (
        "import socket\ndef fibonacci(n):\n"
        f"    socket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'leak')\n" + FIB
    )
    passed, outcome = score(box, code)
    waiter.join()
    server.close()
    assert not passed and accepted == []
    assert "ConnectionRefusedError" in outcome.calls[0]["error"] or "OSError" in outcome.calls[0]["error"]


def test_home_secrets_and_environment_are_invisible(box, tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    key = home / ".ssh" / "id_rsa"
    key.write_text("SECRET-KEY-MATERIAL")
    key.chmod(0o600)
    (home / "secret.txt").write_text("SECRET-TOKEN")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-should-not-leak")
    code = (
        "import os\ndef attempt(paths):\n    out = {'env': dict(os.environ), 'uid': os.getuid(), 'read': []}\n"
        "    for p in paths:\n        try:\n            out['read'].append(open(os.path.expanduser(p)).read())\n"
        "        except OSError as exc:\n            out['read'].append(type(exc).__name__)\n    return out\n"
    )
    paths = ["~/.ssh/id_rsa", str(key), str(home / "secret.txt"), "/root/.ssh/id_rsa", "/etc/shadow"]
    seen = box.run(code, [Call("attempt", [paths])]).calls[0]["value"]
    assert all(not r.startswith("SECRET") for r in seen["read"]), seen["read"]
    assert set(seen["read"]) <= {"FileNotFoundError", "PermissionError"}
    assert "OPENAI_API_KEY" not in seen["env"] and seen["env"]["HOME"] == "/sandbox"
    if os.geteuid() == 0:
        assert seen["uid"] != 0  # root's sandbox runs as an unprivileged user
    passed, _ = score(box, f"def fibonacci(n):\n    assert open({str(key)!r}).read()\n" + FIB)
    assert not passed


def test_missing_bwrap_makes_the_sandbox_unavailable():
    box = Sandbox(SandboxOptions(bwrap="/nonexistent/bwrap"))
    with pytest.raises(SandboxUnavailable, match="not found"):
        box.run("def f():\n    return 1\n", [Call("f", [])])


def test_same_value_is_strict_about_types():
    assert same_value(55, 55) and same_value(55.0, 55) and same_value([1, [2]], [1, [2]])
    assert not same_value(True, 1) and not same_value("55", 55) and not same_value(None, 0)
    assert same_value({"a": 1}, {"a": 1}) and not same_value({"a": 1}, {"a": 1, "b": 2})
