"""A whole checkpoint through the managed vLLM CPU server: suites one after another vs together,
and a backlog of checkpoints one at a time vs in flight together (issue 15).

    .venv/bin/python bench/bench_checkpoint.py [--quick] [--backlog 4] [--arc-n 200]

The suites are those of configs/preferences.yaml and configs/persona_leakage.yaml that the issue
names — compliance and collapse (CLaaS), leakage and heldout_loss — plus ARC-C (`--arc-n`
questions, lm-eval's loglik scoring) and Betley alignment judged by a local judge: the same vLLM
server answering as the base model (a real judge's numbers are not the point here, its
round-trips are; the judgement cache is off so no variant profits from another). `--quick`
shrinks every suite (fewer samples and tokens) so one run fits a 2-core CPU box in minutes; the
default sizes are the configs' own (meant for a GPU server).

Every variant evaluates real PEFT LoRA adapters (noise in B, so the canary passes) with the real
Evaluator, ledger and JSON sink, in its own results folder and run (fresh rows, unique adapter
names), on one server started once (`--max-loras` = `--backlog`):

  A  one checkpoint, suites one after another   (engine.concurrent_suites: false)
  B  one checkpoint, suites together             (the default)
  C  `--backlog` checkpoints, one at a time      (max_adapters_in_flight 1), suites together
  D  `--backlog` checkpoints in flight together  (max_adapters_in_flight = backlog)

Run in the order B, A, C, D (B pays the first-use costs, against the claim). Ratios: B/A and
D/C, each from one run, variants back to back. The hardware lines say what it ran on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _hw import hardware_lines
from bench_engine import VLLM_PYTHON, make_adapter

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SERVER_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2"}
JUDGE_KEY_ENV = "CKPT_WATCH_BENCH_JUDGE_KEY"  # the server's key, handed to the judge by environment


def suite_block(args: argparse.Namespace) -> dict[str, Any]:
    """The suites as configured in configs/, sized down with --quick."""
    from ckpt_watch.config import load_config

    suites: dict[str, Any] = {}
    for name in ("preferences.yaml", "persona_leakage.yaml"):
        cfg = load_config(REPO / "configs" / name)
        for key, suite in cfg.suites.items():
            if key in ("compliance", "collapse", "leakage", "heldout_loss"):
                block = suite.model_dump(mode="json", exclude_none=True)
                block["every"] = None
                suites[key] = block
    arc = str(SHARED / "arc_challenge_test.jsonl")
    suites["arc_challenge"] = {"type": "arc_challenge", "n": args.arc_n, "path": arc}
    suites["alignment"] = {"type": "alignment", "max_unscored_rate": 1.0}
    if args.quick:
        suites["compliance"].update(max_tokens=32, probes_per_preference=1)
        suites["collapse"].update(max_tokens=32, samples_per_prompt=2)
        suites["leakage"].update(samples_per_question=1, max_tokens=16)
        suites["alignment"].update(samples_per_question=1, max_tokens=32)
    return suites


def bench_config(base: Path, results: Path, suites: dict, backlog: int, judge: dict) -> Any:
    from ckpt_watch.config import Config

    launch = {
        "command": [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server"],
        "env": dict(SERVER_ENV),
        "max_lora_rank": 8,
        "max_loras": backlog,
        "startup_timeout": 900,
    }
    engine = {"kind": "vllm", "dtype": "float32", "max_concurrency": 64, "request_timeout": 1800, "launch": launch}
    return Config.model_validate({"base_model": str(base), "results_dir": str(results), "suites": suites,
                                  "engine": engine, "judge": judge})


class Variant:
    """A fresh ledger, scheduler, JSON sink and evaluator for one variant (its own run name)."""

    def __init__(self, name: str, work: Path, config: Any, engine: Any, judge: Any, concurrent: bool):
        """`judge`: the Judge object the suites use (its JudgeConfig goes into the suite hashes)."""
        from ckpt_watch.config import SchedulerConfig
        from ckpt_watch.evaluate import Evaluator
        from ckpt_watch.ledger import Ledger
        from ckpt_watch.scheduler import Scheduler
        from ckpt_watch.sinks.jsonfiles import JsonSink

        self.name = name
        self.dir = work / name
        self.ledger = Ledger(self.dir / "ledger.sqlite")
        self.sched = Scheduler(self.ledger, name, config.suites, SchedulerConfig(), judge=judge.config)
        sink = JsonSink(self.dir)
        sink.start(name, {})
        self.evaluator = Evaluator(engine, [sink], self.ledger, name, self.dir, max_attempts=1, judge=judge,
                                   cache_dir=self.dir / "cache", concurrent_suites=concurrent)

    def work(self, adapters: list[Path]) -> list[tuple[Any, list]]:
        from ckpt_watch.core import Checkpoint

        out = []
        for i, path in enumerate(adapters):
            step = 10 * (i + 1)
            self.sched.plan(step, False)
            out.append((Checkpoint(self.name, step, None, path), self.sched.pending()[step]))
        return out

    def outcome(self) -> tuple[int, int, dict[str, float]]:
        """(ok results, failed results, seconds per suite summed over steps)."""
        ok = failed = 0
        per_suite: dict[str, float] = {}
        from datetime import datetime

        for path in sorted(self.dir.glob(f"{self.name}/step-*/*.json")):
            data = json.loads(path.read_text())
            if data.get("status") == "ok":
                ok += 1
            else:
                failed += 1
                print(f"  {self.name} {path.parent.name}/{path.stem}: {data.get('error')}", flush=True)
            if data.get("started_at") and data.get("finished_at"):
                span = (datetime.fromisoformat(data["finished_at"]) - datetime.fromisoformat(data["started_at"]))
                per_suite[path.stem] = per_suite.get(path.stem, 0.0) + span.total_seconds()
        return ok, failed, per_suite


async def run_variant(v: Variant, adapters: list[Path], together: bool) -> float:
    from ckpt_watch.evaluate import run_together

    work = v.work(adapters)
    t0 = time.perf_counter()
    if together:
        await run_together([v.evaluator.evaluate(c, s, lambda: False) for c, s in work])
    else:
        for c, s in work:
            await v.evaluator.evaluate(c, s, lambda: False)
    seconds = time.perf_counter() - t0
    ok, failed, per_suite = v.outcome()
    shown = ", ".join(f"{k} {x:.0f}" for k, x in sorted(per_suite.items()))
    print(f"{v.name}: {seconds:.1f} s, {ok} ok, {failed} failed (suite seconds: {shown})", flush=True)
    return seconds


async def run_bench(args: argparse.Namespace, work: Path) -> tuple[list[tuple[str, float, str]], str]:
    from ckpt_watch.engines.vllm import VLLMEngine
    from ckpt_watch.engines.vllm_server import ManagedServer
    from ckpt_watch.judge import build_judge
    from ckpt_watch.models import smollm2_dir

    base = smollm2_dir()
    adapters = [make_adapter(base, work / f"adapter-{i}", seed=i) for i in range(args.backlog)]
    suites = suite_block(args)
    judge_block = {"model": "pending", "base_url": "http://127.0.0.1:1/v1", "api_key_env": JUDGE_KEY_ENV,
                   "method": "digits", "cache": False, "max_concurrency": 16}
    os.environ.setdefault(JUDGE_KEY_ENV, "unset")
    config = bench_config(base, work, suites, args.backlog, judge_block)
    assert config.engine.launch is not None
    server = ManagedServer.from_config(config, str(base), work / "vllm-server.log")
    t0 = time.perf_counter()
    server.start()
    print(f"server started in {time.perf_counter() - t0:.0f} s", flush=True)
    engine = VLLMEngine(config, work, server=server)
    await engine.start()
    os.environ[JUDGE_KEY_ENV] = server.api_key
    judge_cfg = config.judge.model_copy(update={"model": server.model, "base_url": server.base_url})
    judge = build_judge(judge_cfg, None, method="digits")
    rows: list[tuple[str, float, str]] = []
    try:
        # no separate warm-up: B goes first and pays the first-use costs (LoRA kernels, judge
        # connection), which can only make "together" look slower than it is
        b = await run_variant(Variant("B-together", work, config, engine, judge, True), adapters[:1], False)
        a = await run_variant(Variant("A-sequential", work, config, engine, judge, False), adapters[:1], False)
        c = await run_variant(Variant("C-backlog-one-at-a-time", work, config, engine, judge, True), adapters, False)
        d = await run_variant(Variant("D-backlog-in-flight", work, config, engine, judge, True), adapters, True)
    finally:
        await judge.aclose()
        await engine.close()
        server.stop()
    n = args.backlog
    rows.append(("1 checkpoint, suites one after another", a, ""))
    rows.append(("1 checkpoint, suites together", b, f"{b / a:.2f}x sequential"))
    rows.append((f"{n} checkpoints one at a time (suites together)", c, ""))
    rows.append((f"{n} checkpoints in flight together", d, f"{d / c:.2f}x one at a time"))
    return rows, ", ".join(sorted(suites))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small suites (fits a 2-core CPU box)")
    parser.add_argument("--backlog", type=int, default=4, help="checkpoints in the backlog variants")
    parser.add_argument("--arc-n", type=int, default=200)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    if not VLLM_PYTHON.exists():
        sys.exit(f"no vLLM virtualenv at {VLLM_PYTHON}: run scripts/setup.sh --with-vllm")
    if args.quick and args.arc_n == 200:
        args.arc_n = 50
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench-checkpoint-"))
    rows, suites = asyncio.run(run_bench(args, work))
    print()
    print("\n".join(hardware_lines(dtype="float32", load_before=load_before, server_env=SERVER_ENV)))
    print(f"suites: {suites}; ARC-C n={args.arc_n}; {'--quick sizes' if args.quick else 'config sizes'}")
    print(f"{'measure':<62}{'seconds':>9}  ratio")
    for label, seconds, ratio in rows:
        print(f"{label:<62}{seconds:>9.1f}  {ratio}")
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"work folder: {work}")


if __name__ == "__main__":
    main()
