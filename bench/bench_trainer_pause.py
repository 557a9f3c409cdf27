"""Trainer pause: in-trainer periodic eval vs ckpt-watch beside the trainer vs no eval.

    .venv/bin/python bench/bench_trainer_pause.py [--steps 30] [--save-steps 10] [--arc-n 50] [--repeats 1]

A real HF Trainer + peft LoRA run on SmolLM2-135M-Instruct (ckpt_watch.demo.train), three
ways, in the same script run:

  (a) no eval                      trainer pinned to core 0
  (b) in-trainer callback          trainer pinned to core 0; at every save a TrainerCallback
                                   scores --arc-n ARC-C questions (the seed's letter scoring, same
                                   model in-process) while training waits
  (c) ckpt-watch beside it         trainer pinned to core 0, no in-trainer eval; `ckpt-watch run`
                                   pinned to core 1 evaluates the same ARC subset (suite
                                   arc_challenge, scoring letter, same n and seed) on every checkpoint

Torch uses one thread in every process. Reported per variant: the trainer's own train loop
time (Trainer's train_runtime) and process wall time, the save-to-save interval (from the
checkpoints' trainer_state.json mtimes), the pause per eval (time inside the callback), and
for (c) when the sidecar's last result landed, plus the trainer's CPU seconds (user + sys:
unaffected by time-sharing with other processes). Ratios are against (a). With --repeats > 1
the variants are interleaved (a, c, b, a, c, b, …) and medians are reported. Last, a core
interference check: fixed torch work on the trainer's core alone vs with the same work on the
sidecar's core (CPU time up = the cores slow each other; only wall time up = time-sharing).
`--from-log FILE` reprints the table from an interrupted run's output.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARC_FILE = REPO.parent / "shared" / "data" / "arc_challenge_test.jsonl"
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
RUN = "run1"


def trainer_cmd(out: Path, args: argparse.Namespace, callback: bool) -> list[str]:
    cmd = ["taskset", "-c", str(args.trainer_core), sys.executable, "-m", "ckpt_watch.demo.train", "--out", str(out),
           "--model", "smollm2", "--max-steps", str(args.steps), "--save-steps", str(args.save_steps),
           "--threads", "1"]
    if callback:
        cmd += ["--callback-arc", str(args.arc_n), "--arc-path", str(ARC_FILE)]
    return cmd


def sidecar_config(tmp: Path, watch: Path, args: argparse.Namespace) -> Path:
    cfg = tmp / "sidecar.yaml"
    cfg.write_text(f"""
base_model: smollm2
run_name: {RUN}
results_dir: {tmp / "results"}
watch:
  dir: {watch}
  settle_seconds: 1.0
  rescan_seconds: 30
engine:
  kind: hf
  batch_size: 16
scheduler:
  base: false        # the callback does not evaluate the base model either
suites:
  arc_challenge:
    scoring: letter
    n: {args.arc_n}
    seed: 0
    path: {ARC_FILE}
mlflow:
  tracking_uri: sqlite:///{tmp / "results" / "mlflow.db"}
