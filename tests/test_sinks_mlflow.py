"""MLflow sink against a real SQLite store and a real `mlflow server` on loopback: every point at
its step exactly once, attach to a trainer's run, server down then up, crash between send and
mark, samples tables, params, tracking URI resolution."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from ckpt_watch.config import MlflowConfig
from ckpt_watch.core import Checkpoint, ResultStatus, SuiteResult, utcnow
from ckpt_watch.sinks import mlflow as mlflow_sink
from ckpt_watch.sinks.mlflow import RUN_NAME_TAG, MlflowSink, resolve_tracking_uri
from ckpt_watch.sinks.outbox import METRIC, TABLE, Outbox

PARAMS = {"engine": "hf", "base_model": "smollm2", "adapter.r": "8", "suite.arc.n": "50"}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The sink caps these in os.environ; monkeypatch restores them after each test.
    for name in (*mlflow_sink._HTTP_CAPS, "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` subprocess; stop() and start() again keep the port and the store."""

    def __init__(self, root: Path):
        self.root, self.port = root, _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = 180.0) -> None:
        exe = Path(sys.executable).with_name("mlflow")
        cmd = [str(exe) if exe.exists() else shutil.which("mlflow") or "mlflow", "server",
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{self.root / 'db.sqlite'}",
               "--default-artifact-root", str(self.root / "art")]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        # No background job workers (huey): seven extra processes this test does not need.
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        with open(self.root / "server.log", "ab") as logf:
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                         cwd=self.root, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy in {timeout}s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the server and its workers
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow_sqlite') / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).search_experiments()  # create the schema once for the module
    return uri


@pytest.fixture(params=["sqlite", pytest.param("server", marks=pytest.mark.slow)])
def tracking_uri(request: pytest.FixtureRequest) -> str:
    if request.param == "server":
        return request.getfixturevalue("server").uri
    return request.getfixturevalue("sqlite_uri")


def _result(suite: str, step: int, samples: int = 0, **metrics: float) -> SuiteResult:
    rows = [{"prompt": f"q{i}", "answer": f"a{i}", "score": i / 10} for i in range(samples)]
    return SuiteResult(suite=suite, step=step, status=ResultStatus.OK, metrics=dict(metrics), samples=rows,
                       n_scored=samples, finished_at=utcnow())


def _ckpt(step: int) -> Checkpoint:
    return Checkpoint.base("run") if step == 0 else Checkpoint("run", step, Path(f"/x/checkpoint-{step}"), None)


def _sink(uri: str, results: Path, run_name: str, *, background: bool = False, **cfg: object) -> MlflowSink:
    sink = MlflowSink(MlflowConfig(tracking_uri=uri, **cfg), results, background=background, close_timeout=20)  # type: ignore[arg-type]
    sink.start(run_name, PARAMS)
    return sink


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _table(client: MlflowClient, run_id: str, path: str, dst: Path) -> dict:
    return json.loads(Path(client.download_artifacts(run_id, path, str(dst))).read_text())


def _uid(request: pytest.FixtureRequest) -> str:
    return request.node.name.replace("[", "-").replace("]", "")


