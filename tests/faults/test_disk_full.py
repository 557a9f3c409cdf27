"""Disk full under the results directory: a real ENOSPC from a small tmpfs mounted there (needs
root, or CAP_SYS_ADMIN; skipped otherwise), filled up by a file written until the kernel says no.

Two moments: while a new checkpoint is snapshotted (snapshots live under results_dir: a clear
error, looked at again, evaluated once space is back), and while a result is written (the JSON
write and, on the same filesystem, the ledger are refused: the daemon says the disk is full, waits
with backoff, and once space is back the interrupted evaluation is pending again and written
exactly once; no half-written temp file is left behind). The daemon stays up throughout and
evaluates the next checkpoint normally.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.harness import (
    SUITES,
    DaemonProc,
    checkpoint_states,
    eval_states,
    json_duplicates,
    metric_lines,
    place_checkpoint,
    step_record,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.slow

RUN = "run1"
STEPS = (0, 2, 4, 6)
# what the daemon says when a result cannot be written, or when the ledger itself is refused
FULL = r"step-4/slow: writing results failed .*disk full: free space|disk full under .*: waiting for space"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "results"
    mount.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], check=True,
                       capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {exc}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True, timeout=30)


def fill(mount: Path) -> Path:
    """Write a file until the filesystem refuses with ENOSPC; returns it (delete it to free space)."""
    filler = mount / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    with pytest.raises(OSError) as info:
        (mount / "probe").write_bytes(b"x" * 4096)
    assert info.value.errno == errno.ENOSPC
    return filler


def _done(results: Path) -> set[tuple[int, str]]:
    return {(m["step"], m["suite"]) for m in metric_lines(results, RUN)}


def test_disk_full_while_writing_results(tmp_path, small_fs, tiny_run, tiny_base, reference, fault_record):
    watch = tmp_path / "watch"
    watch.mkdir()
    results = small_fs
    cfg = write_config(tmp_path, tiny_base, watch, results=results)
    with DaemonProc(cfg) as daemon:
        daemon.wait_line(r"base/slow done", 180)

        # 1. no space for the snapshot of a new checkpoint: a clear error, looked at again later
        filler = fill(results)
        place_checkpoint(tiny_run / "checkpoint-2", watch, 2)
        daemon.wait_line(r"step 2: cannot snapshot .*No space left on device; will try again", 60)
        mark = len(daemon.lines)
        filler.unlink()
        wait_until(lambda: {(2, s) for s in SUITES} <= _done(results), 120, "step 2 evaluated", daemon)
        snapshot_retried = checkpoint_states(results)[2][0] == "ready"

        # 2. no space when the slow suite's result is written (the ledger, on the same filesystem,
        #    may be refused too): a clear error each time; written once space is back
        place_checkpoint(tiny_run / "checkpoint-4", watch, 4)
        daemon.wait_line(r"step-4: running slow", 120, after=mark)
        filler = fill(results)
        first = daemon.wait_line(FULL, 60, after=mark)
        daemon.wait_line(FULL, 60, after=first + 1)
        leftovers = sorted(str(p.relative_to(results)) for p in results.rglob("*.tmp"))
        filler.unlink()
        wait_until(lambda: (4, "slow") in _done(results), 120, "step 4 written after the retries", daemon)
        retried = eval_states(results)[(4, "slow")]

        # 3. the daemon carries on with the next checkpoint
        place_checkpoint(tiny_run / "checkpoint-6", watch, 6)
        wait_until(lambda: {(6, s) for s in SUITES} <= _done(results), 120, "step 6 evaluated", daemon)
        code = daemon.stop()
        out = daemon.output()
    assert code == 0, out

    evaluated = 0
    for step in STEPS:
        records = [step_record(results, RUN, step, s) for s in SUITES]
        if all(r is not None for r in records):
            for r in records:
                reference.check(r, step, r["suite"])
            evaluated += 1
    handled = int(snapshot_retried) + int(retried[0] == "done")
    fault_record(expected=len(STEPS), evaluated=evaluated, duplicated=json_duplicates(results, RUN),
                 faulty=(handled, 2))
    assert snapshot_retried
    assert retried[0] == "done" and retried[1] >= 2, retried  # at least one failed attempt, then written
    assert leftovers == []  # no half-written temp file left to fill the disk further
    assert evaluated == len(STEPS)
    assert json_duplicates(results, RUN) == 0
    assert _done(results) == {(s, n) for s in STEPS for n in SUITES}
    assert {v[0] for v in eval_states(results).values()} == {"done"}