""")
    return cfg


def save_intervals(out: Path) -> list[float]:
    mtimes = sorted(p.stat().st_mtime for p in out.glob("checkpoint-*/trainer_state.json"))
    return [b - a for a, b in itertools.pairwise(mtimes)]


def run_trainer(out: Path, args: argparse.Namespace, callback: bool) -> dict:
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    proc = subprocess.run(trainer_cmd(out, args, callback), env=ENV, capture_output=True, text=True, cwd=REPO)
    wall = time.monotonic() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # only the trainer was reaped in between
    cpu = ru1.ru_utime - ru0.ru_utime + ru1.ru_stime - ru0.ru_stime
    if proc.returncode != 0:
        raise SystemExit(f"trainer failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    text = proc.stdout + proc.stderr
    runtime = float(re.search(r"train_runtime_s=([\d.]+)", text).group(1))
    pauses = [json.loads(m)["pause_s"] for m in re.findall(r"^callback_arc (\{.*\})$", text, re.M)]
    return {"wall": wall, "train": runtime, "cpu": cpu, "pauses": pauses, "intervals": save_intervals(out),
            "end": time.monotonic()}


def arc_lines(results: Path) -> list[dict]:
    path = results / RUN / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip() and '"arc_challenge"' in x]


def run_with_sidecar(tmp: Path, args: argparse.Namespace) -> dict:
    watch = tmp / RUN
    cfg = sidecar_config(tmp, watch, args)
    log = (tmp / "sidecar.log").open("w")
    sidecar = subprocess.Popen(["taskset", "-c", str(args.sidecar_core), sys.executable, "-m", "ckpt_watch", "run",
                                "-c", str(cfg)], env=ENV, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        time.sleep(3)  # the daemon is up and waiting for the (not yet created) run dir
        res = run_trainer(watch, args, callback=False)
        want = set(range(args.save_steps, args.steps + 1, args.save_steps))
        deadline = time.monotonic() + args.sidecar_timeout
        while {r["step"] for r in arc_lines(tmp / "results")} < want:
            if sidecar.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"sidecar did not evaluate every checkpoint:\n{(tmp / 'sidecar.log').read_text()}")
            time.sleep(1)
        res["sidecar_lag"] = time.monotonic() - res["end"]
        evals = []
        for step in sorted(want):
            data = json.loads((tmp / "results" / RUN / f"step-{step}" / "arc_challenge.json").read_text())
            evals.append(_seconds(data["started_at"], data["finished_at"]))
        res["sidecar_eval"] = evals
        res["sidecar_acc"] = [r["metrics"]["acc"] for r in sorted(arc_lines(tmp / "results"), key=lambda r: r["step"])]
    finally:
        sidecar.terminate()
        try:
            sidecar.wait(timeout=60)
        except subprocess.TimeoutExpired:
            sidecar.kill()
            sidecar.wait()
        log.close()
    return res


def _seconds(a: str, b: str) -> float:
    from datetime import datetime

    return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()


_WORK = """
import sys, time, torch
torch.set_num_threads(1)
a = torch.randn(768, 768)
w = [torch.randn(768, 768) for _ in range(64)]  # 150 MB of weights: more than the caches, like a model
t0, c0 = time.perf_counter(), time.process_time()
for _ in range(int(sys.argv[1])):
    x = a
    for m in w:
        x = torch.tanh(x @ m)
