"""W&B sink in W&B's offline mode (no network): the runs it writes are read back with W&B's own
reader of its transaction log (`wandb leet inspect --json`, the installed package's tool), and
every point must be there once, at its step — logged out of order, across two processes, and
after a real failure of `wandb.init` (a run directory that cannot be created)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckpt_watch.app import Paths, build_sinks
from ckpt_watch.config import WandbConfig, load_config
from ckpt_watch.core import Checkpoint, ResultStatus, SuiteResult, utcnow
from ckpt_watch.sinks.wandb import WandbSink, run_id_for

pytest.importorskip("wandb")
STEP_METRIC = "train/global_step"
WANDB_CLI = Path(sys.executable).with_name("wandb")


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("WANDB_RUN_ID", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_API_KEY", "WANDB_DIR", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def _result(suite: str, step: int, **metrics: float) -> SuiteResult:
    return SuiteResult(suite=suite, step=step, status=ResultStatus.OK, metrics=dict(metrics), finished_at=utcnow())


def _ckpt(step: int) -> Checkpoint:
    return Checkpoint.base("r") if step == 0 else Checkpoint("r", step, Path(f"/x/checkpoint-{step}"), None)


def _sink(results: Path, wandb_dir: Path, run: str = "r1", background: bool = False, **cfg: object) -> WandbSink:
    sink = WandbSink(WandbConfig(enabled=True, project="cw-test", mode="offline", dir=wandb_dir, **cfg),  # type: ignore[arg-type]
                     results, background=background, close_timeout=60)
    sink.start(run, {"engine": "hf", "base_model": "tiny"})
    return sink


def read_back(wandb_dir: Path) -> tuple[set[str], list[tuple[str, int, float]], list[dict]]:
    """(run ids, [(key, step, value)] of every history record, metric definitions) of every
    transaction log under wandb_dir, read by W&B's own reader."""
    ids, points, metrics = set(), [], []
    for path in sorted(wandb_dir.rglob("*.wandb")):
        out = subprocess.run([str(WANDB_CLI), "leet", "inspect", "--json", str(path)], capture_output=True,
                             text=True, check=True, timeout=120).stdout
        for line in out.splitlines():
            rec = json.loads(line)
            if rec["type"] == "run":
                ids.add(rec["run"]["run_id"])
            elif rec["type"] == "metric":
                metrics.append(rec["metric"])
            elif rec["type"] == "history":
                item = rec["history"]["item"]
                points += [(k, int(item[STEP_METRIC]), float(v)) for k, v in item.items()
                           if not k.startswith("_") and k != STEP_METRIC]
    return ids, points, metrics


SECOND_PROCESS = """
import sys
from pathlib import Path
from tests.test_wandb_sink import _ckpt, _result, _sink
sink = _sink(Path(sys.argv[1]), Path(sys.argv[2]))
sink.write(_ckpt(30), _result("heldout_loss", 30, nll=1.5, ppl=4.5))
sink.close()
assert sink.counts() == {"pending": 0, "sent": 9, "failed": 0}, sink.counts()
"""


def test_out_of_order_steps_and_a_second_process_land_once_at_their_step(tmp_path: Path) -> None:
    results, wdir = tmp_path / "res", tmp_path / "wb"
    sink = _sink(results, wdir)
    # newest first, then backfill: W&B's own step only grows, the points carry their training step
    for step, nll in ((20, 2.0), (10, 2.5), (0, 3.0)):
        sink.write(_ckpt(step), _result("heldout_loss", step, nll=nll, ppl=nll * 3))
    sink.write(_ckpt(10), _result("heldout_loss.v2", 10, nll=2.25, loss=float("nan")))  # NaN: not a point
    sink.close()
    assert sink.counts() == {"pending": 0, "sent": 7, "failed": 0}
    # a second ckpt-watch process on the same run: resumes the same W&B run, re-sends nothing
    proc = subprocess.run([sys.executable, "-c", SECOND_PROCESS, str(results), str(wdir)], capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]

    ids, points, metrics = read_back(wdir)
    assert ids == {run_id_for("r1")}
    assert len(list(wdir.rglob("*.wandb"))) == 2  # one transaction log per process, one run id
    assert sorted(points) == sorted([
        ("heldout_loss/nll", 20, 2.0), ("heldout_loss/ppl", 20, 6.0),
        ("heldout_loss/nll", 10, 2.5), ("heldout_loss/ppl", 10, 7.5),
        ("heldout_loss/nll", 0, 3.0), ("heldout_loss/ppl", 0, 9.0),
        ("heldout_loss.v2/nll", 10, 2.25),
        ("heldout_loss/nll", 30, 1.5), ("heldout_loss/ppl", 30, 4.5),
    ])
    # the custom x-axis, declared by each process, so W&B plots every key against the training step
    assert {"glob_name": "*", "step_metric": STEP_METRIC} in [
        {k: m[k] for k in ("glob_name", "step_metric") if k in m} for m in metrics]


