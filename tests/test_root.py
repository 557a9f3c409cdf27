"""`watch.root`: one daemon, one engine, every run of a folder of runs (issue 17.1).

Real parts: the tiny-Llama LoRA checkpoints of a real HF Trainer run (`tiny_run`) copied into
several run folders, or three real trainings started at different times; the HF engine; the
JSON results, the SQLite ledger and a real MLflow store; `ckpt-watch status` and `report`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckpt_watch.config import default_run_name
from tests.conftest import run_trainer
from tests.faults.harness import DaemonProc, ledger_rows, mlflow_duplicates, mlflow_points, wait_until

SUITES = "suites:\n  heldout_loss: {max_texts: 2}\n"


def root_config(tmp: Path, base: Path, root: Path, *, extra: str = "", rescan: float = 2) -> Path:
    cfg = tmp / "cfg.yaml"
    cfg.write_text(f"""
base_model: {base}
results_dir: {tmp / "results"}
watch: {{root: {root}, settle_seconds: 0.3, rescan_seconds: {rescan}, poll_interval: 0.5}}
engine: {{kind: hf}}
{SUITES}
mlflow: {{enabled: true, tracking_uri: 'sqlite:///{tmp / "mlflow.db"}', experiment: root, flush_seconds: 0.5}}
daemon: {{drain_seconds: 30}}
{extra}
""")
    return cfg


def copy_run(src: Path, dest: Path, steps: tuple[int, ...] = (2, 4, 6)) -> Path:
    dest.mkdir(parents=True)
    for step in steps:
        shutil.copytree(src / f"checkpoint-{step}", dest / f"checkpoint-{step}")
    return dest


def done_evals(results: Path) -> list[tuple[str, int, str]]:
    return sorted(ledger_rows(results, "SELECT run, step, suite FROM evals WHERE state='done'"))


def evaluation_order(results: Path, runs: list[str]) -> list[tuple[str, str, str, int]]:
    """(started_at, finished_at, run, step) of every result written, in the order evaluations began."""
    out = []
    for run in runs:
        for path in (results / run).glob("step-*/heldout_loss.json"):
            data = json.loads(path.read_text())
            assert data["status"] == "ok", data.get("error")
            out.append((data["started_at"], data["finished_at"], data["run"], data["step"]))
    return sorted(out)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ckpt_watch", *args], capture_output=True, text=True, timeout=300)


def test_root_once_round_robin_refuses_another_base(tmp_path: Path, tiny_run: Path, tiny_base: Path) -> None:
    """Three finished runs and one trained on another base model, `run --once --root`: each run's
    checkpoints exactly once, taken round-robin (a, b, c, a, b, c…; newest first within a run), one
    MLflow run each; the fourth run refused with the reason `status` shows; hidden folders ignored."""
    root = tmp_path / "sweep"
    folders = [copy_run(tiny_run, root / name) for name in ("lr-1e-3", "lr-2e-3", "lr-5e-3")]
    other = copy_run(tiny_run, root / "other-base", steps=(2,))
    adapter_cfg = other / "checkpoint-2" / "adapter_config.json"
    data = json.loads(adapter_cfg.read_text())
    data["base_model_name_or_path"] = "meta-llama/Llama-3.1-8B"  # stands for a run of another base model
    adapter_cfg.write_text(json.dumps(data))
    (root / ".cache").mkdir()
    shutil.copytree(tiny_run / "checkpoint-2", root / ".cache" / "checkpoint-2")
    (root / "notes").mkdir()  # no checkpoint: not a run
    half = root / "starting" / "checkpoint-2"  # a save under way: no adapter_config.json yet, not a run yet
    half.mkdir(parents=True)
    shutil.copy(tiny_run / "checkpoint-2" / "adapter_model.safetensors", half)
    cfg = root_config(tmp_path, tiny_base, root)
    results = tmp_path / "results"

    r = cli("run", "-c", str(cfg), "--once")
    assert r.returncode == 0, r.stderr[-3000:]
    names = [default_run_name(f) for f in folders]
    assert done_evals(results) == sorted((n, s, "heldout_loss") for n in names for s in (0, 2, 4, 6))
    order = [(run, step) for _, _, run, step in evaluation_order(results, names)]
    assert order == [(n, s) for s in (0, 6, 4, 2) for n in names], order  # round-robin, newest first
    # one base model on one engine: evaluated once (by the first run), the others share that result
    base = [json.loads((results / n / "step-0" / "heldout_loss.json").read_text()) for n in names]
    assert "base_from" not in base[0]["info"]
    assert [b["info"]["base_from"] for b in base[1:]] == [names[0], names[0]]
    assert all(b["metrics"] == base[0]["metrics"] and b["run"] == n for b, n in zip(base, names, strict=True))
    for n in names:
        points = mlflow_points(f"sqlite:///{tmp_path / 'mlflow.db'}", "root", n)
        assert sorted(s for s, _, _ in points["heldout_loss/nll"]) == [0, 2, 4, 6]
        assert mlflow_duplicates(points) == 0
    assert "meta-llama/Llama-3.1-8B" in r.stderr and "not evaluated" in r.stderr

    status = cli("status", "-c", str(cfg), "--json")
    assert status.returncode == 0, status.stderr
    runs = {run["run"]: run for run in json.loads(status.stdout)["runs"]}
    refused = default_run_name(other)
    assert set(runs) == {*names, refused}
    assert [c["state"] for c in runs[refused]["checkpoints"]["not_ready"]] == ["failed"]
    assert "Llama-3.1-8B" in runs[refused]["checkpoints"]["not_ready"][0]["error"]
    assert all(runs[n]["checkpoints"]["counts"]["ready"] == 3 and runs[n]["backlog"]["pending"] == 0 for n in names)

    report = cli("report", "--results", str(results), "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr
    page = (tmp_path / "report" / "index.html").read_text()
    assert all(n in page for n in names)

    again = cli("run", "-c", str(cfg), "--once")  # nothing due: nothing evaluated twice
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(done_evals(results)) == 12


def other_base(adapter_dir: Path) -> None:
    """Make a real adapter name another base model (stands for a run trained on one)."""
    cfg = adapter_dir / "adapter_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "base_model_name_or_path": "Qwen/Qwen2.5-7B"}))


def land(src: Path, dest: Path) -> None:
    """A checkpoint landing the way a trainer's rename does: written under tmp-*, then renamed."""
    tmp = dest.parent / f"tmp-{dest.name}"
    shutil.copytree(src, tmp)
    tmp.rename(dest)