def test_every_point_once_at_its_step(tracking_uri: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    name = _uid(request)
    sink = _sink(tracking_uri, tmp_path, name, experiment=f"exp-{name}")
    expected: dict[str, list[tuple[int, float]]] = {"arc/acc": [], "leakage/rate/villain": []}
    for step in (0, 50, 100):
        arc = _result("arc", step, samples=3, acc=0.25 + step / 1000, nan_metric=float("nan"))
        leak = _result("leakage", step, **{"rate/villain": step / 200})
        for _ in range(2):  # the daemon re-writes a result after a crash: no second point
            sink.write(_ckpt(step), arc)
            sink.write(_ckpt(step), leak)
        expected["arc/acc"].append((step, arc.metrics["acc"]))
        expected["leakage/rate/villain"].append((step, leak.metrics["rate/villain"]))
    sink.write(_ckpt(100), SuiteResult.failure("alignment", 100, "judge unreachable"))
    report = sink.flush()
    assert report.error is None and report.pending == 0 and report.failed == 0
    assert sink.flush().sent == 0  # nothing left to send, nothing sent again

    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(sink.run_id)
    for key, points in expected.items():
        assert _history(client, run.info.run_id, key) == points
    assert "arc/nan_metric" not in run.data.metrics
    assert run.data.params == PARAMS
    assert run.data.tags[RUN_NAME_TAG] == name and run.info.run_name == name
    assert run.data.tags["ckpt_watch.error.alignment.step-100"] == "judge unreachable"
    table = _table(client, run.info.run_id, "samples/arc/step-50.json", tmp_path / "dl")
    assert table["columns"][:2] == ["step", "prompt"] and len(table["data"]) == 3
    assert {"path": "samples/arc/step-50.json", "type": "table"} in json.loads(run.data.tags["mlflow.loggedArtifacts"])
    sink.close()
    assert client.get_run(sink.run_id).info.status == "FINISHED"

    # Restart: the same run is reused (outbox cache), and is found by its tag even without the outbox.
    again = _sink(tracking_uri, tmp_path, name, experiment=f"exp-{name}")
    again.write(_ckpt(150), _result("arc", 150, acc=0.5))
    assert again.flush().error is None and again.run_id == sink.run_id
    fresh = _sink(tracking_uri, tmp_path / "other-results", name, experiment=f"exp-{name}")
    fresh.write(_ckpt(200), _result("arc", 200, acc=0.6))
    assert fresh.flush().error is None and fresh.run_id == sink.run_id
    assert [s for s, _ in _history(client, sink.run_id, "arc/acc")] == [0, 50, 100, 150, 200]
    assert client.get_run(sink.run_id).info.status == "RUNNING"
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_attach_to_trainer_run(tracking_uri: str, tmp_path: Path, request: pytest.FixtureRequest,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    name = _uid(request)
    # The trainer (HF MLflowCallback) created this run and logs its loss at global steps.
    trainer = MlflowClient(tracking_uri=tracking_uri)
    # (an explicit artifact location: a client-side SQLite store would otherwise use ./mlruns)
    exp_id = trainer.create_experiment(f"trainer-{name}", artifact_location=(tmp_path / "trainer-art").as_uri())
    run_id = trainer.create_run(exp_id, run_name="trainer").info.run_id
    trainer.log_batch(run_id, metrics=[Metric("train/loss", 2.0 - s / 100, int(time.time() * 1000), s)
                                       for s in (10, 20)], params=[])
    trainer.log_param(run_id, "engine", "trainer-owned")  # a clash our prefix avoids

    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    sink = _sink(tracking_uri, tmp_path, name, experiment=f"unused-{name}")
    for step in (10, 20):
        sink.write(_ckpt(step), _result("arc", step, samples=2, acc=step / 100))
    assert sink.flush().error is None
    assert sink.run_id == run_id
    run = trainer.get_run(run_id)
    assert _history(trainer, run_id, "arc/acc") == [(10, 0.1), (20, 0.2)]
    assert [s for s, _ in _history(trainer, run_id, "train/loss")] == [10, 20]
    assert run.data.params["engine"] == "trainer-owned" and run.data.params["ckpt_watch.engine"] == "hf"
    assert trainer.get_experiment_by_name(f"unused-{name}") is None  # no second run anywhere
    sink.close()
    assert trainer.get_run(run_id).info.status == "RUNNING"  # the trainer's run is the trainer's to end

    # The config's run_id works the same way (and wins over the environment).
    monkeypatch.setenv("MLFLOW_RUN_ID", "0" * 32)
    cfg_sink = _sink(tracking_uri, tmp_path / "cfg", name, run_id=run_id)
    cfg_sink.write(_ckpt(30), _result("arc", 30, acc=0.3))
    assert cfg_sink.flush().error is None
    assert _history(trainer, run_id, "arc/acc") == [(10, 0.1), (20, 0.2), (30, 0.3)]


def test_attach_to_missing_run_keeps_points(tracking_uri: str, tmp_path: Path) -> None:
    sink = _sink(tracking_uri, tmp_path, "r", run_id="f" * 32)
    sink.write(_ckpt(5), _result("arc", 5, acc=0.5))
    report = sink.flush()
    assert report.error is not None and "f" * 32 in report.error
    assert report.pending >= 1  # nothing dropped: fix the run id and restart


def test_crash_between_send_and_mark_sends_nothing_twice(tracking_uri: str, tmp_path: Path,
                                                         request: pytest.FixtureRequest,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    name = _uid(request)
    real_mark_sent = Outbox.mark_sent

    def crash_on(kind: str):  # the process dies after MLflow accepted the request, before the commit
        def mark_sent(self: Outbox, rows: list) -> None:
            if any(r.kind == kind for r in rows):
                raise sqlite3.OperationalError("simulated crash after send")
            real_mark_sent(self, rows)
        return mark_sent

    sink = _sink(tracking_uri, tmp_path, name, experiment=f"exp-{name}")
    for step in (1, 2, 3):
        sink.write(_ckpt(step), _result("arc", step, samples=2, acc=step / 10))
    with monkeypatch.context() as m:
        m.setattr(Outbox, "mark_sent", crash_on(METRIC))
        assert "simulated crash" in (sink.flush().error or "")

    # Restart 1: metrics are "maybe sent"; the sink reads them back instead of logging again.
    batches: list[int] = []
    real_log_batch = MlflowClient.log_batch

    def spy(self: MlflowClient, run_id: str, metrics=(), params=(), tags=(), **kw: object) -> None:
        batches.append(len(metrics))
        real_log_batch(self, run_id, metrics=metrics, params=params, tags=tags, **kw)

    monkeypatch.setattr(MlflowClient, "log_batch", spy)
    restarted = _sink(tracking_uri, tmp_path, name, experiment=f"exp-{name}")
    with monkeypatch.context() as m:
        m.setattr(Outbox, "mark_sent", crash_on(TABLE))
        assert "simulated crash" in (restarted.flush().error or "")
    assert sum(batches) == 0  # no metric was sent a second time
    # Restart 2: the table that landed is not appended again (log_table would duplicate its rows).
    final = _sink(tracking_uri, tmp_path, name, experiment=f"exp-{name}")
    report = final.flush()
    assert report.error is None and report.pending == 0

    client = MlflowClient(tracking_uri=tracking_uri)
    assert _history(client, final.run_id, "arc/acc") == [(1, 0.1), (2, 0.2), (3, 0.3)]
    for step in (1, 2, 3):
        table = _table(client, final.run_id, f"samples/arc/step-{step}.json", tmp_path / f"dl{step}")
        assert len(table["data"]) == 2
    paths = {a.path for a in client.list_artifacts(final.run_id, "samples/arc")}
    assert paths == {f"samples/arc/step-{s}.json" for s in (1, 2, 3)}


def test_re_evaluation_keeps_both_tables(tracking_uri: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    name = _uid(request)
    sink = _sink(tracking_uri, tmp_path, name, experiment=f"exp-{name}")
    sink.write(_ckpt(4), _result("arc", 4, samples=2, acc=0.1))
    assert sink.flush().error is None
    time.sleep(0.01)  # a later evaluation of the same step has a later finished_at
    sink.write(_ckpt(4), _result("arc", 4, samples=3, acc=0.2))
    assert sink.flush().error is None
    client = MlflowClient(tracking_uri=tracking_uri)
    assert len(_table(client, sink.run_id, "samples/arc/step-4.json", tmp_path / "a")["data"]) == 2
    assert len(_table(client, sink.run_id, "samples/arc/step-4-2.json", tmp_path / "b")["data"]) == 3


def test_tracking_uri_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(MlflowConfig(tracking_uri="http://127.0.0.1:1"), Path("res")) == "http://127.0.0.1:1"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////srv/mlflow.db")
    assert resolve_tracking_uri(MlflowConfig(), Path("res")) == "sqlite:////srv/mlflow.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_tracking_uri(MlflowConfig(), Path("res")) == f"sqlite:///{tmp_path / 'res' / 'mlflow.db'}"


def test_default_store_stays_under_results_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    sink = MlflowSink(MlflowConfig(), tmp_path / "results", background=False)
    sink.start("r", PARAMS)
    sink.write(_ckpt(0), _result("arc", 0, samples=1, acc=0.5))
    assert sink.flush().error is None
    assert list(cwd.iterdir()) == []  # neither ./mlflow.db nor ./mlruns
    assert (tmp_path / "results" / "mlflow.db").exists()
    assert list((tmp_path / "results" / "mlartifacts").rglob("step-0.json"))


def test_background_flusher_and_bounded_close_when_unreachable(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    sink = MlflowSink(MlflowConfig(tracking_uri=dead, flush_seconds=0.2), tmp_path, close_timeout=5)
    sink.start("r", PARAMS)
    t0 = time.monotonic()
    for step in (1, 2):
        sink.write(_ckpt(step), _result("arc", step, acc=0.1))
    assert time.monotonic() - t0 < 2  # write() never waits for MLflow
    t0 = time.monotonic()
    sink.close()
    assert time.monotonic() - t0 < 20
    assert sink.counts()["pending"] >= 2 and sink.last_error


@pytest.mark.slow
def test_server_down_then_up_every_point_once(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    srv = MlflowServer(tmp_path / "server")
    srv.start()
    try:
        sink = _sink(srv.uri, tmp_path / "results", "down-up", background=True, flush_seconds=0.3,
                     experiment="down-up")
        sink.write(_ckpt(0), _result("arc", 0, samples=2, acc=0.1))
        _wait(lambda: sink.counts()["pending"] == 0, 60)
        srv.stop()
        t0 = time.monotonic()
        for step in (10, 20, 30):
            sink.write(_ckpt(step), _result("arc", step, samples=2, acc=step / 100))
            sink.write(_ckpt(step), _result("leakage", step, **{"rate/villain": step / 300}))
        assert time.monotonic() - t0 < 2  # evaluation is not held up by the outage
        _wait(lambda: sink.last_error is not None, 30)  # the flusher tried (and marked rows attempted)
        assert sink.counts()["pending"] > 0
        srv.start()  # same port, same store
        _wait(lambda: sink.counts()["pending"] == 0, 90)
        sink.close()
        client = MlflowClient(tracking_uri=srv.uri)
        assert _history(client, sink.run_id, "arc/acc") == [(0, 0.1), (10, 0.1), (20, 0.2), (30, 0.3)]
        assert _history(client, sink.run_id, "leakage/rate/villain") == [(10, 10 / 300), (20, 20 / 300),
                                                                         (30, 30 / 300)]
        for step in (0, 10, 20, 30):
            assert len(_table(client, sink.run_id, f"samples/arc/step-{step}.json", tmp_path / f"d{step}")["data"]) == 2
        assert len(client.search_runs([client.get_experiment_by_name("down-up").experiment_id])) == 1
    finally:
        srv.stop()


@pytest.mark.slow
def test_locked_sqlite_store_is_retried(tmp_path: Path) -> None:
    """A trainer holding the shared SQLite store's write lock past MLflow's busy timeout (20 s)."""
    db = tmp_path / "shared.db"
    sink = _sink(f"sqlite:///{db}", tmp_path, "locked", experiment="locked")
    sink.write(_ckpt(0), _result("arc", 0, acc=0.1))
    assert sink.flush().error is None
    sink.write(_ckpt(5), _result("arc", 5, acc=0.5))
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        report = sink.flush()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert report.error is not None and "locked" in report.error and report.pending >= 1
    assert sink.flush().error is None
    assert _history(MlflowClient(tracking_uri=f"sqlite:///{db}"), sink.run_id, "arc/acc") == [(0, 0.1), (5, 0.5)]


def _wait(cond: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.2)
