"""JSON sink: the on-disk contract of DESIGN §2 (fields, layout, atomic writes, one line per
(step, suite) in metrics.jsonl even when a result is written twice, clear disk-full errors)."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path

import pytest

from ckpt_watch.core import Checkpoint, ResultStatus, SuiteResult, utcnow
from ckpt_watch.sinks import jsonfiles
from ckpt_watch.sinks.jsonfiles import JsonSink, SinkWriteError, read_metrics

CONTRACT = {"run", "step", "checkpoint", "suite", "status", "metrics", "error", "samples", "started_at",
            "finished_at", "n_scored", "n_unscored"}


def _strict_load(path: Path) -> dict:
    def refuse(const: str) -> None:
        raise AssertionError(f"{path} holds non-standard JSON constant {const}")

    return json.loads(path.read_text(), parse_constant=refuse)


def _ok(suite: str, step: int, **metrics: float) -> SuiteResult:
    return SuiteResult(suite=suite, step=step, status=ResultStatus.OK, metrics=dict(metrics),
                       samples=[{"prompt": "Q?", "answer": "A", "score": 1.0}], n_scored=1, n_unscored=0,
                       finished_at=utcnow())


@pytest.fixture
def sink(tmp_path: Path) -> JsonSink:
    s = JsonSink(tmp_path / "results")
    s.start("run1", {"engine": "hf", "base_model": "smollm2"})
    return s


def _ckpt(tmp_path: Path, step: int) -> Checkpoint:
    return Checkpoint(run="run1", step=step, path=tmp_path / f"checkpoint-{step}", adapter_dir=None)


def test_record_fields_and_layout(sink: JsonSink, tmp_path: Path) -> None:
    base, ck = Checkpoint.base("run1"), _ckpt(tmp_path, 40)
    sink.write(base, _ok("arc", 0, acc=0.25))
    sink.write(ck, _ok("arc", 40, acc=0.5, acc_norm=float("nan")))
    failed = SuiteResult.failure("leakage", 40, "vLLM refused the adapter: rank 128 > max_lora_rank 64")
    sink.write(ck, failed)

    run_dir = tmp_path / "results" / "run1"
    base_rec = _strict_load(run_dir / "step-0" / "arc.json")
    assert base_rec.keys() >= CONTRACT
    assert base_rec["step"] == 0 and base_rec["checkpoint"] == "base" and base_rec["run"] == "run1"
    assert base_rec["samples"] == [{"prompt": "Q?", "answer": "A", "score": 1.0}]

    rec = _strict_load(run_dir / "step-40" / "arc.json")
    assert rec["checkpoint"] == str(tmp_path / "checkpoint-40")
    assert rec["status"] == "ok" and rec["suite"] == "arc" and rec["n_scored"] == 1
    # NaN stays visible as null: strict JSON, and the metric is not silently missing.
    assert rec["metrics"] == {"acc": 0.5, "acc_norm": None}
    assert rec["started_at"] <= rec["finished_at"]

    err = _strict_load(run_dir / "step-40" / "leakage.json")
    assert err["status"] == "error" and "max_lora_rank" in err["error"] and err["metrics"] == {}

    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], x["suite"]) for x in lines] == [(0, "arc"), (40, "arc"), (40, "leakage")]
    assert all("samples" not in x for x in lines)
    assert lines[2]["status"] == "error" and lines[2]["error"] == err["error"]
    assert json.loads((run_dir / "params.json").read_text()) == {"base_model": "smollm2", "engine": "hf"}
    # Nothing half-written left behind; files get the usual mode, not mkstemp's 0600.
    assert not [p for p in run_dir.rglob("*.tmp")]
    assert (run_dir / "metrics.jsonl").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_rewrite_same_result_is_idempotent(sink: JsonSink, tmp_path: Path) -> None:
    ck = _ckpt(tmp_path, 10)
    first = _ok("arc", 10, acc=0.5)
    sink.write(ck, first)
    sink.write(ck, _ok("compliance", 10, no_emoji=1.0))
    index = tmp_path / "results" / "run1" / "metrics.jsonl"
    before = index.read_bytes()
    inode = index.stat().st_ino

    sink.write(ck, first)  # crash/restart before the ledger update: the daemon writes it again
    again = JsonSink(tmp_path / "results")  # and a fresh process does the same
    again.start("run1", {"engine": "hf", "base_model": "smollm2"})
    again.write(ck, first)
    assert index.read_bytes() == before
    assert index.stat().st_ino == inode  # not even rewritten

    # A re-evaluation of (step, suite) replaces its line: still exactly one line per (step, suite).
    redo = _ok("arc", 10, acc=0.75)
    again.write(ck, redo)
    rows = read_metrics(index)
    assert [(r["step"], r["suite"]) for r in rows] == [(10, "arc"), (10, "compliance")]
    assert rows[0]["metrics"] == {"acc": 0.75} and rows[0]["finished_at"] == redo.finished_at
    assert _strict_load(tmp_path / "results" / "run1" / "step-10" / "arc.json")["metrics"] == {"acc": 0.75}


def test_lines_sorted_by_step(sink: JsonSink, tmp_path: Path) -> None:
    for step in (30, 10, 20, 0):
        ck = Checkpoint.base("run1") if step == 0 else _ckpt(tmp_path, step)
        sink.write(ck, _ok("arc", step, acc=step / 100))
    rows = read_metrics(tmp_path / "results" / "run1" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 10, 20, 30]


def test_failed_replace_keeps_previous_file(sink: JsonSink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ck = _ckpt(tmp_path, 5)
    sink.write(ck, _ok("arc", 5, acc=0.1))
    run_dir = tmp_path / "results" / "run1"
    step_file, index = run_dir / "step-5" / "arc.json", run_dir / "metrics.jsonl"
    old_step, old_index = step_file.read_bytes(), index.read_bytes()

    def crash(src: str, dst: str) -> None:
        raise OSError(errno.EIO, "simulated crash during rename")

    monkeypatch.setattr(jsonfiles.os, "replace", crash)
    with pytest.raises(SinkWriteError) as info:
        sink.write(ck, _ok("arc", 5, acc=0.9))
    assert info.value.errno == errno.EIO and str(step_file) in str(info.value)
    assert step_file.read_bytes() == old_step and index.read_bytes() == old_index
    assert not list(run_dir.rglob("*.tmp"))


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full to produce a real ENOSPC")
def test_disk_full_raises_clear_error(sink: JsonSink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The temp file's data goes to /dev/full, so the kernel itself answers ENOSPC."""
    real_mkstemp = tempfile.mkstemp

    def full_mkstemp(*args: object, **kwargs: object) -> tuple[int, str]:
        fd, name = real_mkstemp(*args, **kwargs)  # type: ignore[call-overload]
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), name

    monkeypatch.setattr(jsonfiles.tempfile, "mkstemp", full_mkstemp)
    with pytest.raises(SinkWriteError) as info:
        sink.write(_ckpt(tmp_path, 7), _ok("arc", 7, acc=0.3))
    assert info.value.errno == errno.ENOSPC
    assert "disk full" in str(info.value)
    assert isinstance(info.value.__cause__, OSError)
    run_dir = tmp_path / "results" / "run1"
    assert not (run_dir / "step-7" / "arc.json").exists()
    assert not list(run_dir.rglob("*.tmp"))  # the temp file does not linger and fill the disk further


def test_write_before_start_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="start"):
        JsonSink(tmp_path).write(Checkpoint.base("r"), _ok("arc", 0, acc=1.0))


def test_bad_run_name_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        JsonSink(tmp_path).start("../escape", {})