def test_events_in_a_refused_run_do_not_stop_the_watcher(tmp_path: Path, tiny_run: Path, tiny_base: Path) -> None:
    """A live `run --root` with rescans 10 minutes apart: after checkpoints land in a refused run's
    folder (another base model), a checkpoint of a served run is still found by its events, at once."""
    root = tmp_path / "sweep"
    good = copy_run(tiny_run, root / "good", steps=(2,))
    other = copy_run(tiny_run, root / "other", steps=(2,))
    other_base(other / "checkpoint-2")
    cfg = root_config(tmp_path, tiny_base, root, rescan=600)
    results = tmp_path / "results"
    name = default_run_name(good)
    with DaemonProc(cfg) as daemon:
        wait_until(lambda: done_evals(results) == [(name, 0, "heldout_loss"), (name, 2, "heldout_loss")], 180,
                   "the served run's base and step 2", daemon)
        for step in (4, 6):
            land(tiny_run / f"checkpoint-{step}", other / f"checkpoint-{step}")
            other_base(other / f"checkpoint-{step}")
        time.sleep(1)
        land(tiny_run / "checkpoint-4", good / "checkpoint-4")
        wait_until(lambda: (name, 4, "heldout_loss") in done_evals(results), 60,
                   "step 4 of the served run, found by its events", daemon)
        assert daemon.stop() == 0
        assert "Exception in thread" not in daemon.output() and "Traceback" not in daemon.output(), daemon.output()
    assert all(run == name for run, _, _ in done_evals(results))


def test_root_config_errors(tmp_path: Path) -> None:
    cases = {  # config body → what the error names
        f"watch: {{dir: {tmp_path}, root: {tmp_path}}}": "not both",
        f"watch: {{root: {tmp_path}}}\nmlflow: {{run_id: abc}}": "mlflow.run_id",
        f"run_name: r1\nwatch: {{root: {tmp_path}}}": "run_name",
    }
    for i, (body, named) in enumerate(cases.items()):
        cfg = tmp_path / f"bad-{i}.yaml"
        cfg.write_text(f"base_model: x\n{body}\n{SUITES}")
        r = cli("validate", str(cfg))
        assert r.returncode == 2 and named in r.stderr, (body, r.stderr)
    plain = tmp_path / "plain.yaml"
    plain.write_text(f"base_model: x\n{SUITES}")
    r = cli("run", "-c", str(plain), "--watch", str(tmp_path), "--root", str(tmp_path), "--once")
    assert r.returncode == 2 and "not both" in r.stderr