print(time.perf_counter() - t0, time.process_time() - c0)
"""


def interference(args: argparse.Namespace, rounds: int = 4) -> tuple[float, float, float, float]:
    """Fixed torch work (1 thread) on the trainer's core, alone and with the same work running on the
    sidecar's core: (wall alone, wall beside, CPU s alone, CPU s beside). Tells whether the two cores
    slow each other down (shared caches / memory bandwidth / SMT siblings on the host) apart from
    the time-sharing with other processes that wall time also shows."""
    cmd = [sys.executable, "-c", _WORK, str(rounds)]

    def once(beside: bool) -> tuple[float, float]:
        noise = None
        if beside:
            noise = subprocess.Popen(["taskset", "-c", str(args.sidecar_core), *cmd[:-1], str(rounds * 4)], env=ENV,
                                     stdout=subprocess.DEVNULL)
            time.sleep(2)
        try:
            out = subprocess.run(["taskset", "-c", str(args.trainer_core), *cmd], env=ENV, capture_output=True,
                                 text=True, check=True).stdout.split()
        finally:
            if noise is not None:
                noise.kill()
                noise.wait()
        return float(out[0]), float(out[1])

    alone, beside = [], []
    for _ in range(3):
        alone.append(once(False))
        beside.append(once(True))
    return (med([x[0] for x in alone]), med([x[0] for x in beside]), med([x[1] for x in alone]),
            med([x[1] for x in beside]))


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(runs: dict[str, list[dict]], args: argparse.Namespace) -> None:
    load = os.getloadavg()
    names = {"a": "(a) no eval", "b": "(b) in-trainer ARC callback", "c": "(c) ckpt-watch beside (core 1)"}
    base_train = med([r["train"] for r in runs["a"]])
    base_wall = med([r["wall"] for r in runs["a"]])
    n_evals = args.steps // args.save_steps
    print(f"\nTrainer pause: SmolLM2-135M LoRA, {args.steps} steps, save every {args.save_steps}, ARC-C letter "
          f"n={args.arc_n}; trainer on core {args.trainer_core}, sidecar on core {args.sidecar_core}, 1 torch "
          f"thread each; median of {args.repeats}; load avg {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    has_cpu = all("cpu" in r for rs in runs.values() for r in rs)
    base_cpu = med([r["cpu"] for r in runs["a"]]) if has_cpu else float("nan")
    print(f"{'variant':<33}{'train s':>9}{'× (a)':>8}{'wall s':>9}{'× (a)':>8}{'CPU s':>8}{'× (a)':>8}"
          f"{'save→save s':>13}{'pause/eval s':>14}{'evals':>7}")
    for key in ("a", "b", "c"):
        rs = runs[key]
        train, wall = med([r["train"] for r in rs]), med([r["wall"] for r in rs])
        interval = med([x for r in rs for x in r["intervals"]])
        pauses = [p for r in rs for p in r["pauses"]]
        pause = med(pauses) if pauses else 0.0
        evals = len(pauses) // len(rs) if key == "b" else (n_evals if key == "c" else 0)
        cpu = med([r["cpu"] for r in rs]) if has_cpu else float("nan")
        print(f"{names[key]:<33}{train:>9.1f}{train / base_train:>8.3f}{wall:>9.1f}{wall / base_wall:>8.3f}"
              f"{cpu:>8.1f}{cpu / base_cpu:>8.3f}{interval:>13.1f}{pause:>14.2f}{evals:>7}")
    c = runs["c"]
    print(f"\n(c) sidecar: ARC eval per checkpoint {med([x for r in c for x in r['sidecar_eval']]):.1f} s (median, "
          f"on core {args.sidecar_core}); last result {med([r['sidecar_lag'] for r in c]):.1f} s after the trainer "
          f"exited; acc by step {c[0]['sidecar_acc']}")
    ratio_c = med([r["train"] for r in c]) / base_train
    ratio_b = med([r["train"] for r in runs["b"]]) / base_train
    print(f"goal (c)/(a) train time ≤ 1.02: {ratio_c:.3f} → {'met' if ratio_c <= 1.02 else 'NOT met'}; "
          f"(b)/(a) = {ratio_b:.3f} (the pause ckpt-watch removes)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--save-steps", type=int, default=10)
    ap.add_argument("--arc-n", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--trainer-core", type=int, default=0)
    ap.add_argument("--sidecar-core", type=int, default=1)
    ap.add_argument("--sidecar-timeout", type=float, default=1800)
    ap.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    ap.add_argument("--no-interference", action="store_true", help="skip the core interference check")
    ap.add_argument("--only-interference", action="store_true", help="run only the core interference check")
    ap.add_argument("--from-log", type=Path, default=None,
                    help="print the table from the per-run lines of an earlier (interrupted) run's output")
    args = ap.parse_args()
    if args.only_interference:
        w0, w1, c0, c1 = interference(args)
        print(f"core interference: wall {w0:.2f} → {w1:.2f} s (×{w1 / w0:.2f}), CPU {c0:.2f} → {c1:.2f} s "
              f"(×{c1 / c0:.2f})")
        return
    if args.from_log:
        runs_from_log: dict[str, list[dict]] = {"a": [], "b": [], "c": []}
        key = None
        for line in args.from_log.read_text().splitlines():
            if m := re.search(r"variant \((\w)\)", line):
                key = m.group(1)
            elif line.startswith("    {") and key:
                runs_from_log[key].append(ast.literal_eval(line.strip()))
        n = min(len(v) for v in runs_from_log.values())
        args.repeats = n
        report({k: v[:n] for k, v in runs_from_log.items()}, args)
        return
    if shutil.which("taskset") is None:
        raise SystemExit("taskset (util-linux) is needed to pin the trainer and the sidecar to cores")
    runs: dict[str, list[dict]] = {"a": [], "b": [], "c": []}
    with tempfile.TemporaryDirectory(prefix="bench-pause-") as d:
        for rep in range(args.repeats):
            for key in ("a", "c", "b"):
                tmp = Path(d) / f"{key}{rep}"
                tmp.mkdir()
                print(f"[{time.strftime('%H:%M:%S')}] repeat {rep + 1}/{args.repeats}: variant ({key})…", flush=True)
                res = run_with_sidecar(tmp, args) if key == "c" else run_trainer(tmp / RUN, args, key == "b")
                print("   ", {k: v for k, v in res.items() if k != "end"}, flush=True)
                runs[key].append(res)
    report(runs, args)
    if not args.no_interference:
        w0, w1, c0, c1 = interference(args)
        print(f"\ncore interference check (fixed torch work on core {args.trainer_core}, alone vs with the same work "
              f"on core {args.sidecar_core}, median of 3): wall {w0:.1f} → {w1:.1f} s (×{w1 / w0:.2f}), "
              f"CPU {c0:.1f} → {c1:.1f} s (×{c1 / c0:.2f})")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
