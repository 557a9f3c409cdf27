"""Discovery latency: trainer_state.json written → checkpoint complete and snapshotted.

    .venv/bin/python bench/bench_discovery.py [--n 10]

Writes checkpoints the way HF Trainer does (adapter files, then trainer_state.json last)
into a watched dir, with the real Watcher + Discovery + ledger, and reports per observer
(native inotify, PollingObserver at 1 s) the latency split into detection (event to
first look) and settle + checks + snapshot. Also times a rescan of 1,000 checkpoint
folders and a 10,000-row ledger. Prints a table; ratios are against the native observer.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ckpt_watch.checkpoints import Layout, scan
from ckpt_watch.config import SchedulerConfig, WatchConfig, parse_config
from ckpt_watch.discovery import Discovery
from ckpt_watch.ledger import EvalState, Ledger
from ckpt_watch.scheduler import Scheduler
from ckpt_watch.watcher import Watcher

SUITES = parse_config({"base_model": "x", "suites": {"heldout_loss": {}}}).suites


def make_source(tmp: Path) -> Path:
    src = tmp / "src"
    subprocess.run([sys.executable, "-m", "ckpt_watch.demo.train", "--out", str(src), "--model", "tiny",
                    "--max-steps", "2", "--save-steps", "2"], check=True, capture_output=True)
    return src / "checkpoint-2"


def write_checkpoint(src: Path, root: Path, step: int) -> float:
    ck = root / f"checkpoint-{step}"
    ck.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(src / name, ck / name)
    state = json.loads((src / "trainer_state.json").read_text())
    state["global_step"] = step
    with (ck / "trainer_state.json").open("w") as fh:  # last, not atomic: as HF Trainer does
        json.dump(state, fh)
    return time.monotonic()


def measure(src: Path, tmp: Path, polling: bool, n: int, settle: float) -> list[float]:
    root = tmp / f"watch-{polling}-{settle}"
    root.mkdir()
    cfg = WatchConfig(dir=root, polling=polling, poll_interval=1.0, settle_seconds=settle, rescan_seconds=3600)
    ledger = Ledger(tmp / f"ledger-{polling}-{settle}.sqlite")
    sched = Scheduler(ledger, "r", SUITES, SchedulerConfig())
    disc = Discovery(root, cfg, ledger, sched, "r", tmp / f"cache-{polling}-{settle}")
    wake = threading.Event()

    def hint(name):
        disc.hint(name)
        wake.set()

    watcher = Watcher(root, cfg, hint)
    watcher.start()
    time.sleep(1.5)
    disc.poll()
    latencies = []
    for i in range(1, n + 1):
        written = write_checkpoint(src, root, i * 10)
        while True:
            wake.wait(timeout=disc.seconds_until_due())
            wake.clear()
            if i * 10 in disc.poll():
                latencies.append(time.monotonic() - written)
                break
        time.sleep(0.3)
    watcher.stop()
    ledger.close()
    return latencies


def scale(tmp: Path, src: Path) -> tuple[float, float, float]:
    root = tmp / "scale"
    root.mkdir()
    for step in range(1, 1001):
        ck = root / f"checkpoint-{step}"
        ck.mkdir()
        (ck / "trainer_state.json").write_text("{}")
    t0 = time.perf_counter()
    found = scan(root, Layout(WatchConfig()))
    t_scan = time.perf_counter() - t0
    assert len(found) == 1000
    ledger = Ledger(tmp / "big.sqlite")
    sched = Scheduler(ledger, "r", SUITES, SchedulerConfig())
    t0 = time.perf_counter()
    for step in range(1, 10001):
        ledger.add_eval("r", step, "heldout_loss", sched.suites["heldout_loss"].hash, EvalState.PENDING)
    t_insert = time.perf_counter() - t0
    t0 = time.perf_counter()
    nxt = sched.next_step(set(range(10001)))
    t_next = time.perf_counter() - t0
    assert nxt == 10000
    return t_scan, t_insert, t_next


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        src = make_source(tmp)
        rows = {}
        for polling in (False, True):
            for settle in (0.0, 1.0):
                lat = measure(src, tmp, polling, args.n, settle)
                rows[(polling, settle)] = (statistics.median(lat), max(lat))
        base = rows[(False, 0.0)][0]
        print(f"\nDiscovery latency, trainer_state.json written → snapshotted ({args.n} checkpoints each)")
        print(f"{'observer':<22}{'settle s':>9}{'median s':>10}{'max s':>8}{'× native':>10}")
        for (polling, settle), (med, mx) in rows.items():
            name = "PollingObserver 1 s" if polling else "native (inotify)"
            print(f"{name:<22}{settle:>9.1f}{med:>10.3f}{mx:>8.3f}{med / base:>10.1f}")
        t_scan, t_insert, t_next = scale(tmp, src)
        print("\nScale")
        print(f"rescan of 1,000 checkpoint folders      {t_scan * 1000:8.1f} ms")
        print(f"ledger: insert 10,000 evaluation rows   {t_insert * 1000:8.1f} ms")
        print(f"ledger: pick next step among 10,000     {t_next * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
