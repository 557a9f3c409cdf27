"""ARC-Challenge through ckpt-watch vs lm-evaluation-harness, against the same vLLM server.

    .venv/bin/python bench/bench_arc_vs_lmeval.py [--n 1172] [--concurrency 32] [--lmeval-concurrency 32,1]

Starts one managed vLLM CPU server (ckpt-watch's ManagedServer: `.venv-vllm/bin/python -m
vllm.entrypoints.openai.api_server`, VLLM_CPU_KVCACHE_SPACE=1, float32) on SmolLM2-135M-Instruct,
warms it up, then times on the same questions:

  ours     the arc_challenge suite (scoring loglik = lm-eval's arc_challenge) through the
           vLLM engine, `--concurrency` requests in flight
  lm-eval  `lm_eval run --model local-completions` (tokenized requests, HF tokenizer) on a
           local copy of lm-eval's arc_challenge task (same yaml, local jsonl), once per
           `--lmeval-concurrency` value (num_concurrent; 1 is lm-eval's default)

vLLM's prefix cache is reset before each timed run (dev route /reset_prefix_cache), so no
run profits from the previous one's prompts. Both accuracies (acc, acc_norm) are printed
with the time ratio. Goal: ours ≤ 0.5× lm-eval's time, same accuracy. The server is
stopped at the end whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARC_FILE = REPO.parent / "shared" / "data" / "arc_challenge_test.jsonl"
VLLM_PYTHON = Path(os.environ.get("CKPT_WATCH_VLLM_PYTHON") or REPO / ".venv-vllm" / "bin" / "python")
LMEVAL = Path(os.environ.get("CKPT_WATCH_LMEVAL") or REPO / ".venv-lmeval" / "bin" / "lm_eval")

TASK_YAML = """task: arc_challenge_bench
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
should_decontaminate: true
doc_to_decontamination_query: "Question: {{{{question}}}}\\nAnswer:"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def subset_file(tmp: Path, n: int, seed: int) -> Path:
    """The questions both sides score: all of them, or a fixed-seed sample in file order."""
    lines = [x for x in ARC_FILE.read_text().splitlines() if x.strip()]
    if n < len(lines):
        keep = sorted(random.Random(seed).sample(range(len(lines)), n))
        lines = [lines[i] for i in keep]
    path = tmp / "arc.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def reset_prefix_cache(server) -> str:
    req = urllib.request.Request(f"{server.root_url}/reset_prefix_cache", method="POST",
                                 headers={"Authorization": f"Bearer {server.api_key}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return f"reset ({resp.status})"
    except OSError as exc:
        return f"not reset ({exc})"


async def run_ours(engine, data: Path) -> tuple[float, dict]:
    from ckpt_watch.core import Checkpoint
    from ckpt_watch.suites.arc import ArcConfig, ArcSuite
    from ckpt_watch.suites.base import SuiteContext

    ckpt = Checkpoint.base("bench")
    handle = await engine.load(ckpt)
    suite = ArcSuite("arc_challenge", ArcConfig(scoring="loglik", n=None, path=data))
    suite.rows()  # reading the file is not part of the comparison (lm-eval's dataset load is, a little)
    t0 = time.perf_counter()
    result = await suite.run(SuiteContext(engine=engine, handle=handle, checkpoint=ckpt, run_name="bench"))
    return time.perf_counter() - t0, result.metrics


async def warm_up(engine) -> None:
    from ckpt_watch.core import Checkpoint
    from ckpt_watch.engines.base import ScoreRequest

    handle = await engine.load(Checkpoint.base("bench"))
    tok = engine.tokenizer
    ids = tok.encode("Question: Which gas do plants take in?\nAnswer: carbon dioxide")
    await engine.score(handle, [ScoreRequest(ids[:-2], ids[-2:])] * 8)


def run_lmeval(server, model_dir: str, task_dir: Path, out: Path, concurrency: int) -> tuple[float, float, dict]:
    args = ",".join([
        f"model={server.model}", f"base_url={server.base_url}/completions", f"tokenizer={model_dir}",
        "tokenizer_backend=huggingface", "tokenized_requests=True", f"num_concurrent={concurrency}",
        "max_retries=3", "timeout=600",
    ])
    cmd = [str(LMEVAL), "run", "--model", "local-completions", "--model_args", args, "--include_path", str(task_dir),
           "--tasks", "arc_challenge_bench", "--output_path", str(out)]
    env = {**os.environ, "OPENAI_API_KEY": server.api_key, "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"lm_eval failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    found = sorted(out.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    data = json.loads(found[-1].read_text())
    res = data["results"]["arc_challenge_bench"]
    metrics = {"acc": res["acc,none"], "acc_norm": res["acc_norm,none"]}
    return wall, float(data.get("total_evaluation_time_seconds", wall)), metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1172, help="questions (1,172 = all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--concurrency", type=int, default=32, help="ckpt-watch's engine.max_concurrency")
    ap.add_argument("--lmeval-concurrency", default="32", help="comma-separated num_concurrent values for lm-eval")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    for exe in (VLLM_PYTHON, LMEVAL):
        if not exe.exists():
            raise SystemExit(f"missing {exe}: run scripts/setup.sh --with-vllm and install lm-eval in .venv-lmeval")
    from ckpt_watch.config import Config
    from ckpt_watch.engines.vllm import VLLMEngine
    from ckpt_watch.engines.vllm_server import ManagedServer
    from ckpt_watch.models import smollm2_dir

    model_dir = str(smollm2_dir())
    rows: list[tuple[str, float, float | None, dict]] = []
    with tempfile.TemporaryDirectory(prefix="bench-arc-") as d:
        tmp = Path(d)
        data = subset_file(tmp, args.n, args.seed)
        n = sum(1 for _ in data.open())
        task_dir = tmp / "tasks"
        task_dir.mkdir()
        (task_dir / "arc_challenge_bench.yaml").write_text(TASK_YAML.format(data=data))
        config = Config.model_validate({
            "base_model": model_dir, "results_dir": str(tmp / "results"), "suites": {"arc_challenge": {}},
            "engine": {"kind": "vllm", "dtype": "float32", "max_concurrency": args.concurrency,
                       "request_timeout": 600, "launch": {
                           "command": [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server"],
                           "env": {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_SERVER_DEV_MODE": "1"},
                           "max_lora_rank": 8, "startup_timeout": 900}},
        })
        server = ManagedServer.from_config(config, model_dir, tmp / "vllm-server.log")
        t0 = time.perf_counter()
        try:
            server.start()
            startup = time.perf_counter() - t0
            print(f"[{time.strftime('%H:%M:%S')}] vLLM server ready in {startup:.0f} s", flush=True)

            async def ours() -> tuple[float, dict]:
                engine = VLLMEngine(config, server=server)
                await engine.start()
                try:
                    t1 = time.perf_counter()
                    await warm_up(engine)
                    print(f"[{time.strftime('%H:%M:%S')}] warm-up {time.perf_counter() - t1:.1f} s; "
                          f"prefix cache {reset_prefix_cache(server)}", flush=True)
                    return await run_ours(engine, data)
                finally:
                    await engine.close()

            secs, metrics = asyncio.run(ours())
            rows.append((f"ckpt-watch (concurrency {args.concurrency})", secs, None, metrics))
            print(f"[{time.strftime('%H:%M:%S')}] ours: {secs:.1f} s {metrics}", flush=True)
            for conc in [int(c) for c in args.lmeval_concurrency.split(",") if c.strip()]:
                state = reset_prefix_cache(server)
                wall, evaluation, m = run_lmeval(server, model_dir, task_dir, tmp / f"lmeval-{conc}", conc)
                rows.append((f"lm-eval local-completions (num_concurrent {conc})", wall, evaluation, m))
                print(f"[{time.strftime('%H:%M:%S')}] lm-eval num_concurrent={conc}: wall {wall:.1f} s, "
                      f"evaluation {evaluation:.1f} s {m} (prefix cache {state})", flush=True)
        finally:
            server.stop()
    load = os.getloadavg()
    ours_s = rows[0][1]
    print(f"\nARC-Challenge, {n} questions (loglik = lm-eval arc_challenge), one vLLM CPU server "
          f"(SmolLM2-135M, float32, start-up {startup:.0f} s, not counted); load avg {load[0]:.1f}")
    print(f"{'runner':<46}{'seconds':>9}{'eval s':>8}{'ours ×':>8}{'acc':>8}{'acc_norm':>10}")
    for name, secs, evaluation, m in rows:
        ref = evaluation if evaluation is not None else secs
        ev = f"{evaluation:>8.1f}" if evaluation is not None else f"{'':>8}"
        print(f"{name:<46}{secs:>9.1f}{ev}{ours_s / ref:>8.2f}{m['acc']:>8.4f}{m['acc_norm']:>10.4f}")
    for name, secs, evaluation, m in rows[1:]:
        ratio = ours_s / (evaluation if evaluation is not None else secs)
        same = abs(m["acc"] - rows[0][3]["acc"]) < 1e-9 and abs(m["acc_norm"] - rows[0][3]["acc_norm"]) < 1e-9
        print(f"goal vs {name}: ours/theirs = {ratio:.2f} (≤ 0.5: {'met' if ratio <= 0.5 else 'NOT met'}); "
              f"accuracy {'identical' if same else 'differs'}")
    if args.json:
        args.json.write_text(json.dumps([{"runner": r[0], "seconds": r[1], "evaluation_s": r[2], "metrics": r[3]}
                                         for r in rows], indent=1))


if __name__ == "__main__":
    main()
