"""A shared MLflow tracking server on a real database (issue 17.3): `mlflow server` with a
PostgreSQL backend store, two daemons (two runs) logging to it at once, and the server killed
and started again on the same port while they log. Afterwards every (step, metric) of each run
is in MLflow exactly once, at its step, with the value of that run's metrics.jsonl.

Everything is real: Debian's PostgreSQL (`initdb` + `pg_ctl` on loopback, in a temp dir, as an
unprivileged user when the test runs as root: PostgreSQL refuses to run as root), `mlflow server`
on it through psycopg2, and `python -m ckpt_watch run` twice with MLFLOW_TRACKING_URI set. The
database password reaches only the MLflow server, through libpq's PGPASSWORD (never argv); the
test checks that it shows up in no daemon log, MLflow param or tag, and not in the server's log.
See docs/mlflow_server.md.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.harness import (
    SUITES,
    DaemonProc,
    json_duplicates,
    metric_lines,
    mlflow_duplicates,
    mlflow_points,
    populate,
    wait_until,
    write_config,
)
from tests.test_sinks_mlflow import _free_port

pytestmark = pytest.mark.slow

EXPERIMENT = "shared-postgres"
RUNS = ("sweep-a", "sweep-b")
STEPS = (0, 2, 4, 6)
METRICS = ("nll", "ppl", "tokens")
KEYS = [f"{suite}/{m}" for suite in SUITES for m in METRICS]
DB_USER, DB_NAME = "ckpt", "mlflow"
RUN_AS = "nobody"  # PostgreSQL's server programs refuse root; any unprivileged account will do


def _pg_bin() -> Path | None:
    """Debian's PostgreSQL keeps initdb/pg_ctl/postgres under /usr/lib/postgresql/<major>/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent  # a link on PATH points into the bin dir
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(dirs[-1]).parent if dirs else None


class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1:<free port>, its data and socket in one temp dir
    (not under pytest's tmp root, which is 0700 to root: the server's user must reach it)."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="ckpt-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.password = secrets.token_urlsafe(18)
        self.root_user = os.geteuid() == 0
        if self.root_user:
            user = pwd.getpwnam(RUN_AS)
            os.chown(self.root, user.pw_uid, user.pw_gid)

    def _server_tool(self, tool: str, *args: str) -> None:
        prefix = ["runuser", "-u", RUN_AS, "--"] if self.root_user else []
        subprocess.run([*prefix, str(self.bindir / tool), *args], cwd=self.root, check=True,
                       capture_output=True, text=True, timeout=120)

    def start(self) -> None:
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        if self.root_user:
            user = pwd.getpwnam(RUN_AS)
            os.chown(pwfile, user.pw_uid, user.pw_gid)
        pwfile.chmod(0o600)
        self._server_tool("initdb", "-D", str(self.data), "-U", DB_USER, f"--pwfile={pwfile}", "-E", "UTF8",
                          "--auth-local=trust", "--auth-host=scram-sha-256")
        pwfile.unlink()
        self._server_tool("pg_ctl", "-D", str(self.data), "-l", str(self.root / "postgres.log"), "-w", "-t", "60",
                          "-o", f"-k {self.root} -p {self.port} -h 127.0.0.1", "start")
        subprocess.run([str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", DB_USER,
                        DB_NAME], env={**os.environ, "PGPASSWORD": self.password}, check=True,
                       capture_output=True, text=True, timeout=60)

    @property
    def uri(self) -> str:
        """The backend store URI without the password (the server gets it as PGPASSWORD); the driver
        is named: with SQLAlchemy 2.1 a bare postgresql:// means psycopg 3, not psycopg2."""
        return f"postgresql+psycopg2://{DB_USER}@127.0.0.1:{self.port}/{DB_NAME}"

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            try:
                self._server_tool("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
            except subprocess.CalledProcessError:
                pid = int((self.data / "postmaster.pid").read_text().split()[0])
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)


class PostgresMlflowServer:
    """`mlflow server --backend-store-uri postgresql://…` in its own process group; kill() is a
    crash (SIGKILL to the group), start() again keeps the port and the store."""

    def __init__(self, root: Path, pg: Postgres):
        self.root, self.pg, self.port = root, pg, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = 180.0) -> None:
        exe = Path(sys.executable).with_name("mlflow")
        cmd = [str(exe) if exe.exists() else "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", self.pg.uri,
               "--default-artifact-root", str(self.root / "art")]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no huey job workers: not needed here
        env["PGPASSWORD"] = self.pg.password  # libpq reads it: the password stays out of argv and the URI
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=self.root,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"mlflow server not healthy in {timeout:.0f} s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.fixture
def pg_mlflow(tmp_path: Path) -> Iterator[PostgresMlflowServer]:
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb): install Debian's postgresql package (.ci/run does)")
    pg = Postgres(bindir)
    server = PostgresMlflowServer(tmp_path / "mlflow-server", pg)
    try:
        pg.start()
        server.start()
        yield server
    finally:
        server.kill()
        pg.stop()