@pytest.mark.slow
def test_three_trainings_one_daemon(tmp_path: Path, tiny_base: Path) -> None:
    """Three real trainings (the demo trainer on the tiny Llama) started at different times under one
    root, one live daemon with one HF engine: every checkpoint of every run evaluated exactly once,
    the shared base model once, no run waits for another to finish, one MLflow run per training run."""
    root = tmp_path / "sweep"
    root.mkdir()
    cfg = root_config(tmp_path, tiny_base, root)
    results = tmp_path / "results"
    trainers = []
    started = time.monotonic()
    with DaemonProc(cfg, "--root", str(root)) as daemon:
        for i, (name, lr) in enumerate((("run-a", 1e-3), ("run-b", 2e-3), ("run-c", 5e-3))):
            if i:
                time.sleep(8)  # started at different times
            trainers.append(run_trainer(root / name, max_steps=8, save_steps=2, step_sleep=1.5, lr=lr,
                                        background=True))
        for t in trainers:
            out, _ = t.communicate(timeout=900)
            assert t.returncode == 0, out[-3000:]
        names = [default_run_name(root / n) for n in ("run-a", "run-b", "run-c")]
        want = sorted((n, s, "heldout_loss") for n in names for s in (0, 2, 4, 6, 8))
        wait_until(lambda: done_evals(results) == want, 600, "every checkpoint of every run evaluated", daemon)
        assert daemon.stop() == 0
    wall = time.monotonic() - started
    rows = ledger_rows(results, "SELECT run, step, suite, state, attempts FROM evals")
    assert sorted(rows) == [(n, s, "heldout_loss", "done", 1) for n, s, _ in want]
    order = evaluation_order(results, names)
    assert len(order) == 15 and len({(r, s) for *_, r, s in order}) == 15  # each result written once
    # no run waits for another: each later run's first checkpoint is evaluated before the earlier
    # runs' last one (their trainings overlap)
    shared = [json.loads((results / n / "step-0" / "heldout_loss.json").read_text())["info"].get("base_from")
              for n in names]
    assert shared.count(None) == 1 and len({s for s in shared if s}) == 1, shared  # base model evaluated once
    first = {n: min(t for t, _, r, s in order if r == n and s > 0) for n in names}
    last = {n: max(t for t, _, r, s in order if r == n) for n in names}
    assert first[names[1]] < last[names[0]] and first[names[2]] < last[names[1]], order
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    dups = 0
    for n in names:
        points = mlflow_points(uri, "root", n)
        assert sorted(s for s, _, _ in points["heldout_loss/nll"]) == [0, 2, 4, 6, 8]
        dups += mlflow_duplicates(points)
    assert dups == 0
    print(f"ROOT FIGURES: runs 3, checkpoints {len(order) - 3} (+3 base), evaluations {len(rows)}, "
          f"duplicates {dups} (ledger, JSON, MLflow), wall {wall:.0f} s")


class _Due:
    """A run's due steps, newest first (what RunWatch.next_steps returns): pure scheduling logic."""

    def __init__(self, steps: list[int]):
        self.steps = steps

    def next_steps(self, k: int) -> list[int]:
        return self.steps[:k]


def test_work_is_taken_round_robin_across_runs(tmp_path: Path) -> None:
    from ckpt_watch.config import parse_config
    from ckpt_watch.daemon import Daemon

    config = parse_config({"base_model": "x", "results_dir": str(tmp_path), "watch": {"root": str(tmp_path)},
                           "engine": {"kind": "vllm", "url": "http://127.0.0.1:9/v1", "max_adapters_in_flight": 4},
                           "suites": {"heldout_loss": {}}})
    daemon = Daemon(config)
    a, b, c = _Due([0]), _Due([0]), _Due([7, 5])
    daemon.runs = [a, b, c]
    # one run's base model at a time (the others then share its result)
    assert [(daemon.runs.index(r), s) for r, s in daemon._next_work()] == [(0, 0), (2, 7), (2, 5)]
    daemon._rr = 0
    a.steps, b.steps, c.steps = [30, 20, 10], [], [7, 5]
    work = daemon._next_work()
    assert [(daemon.runs.index(r), s) for r, s in work] == [(0, 30), (2, 7), (0, 20), (2, 5)]
    a.steps, c.steps = [10], [3]
    b.steps = [9]
    # the next turn starts after the run served first last time (a): b, c, then a
    assert [(daemon.runs.index(r), s) for r, s in daemon._next_work()] == [(1, 9), (2, 3), (0, 10)]
