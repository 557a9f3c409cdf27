"""Many runs: 3 runs on one engine (`run --root`) vs 3 daemons (`run --watch`, one per run).

    .venv/bin/python bench/bench_root.py [--runs 3] [--checkpoints 3] [--arc-n 20] [--repeats 1]

Setup (not timed): `--runs` run folders, each with `--checkpoints` real PEFT LoRA adapters on
SmolLM2-135M-Instruct (the bundled model; random B matrices, seeded per run and step, saved with
peft like a trainer's checkpoint-N folders with a trainer_state.json).

Then, side by side, each variant from a fresh results dir, in the order A, B (then B, A with
--repeats 2, so the order's cost is seen):

  A  one daemon, one HF engine:   ckpt-watch run --once --root ROOT
  B  one daemon per run:          3× ckpt-watch run --once --watch ROOT/run-i, started together

Both record the same work: every run's base model (step 0) and checkpoints with the suites
heldout_loss (8 texts) and arc_challenge (letter scoring, --arc-n questions). A evaluates the
shared base model once for the three runs (the others take its result, `info.base_from`); B once
per daemon. Printed: wall time
until every process has exited, and the peak of the summed RSS of all ckpt-watch processes
(sampled every 0.2 s from /proc), plus CPU seconds (user+system, from the children's rusage).
The ratio lines are B / A.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _hw import hardware_lines

REPO = Path(__file__).resolve().parents[1]
ARC_FILE = REPO.parent / "shared" / "data" / "arc_challenge_test.jsonl"


def make_runs(root: Path, runs: int, checkpoints: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ckpt_watch.models import smollm2_dir

    base = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                  task_type="CAUSAL_LM"))
    for i in range(runs):
        for k in range(1, checkpoints + 1):
            step = 10 * k
            torch.manual_seed(1000 * i + step)
            with torch.no_grad():
                for name, p in peft_model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0, 0.02)
            out = root / f"run-{i}" / f"checkpoint-{step}"
            peft_model.save_pretrained(out)
            state = {"global_step": step, "max_steps": 10 * checkpoints, "log_history": []}
            (out / "trainer_state.json").write_text(json.dumps(state))


def config(tmp: Path, results: Path, arc_n: int) -> Path:
    cfg = tmp / f"cfg-{results.name}.yaml"
    cfg.write_text(f"""
base_model: smollm2
results_dir: {results}
watch: {{settle_seconds: 0}}
engine: {{kind: hf, dtype: float32}}
suites:
  heldout_loss: {{max_texts: 8}}
  arc_challenge: {{scoring: letter, n: {arc_n}, path: {ARC_FILE}}}
mlflow: {{enabled: false}}
""")
    return cfg


class PeakRss:
    """Sum of VmRSS over the given processes and their descendants, sampled until stop()."""

    def __init__(self, pids: list[int]):
        self.pids = pids
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self) -> list[int]:
        import psutil

        out = []
        for pid in self.pids:
            try:
                p = psutil.Process(pid)
                out += [pid, *(c.pid for c in p.children(recursive=True))]
            except psutil.NoSuchProcess:
                continue
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for pid in self._tree():
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1])
                except OSError:
                    continue
            self.peak_mib = max(self.peak_mib, total / 1024)
            self._stop.wait(0.2)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_mib


def run_variant(commands: list[list[str]]) -> tuple[float, float, float]:
    """(wall s, peak summed RSS MiB, CPU s) of the commands started together."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in commands]
    peak = PeakRss([p.pid for p in procs])
    outs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - t0
    rss = peak.stop()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    for p, out in zip(procs, outs, strict=True):
        if p.returncode != 0:
            raise SystemExit(f"{p.args} exited {p.returncode}:\n{out[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, rss, cpu


def count_done(results: Path) -> int:
    import sqlite3

    db = sqlite3.connect(results / "ledger.sqlite")
    try:
        return db.execute("SELECT count(*) FROM evals WHERE state='done'").fetchone()[0]
    finally:
        db.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--checkpoints", type=int, default=3, help="checkpoints per run")
    ap.add_argument("--arc-n", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=1, help="2: A, B then B, A")
    args = ap.parse_args()
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench-root-"))
    try:
        root = tmp / "sweep"
        make_runs(root, args.runs, args.checkpoints)
        cli = [sys.executable, "-m", "ckpt_watch", "run", "--once", "-c"]
        want = args.runs * (args.checkpoints + 1) * 2
        rows: dict[str, list[tuple[float, float, float]]] = {"A": [], "B": []}
        order = ["A", "B"] + (["B", "A"] if args.repeats > 1 else [])
        for i, variant in enumerate(order):
            results = tmp / f"results-{variant}-{i}"
            cfg = config(tmp, results, args.arc_n)
            if variant == "A":
                commands = [[*cli, str(cfg), "--root", str(root)]]
            else:
                commands = [[*cli, str(cfg), "--watch", str(root / f"run-{r}")] for r in range(args.runs)]
            rows[variant].append(run_variant(commands))
            done = count_done(results)
            assert done == want, f"{variant}: {done} evaluations done, expected {want}"
            print(f"  {variant} #{i}: wall {rows[variant][-1][0]:.1f} s, peak RSS {rows[variant][-1][1]:.0f} MiB, "
                  f"CPU {rows[variant][-1][2]:.1f} s, {done} evaluations", flush=True)
        print("\n".join(hardware_lines(dtype="float32", load_before=load_before, vllm_python=None)))
        print(f"\n{args.runs} runs × {args.checkpoints} checkpoints (+ base), suites heldout_loss (8 texts) + "
              f"arc_challenge (letter, n={args.arc_n}), HF engine on SmolLM2-135M float32")
        print(f"{'variant':44} {'wall s':>8} {'peak RSS MiB':>13} {'CPU s':>8}")
        names = {"A": f"{args.runs} runs on one engine (--root)", "B": f"{args.runs} daemons (--watch each)"}
        mean = {}
        for v in ("A", "B"):
            w, r, c = (sum(x[j] for x in rows[v]) / len(rows[v]) for j in range(3))
            mean[v] = (w, r, c)
            print(f"{names[v]:44} {w:8.1f} {r:13.0f} {c:8.1f}")
        print(f"ratio 3 daemons / one engine: wall {mean['B'][0] / mean['A'][0]:.2f}x, "
              f"memory {mean['B'][1] / mean['A'][1]:.2f}x, CPU {mean['B'][2] / mean['A'][2]:.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