def _outbox(results: Path, run: str) -> tuple[int, int]:
    """(undelivered, refused) rows of the run's MLflow outbox."""
    with sqlite3.connect(results / run / "mlflow-outbox.sqlite") as db:
        pending = db.execute("SELECT count(*) FROM outbox WHERE sent_at IS NULL AND failed IS NULL").fetchone()[0]
        failed = db.execute("SELECT count(*) FROM outbox WHERE failed IS NOT NULL").fetchone()[0]
    return pending, failed


def _steps_in_mlflow(url: str, run: str) -> dict[str, list[int]]:
    from mlflow.exceptions import MlflowException

    try:
        return {k: [s for s, _, _ in v] for k, v in mlflow_points(url, EXPERIMENT, run).items()}
    except (AssertionError, MlflowException):  # no run yet, or the server is not answering
        return {}


def _all_delivered(url: str, results: dict[str, Path]) -> bool:
    return all(all(_steps_in_mlflow(url, run).get(k) == list(STEPS) for k in KEYS)
               and _outbox(results[run], run)[0] == 0 for run in RUNS)


def test_two_daemons_log_to_a_postgres_backed_mlflow_server_that_restarts(tmp_path, tiny_run, tiny_base, pg_mlflow):
    t_start = time.monotonic()
    url = pg_mlflow.url
    mlflow_cfg = f"mlflow: {{enabled: true, experiment: {EXPERIMENT}, flush_seconds: 0.5, log_samples: false}}"
    results = {run: tmp_path / f"results-{run}" for run in RUNS}
    watches = {run: tmp_path / f"watch-{run}" for run in RUNS}
    daemons: dict[str, DaemonProc] = {}
    try:
        for run in RUNS:
            watches[run].mkdir()
            cfg = write_config(tmp_path, tiny_base, watches[run], run=run, results=results[run], mlflow=mlflow_cfg,
                               name=f"{run}.yaml")  # no tracking_uri in the config: the daemon takes the env's
            daemons[run] = DaemonProc(cfg, env={"MLFLOW_TRACKING_URI": url})
        for run in RUNS:  # both daemons are up and logging: the base model's points are in MLflow
            wait_until(lambda r=run: all(_steps_in_mlflow(url, r).get(k) == [0] for k in KEYS), 180,
                       f"{run}'s step-0 points in MLflow", daemons[run])
        for run in RUNS:
            populate(tiny_run, watches[run], (2, 4, 6))
        # mid-run: the first checkpoint's results exist, the last ones are not evaluated yet
        wait_until(lambda: any((2, "quick") in {(m["step"], m["suite"]) for m in metric_lines(results[r], r)}
                               for r in RUNS), 120, "a step-2 result")
        pg_mlflow.kill()
        done_at_kill = {run: len(metric_lines(results[run], run)) for run in RUNS}
        try:
            wait_until(lambda: any(d.count(r"MLflow flush to .* failed \(points stay queued\)") for d in
                                   daemons.values()), 60, "a failed flush while the server is down")
        finally:
            pg_mlflow.start()
        wait_until(lambda: _all_delivered(url, results), 180, "every point of both runs in MLflow")
        time.sleep(1.5)  # a few more flush periods: nothing may arrive twice
        codes = {run: daemons[run].stop() for run in RUNS}
        logs = {run: daemons[run].output() for run in RUNS}
    finally:
        for d in daemons.values():
            d.close()
    wall = time.monotonic() - t_start
    print(f"two daemons, PostgreSQL-backed MLflow restarted once: {wall:.1f} s; "
          f"results at the kill: {done_at_kill} of {len(STEPS) * len(SUITES)} each")

    assert codes == {run: 0 for run in RUNS}, logs
    # the server was killed while the daemons still had results to write
    assert any(n < len(STEPS) * len(SUITES) for n in done_at_kill.values()), done_at_kill

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=url)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.data.tags["ckpt_watch.run_name"] for r in runs) == sorted(RUNS)  # two MLflow runs, no more

    for run in RUNS:
        lines = metric_lines(results[run], run)
        assert json_duplicates(results[run], run) == 0
        assert {(m["step"], m["suite"], m["status"]) for m in lines} == {(s, n, "ok") for s in STEPS for n in SUITES}
        points = mlflow_points(url, EXPERIMENT, run)
        assert mlflow_duplicates(points) == 0
        want = {f"{m['suite']}/{k}": [] for m in lines for k in METRICS}
        for m in sorted(lines, key=lambda m: m["step"]):
            for k in METRICS:
                want[f"{m['suite']}/{k}"].append((m["step"], m["metrics"][k]))
        got = {key: [(s, v) for s, v, _ in points[key]] for key in KEYS}
        assert got == want, run  # every (step, metric) once, at its step, with the run's own value
        assert _outbox(results[run], run) == (0, 0)

    # the database password stays with the MLflow server: not in argv, logs, params or tags
    password = pg_mlflow.pg.password
    for run in RUNS:
        assert password not in logs[run]
    for r in runs:
        assert all(password not in v for v in r.data.params.values())
        assert all(password not in v for v in r.data.tags.values())
    assert password not in pg_mlflow.log.read_text()
    assert password not in " ".join(pg_mlflow.proc.args)
