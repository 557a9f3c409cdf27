"""Footprint and scale: the watcher's RSS and idle CPU; rescan of 1,000 checkpoints; a 10,000-row ledger.

    .venv/bin/python bench/bench_footprint.py [--idle 30] [--repeats 3]

Footprint: `ckpt-watch run` daemons (subprocesses) idle on a quiet watch dir for `--idle`
seconds, sampled side by side over the same window: RSS (VmRSS / VmHWM from /proc/<pid>/status)
and CPU% (utime + stime from /proc/<pid>/stat over the window). Three daemons:

  watcher only, inotify    base: false, so no engine is ever started (the vLLM-engine case:
                           the model lives in the server process, not here)
  watcher only, polling    the same with the PollingObserver (1 s)
  HF engine loaded         in-process engine, after evaluating the base model (SmolLM2-135M held
                           in memory), then idle

Scale (bench_discovery.scale, median of --repeats): scan of a dir with 1,000 checkpoint
folders, inserting 10,000 evaluation rows, and picking the next step among 10,000 pending
rows — with Scheduler.next_step as it is now (SELECT DISTINCT step in SQL) and as it was
(loading every pending row), side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_discovery import SUITES, scale

from ckpt_watch.config import SchedulerConfig
from ckpt_watch.core import BASE_STEP
from ckpt_watch.ledger import EvalState, Ledger
from ckpt_watch.scheduler import Scheduler

CLK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK  # utime, stime


def memory_mib(pid: int) -> tuple[float, float]:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


def daemon_config(tmp: Path, name: str, *, polling: bool, base: bool) -> Path:
    watch = tmp / name / "run1"
    watch.mkdir(parents=True)
    cfg = tmp / name / "cfg.yaml"
    cfg.write_text(f"""
base_model: smollm2
results_dir: {tmp / name / "results"}
run_name: run1
watch:
  dir: {watch}
  polling: {str(polling).lower()}
  poll_interval: 1.0
scheduler:
  base: {str(base).lower()}
suites:
  heldout_loss: {{}}
mlflow:
  tracking_uri: sqlite:///{tmp / name / "results" / "mlflow.db"}
""")
    return cfg


def footprint(tmp: Path, idle: float) -> list[tuple[str, float, float, float]]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    specs = [("watcher only, inotify", False, False), ("watcher only, polling 1 s", True, False),
             ("HF engine loaded (SmolLM2), idle", False, True)]
    procs = []
    for name, polling, base in specs:
        cfg = daemon_config(tmp, name.split(",")[0].replace(" ", "-") + str(polling), polling=polling, base=base)
        log = (cfg.parent / "daemon.log").open("w")
        proc = subprocess.Popen([sys.executable, "-m", "ckpt_watch", "run", "-c", str(cfg)], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        procs.append((name, base, cfg, proc, log))
    try:
        deadline = time.monotonic() + 600
        for _name, base, cfg, proc, _log in procs:
            done = cfg.parent / "results" / "run1" / "step-0" / "heldout_loss.json"
            while not (done.exists() if base else "watching" in (cfg.parent / "daemon.log").read_text()):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"daemon did not settle:\n{(cfg.parent / 'daemon.log').read_text()[-3000:]}")
                time.sleep(0.5)
        time.sleep(5)  # let the last flush / snapshot clean-up finish
        before = {p.pid: (cpu_seconds(p.pid), time.monotonic()) for *_, p, _ in procs}
        time.sleep(idle)
        rows = []
        for name, _base, _cfg, proc, _log in procs:
            c0, t0 = before[proc.pid]
            cpu = (cpu_seconds(proc.pid) - c0) / (time.monotonic() - t0) * 100
            rss, hwm = memory_mib(proc.pid)
            rows.append((name, rss, hwm, cpu))
    finally:
        for *_, proc, _log in procs:
            proc.terminate()
        for *_, proc, log in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
    return rows


def old_next_step(sched: Scheduler, available: set[int]) -> int | None:
    """Scheduler.next_step before the SQL-side query: every pending row loaded and filtered here."""
    out: dict[int, list[str]] = {}
    for row in sched.ledger.evals(sched.run, EvalState.PENDING):
        s = sched.suites.get(row.suite)
        if s is not None and s.hash == row.suite_hash:
            out.setdefault(row.step, []).append(s.name)
    steps = [s for s in out if s in available]
    if not steps:
        return None
    return BASE_STEP if BASE_STEP in steps else max(steps)


def next_step_compare(tmp: Path, repeats: int) -> tuple[float, float, float]:
    ledger = Ledger(tmp / "cmp.sqlite")
    sched = Scheduler(ledger, "r", SUITES, SchedulerConfig())
    with ledger._tx() as db:  # bulk fill; insertion speed is measured by scale()
        now = "2026-01-01T00:00:00"
        db.executemany("INSERT INTO evals (run, step, suite, suite_hash, state, created_at, updated_at) "
                       "VALUES ('r', ?, 'heldout_loss', ?, 'pending', ?, ?)",
                       [(s, sched.suites["heldout_loss"].hash, now, now) for s in range(1, 10001)])
    avail = set(range(10001))
    new, old, pend = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        assert sched.next_step(avail) == 10000
        new.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        assert old_next_step(sched, avail) == 10000
        old.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        assert len(sched.pending()) == 10000
        pend.append(time.perf_counter() - t0)
    ledger.close()
    return statistics.median(new), statistics.median(old), statistics.median(pend)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--idle", type=float, default=30.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-footprint-") as d:
        tmp = Path(d)
        foot = footprint(tmp, args.idle)
        scales = []
        for i in range(args.repeats):
            (tmp / f"s{i}").mkdir()
            scales.append(scale(tmp / f"s{i}", tmp))
        new, old, pend = next_step_compare(tmp, args.repeats)
    t_scan, t_insert, t_next = (statistics.median(x) for x in zip(*scales, strict=True))
    load = os.getloadavg()
    print(f"\nFootprint: ckpt-watch daemons idle {args.idle:.0f} s on a quiet watch dir, sampled side by side; "
          f"load avg {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(f"{'daemon':<36}{'RSS MiB':>9}{'peak MiB':>10}{'idle CPU %':>12}")
    for name, rss, hwm, cpu in foot:
        print(f"{name:<36}{rss:>9.0f}{hwm:>10.0f}{cpu:>12.2f}")
    print(f"\nScale (median of {args.repeats})")
    print(f"scan of a dir with 1,000 checkpoint folders        {t_scan * 1000:9.1f} ms")
    print(f"ledger: insert 10,000 evaluation rows (one tx each) {t_insert * 1000:8.1f} ms")
    print(f"ledger: next step among 10,000 pending (scale())    {t_next * 1000:8.1f} ms")
    print(f"  next_step now (SELECT DISTINCT step)             {new * 1000:9.1f} ms")
    print(f"  next_step before (all pending rows loaded)       {old * 1000:9.1f} ms   ({old / new:.0f}× slower)")
    print(f"  Scheduler.pending() (backlog count, by step)     {pend * 1000:9.1f} ms")
    if args.json:
        args.json.write_text(json.dumps({"footprint": foot, "scale": [t_scan, t_insert, t_next],
                                         "next_step": {"new": new, "old": old, "pending": pend}}, indent=1))


if __name__ == "__main__":
    main()