def test_outage_keeps_points_queued_then_delivers_them_once(tmp_path: Path) -> None:
    """A real failure of wandb.init: its run directory cannot be created (`<dir>/wandb` is a file).
    The points stay in the outbox; once the directory is usable the next flush delivers them."""
    results, wdir = tmp_path / "res", tmp_path / "wb"
    wdir.mkdir()
    (wdir / "wandb").write_text("in the way")
    sink = _sink(results, wdir, run="r2")
    sink.write(_ckpt(6), _result("arc", 6, acc=0.5, acc_norm=0.25))
    sink.write(_ckpt(2), _result("arc", 2, acc=0.75, acc_norm=0.5))
    report = sink.flush(timeout=60)
    assert report.sent == 0 and report.pending == 4
    assert report.error is not None and "NotADirectoryError" in report.error
    assert sink.last_error == report.error

    (wdir / "wandb").unlink()  # the outage is over
    report = sink.flush(timeout=60)
    assert (report.sent, report.pending, report.error) == (4, 0, None)
    sink.close()
    ids, points, _ = read_back(wdir)
    assert ids == {run_id_for("r2")}
    assert sorted(points) == [("arc/acc", 2, 0.75), ("arc/acc", 6, 0.5), ("arc/acc_norm", 2, 0.5),
                              ("arc/acc_norm", 6, 0.25)]


def test_attaches_to_the_trainers_run_from_wandb_run_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_RUN_ID", "trainer-run-7")
    wdir = tmp_path / "wb"
    sink = _sink(tmp_path / "res", wdir, run="r3", background=True)  # the daemon's way: the flusher thread
    assert sink.run_id == "trainer-run-7"
    sink.write(_ckpt(4), _result("heldout_loss", 4, nll=2.0))
    deadline = time.monotonic() + 120
    while sink.counts()["sent"] < 1:  # delivered by the background flusher, before close
        assert time.monotonic() < deadline, sink.last_error
        time.sleep(0.2)
    sink.close()
    ids, points, _ = read_back(wdir)
    assert ids == {"trainer-run-7"}
    assert points == [("heldout_loss/nll", 4, 2.0)]


def test_configured_from_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_ENTITY", "my-team")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"base_model: smollm2\nresults_dir: {tmp_path / 'res'}\nrun_name: r4\n"
                   "suites:\n  heldout_loss: {}\nmlflow:\n  enabled: false\n"
                   f"wandb:\n  enabled: true\n  project: from-config\n  mode: offline\n  dir: {tmp_path / 'wb'}\n")
    config = load_config(cfg)
    sinks = build_sinks(config, Paths.of(config))
    assert [s.name for s in sinks] == ["json", "wandb"]
    wb = sinks[1]
    assert isinstance(wb, WandbSink)
    assert (wb.project, wb.entity, wb.dir) == ("from-config", "my-team", (tmp_path / "wb").resolve())
    wb.start("r4", {})
    assert wb.run_id == run_id_for("r4") and wb.attach_run_id is None
    wb.close()  # nothing queued: no W&B run is started
    assert not (tmp_path / "wb").exists()
    # off by default: no W&B without the block
    cfg.write_text(f"base_model: smollm2\nresults_dir: {tmp_path / 'res'}\nrun_name: r4\n"
                   "suites:\n  heldout_loss: {}\nmlflow:\n  enabled: false\n")
    config = load_config(cfg)
    assert [s.name for s in build_sinks(config, Paths.of(config))] == ["json"]
