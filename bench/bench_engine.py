"""Benchmark the vLLM engine on the real vLLM CPU server; prints ratios measured side by side.

    .venv/bin/python bench/bench_engine.py [--requests 64] [--max-tokens 32] [--swaps 5]

1. adapter swap: runtime-LoRA route (load, first request, unload) vs restarting the server
   with the adapter given at start-up (`--lora-modules`), until it answers a request;
2. N greedy chat generations: the same token-id prompts sent by a bare `openai` client (no
   ckpt-watch: all at once, plain completions) vs through the engine (bounded concurrency, one
   batch) vs the same requests one at a time vs vLLM's own offline `LLM.generate` on the same
   model and flags, run in the vLLM virtualenv with the server stopped (the limit for that server).
   engine / bare client is our own overhead; bare client / offline is the server's.

The hardware lines (bench/_hw.py: CPU, ISA flags, cores, load before and after, vLLM version and
its OpenMP binding as its log reports it, dtype) are printed with the table.

The vLLM interpreter: $CKPT_WATCH_VLLM_PYTHON, else <repo>/.venv-vllm/bin/python. Timings on a
shared 2-core machine are noisy; the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _hw import hardware_lines

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("CKPT_WATCH_VLLM_PYTHON") or REPO / ".venv-vllm" / "bin" / "python")
QUESTIONS = REPO.parent / "shared" / "data" / "arc_challenge_test.jsonl"


def offline_main(args: argparse.Namespace) -> None:
    """Runs under the vLLM interpreter: time LLM.generate on the same prompts (token ids)."""
    from vllm import LLM, SamplingParams

    prompts = [{"prompt_token_ids": ids} for ids in json.loads(Path(args.prompts).read_text())]
    llm = LLM(
        model=args.model,
        dtype="float32",
        enable_lora=True,
        max_lora_rank=8,
        max_loras=2,
        lora_target_modules=args.targets.split(",") if args.targets else None,
    )
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    llm.generate(prompts[:1], params, use_tqdm=False)  # warm-up, as the server had its first request
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    print("OFFLINE_RESULT " + json.dumps({"seconds": seconds, "tokens": tokens}), flush=True)


def make_adapter(base: Path, out: Path, seed: int) -> Path:
    """A PEFT LoRA (r=8, q/v) with noisy B so it changes outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(out)
    return out


def bench_config(base: Path, results: Path) -> Any:
    from ckpt_watch.config import Config

    launch = {
        "command": [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server"],
        "env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
        "max_lora_rank": 8,
        "startup_timeout": 900,
    }
    engine = {"kind": "vllm", "dtype": "float32", "max_concurrency": 64, "request_timeout": 900, "launch": launch}
    return Config.model_validate(
        {"base_model": str(base), "results_dir": str(results), "suites": {"arc_challenge": {}}, "engine": engine}
    )


def questions(n: int) -> list[str]:
    if QUESTIONS.is_file():
        rows = [json.loads(line) for line in QUESTIONS.read_text().splitlines()[:n]]
        return [r["question"] for r in rows]
    return [f"Tell me one fact about the number {i}." for i in range(n)]


async def run_bench(args: argparse.Namespace, work: Path) -> list[tuple[str, float, str]]:
    from transformers import AutoTokenizer

    from ckpt_watch.core import Checkpoint
    from ckpt_watch.engines.base import GenerateRequest, apply_chat_template
    from ckpt_watch.engines.vllm import VLLMEngine
    from ckpt_watch.engines.vllm_server import ManagedServer, lora_target_modules
    from ckpt_watch.models import smollm2_dir

    base = smollm2_dir()
    config = bench_config(base, work)
    adapters = [make_adapter(base, work / f"adapter-{i}", seed=i) for i in range(args.swaps)]
    rows: list[tuple[str, float, str]] = []
    reqs = [
        GenerateRequest(messages=[{"role": "user", "content": q}], temperature=0.0, max_tokens=args.max_tokens)
        for q in questions(args.requests)
    ]

    # -- offline LLM.generate first, while no server holds the CPU ---------------------------
    tokenizer = AutoTokenizer.from_pretrained(base)
    prompts = [apply_chat_template(tokenizer, r.messages or []) for r in reqs]
    targets = ",".join(lora_target_modules(base) or [])
    print(f"offline LLM.generate (load average {os.getloadavg()[0]:.1f})", flush=True)
    prompts_file = work / "prompts.json"
    prompts_file.write_text(json.dumps(prompts))
    cmd = [str(VLLM_PYTHON), __file__, "--offline", "--model", str(base), "--prompts", str(prompts_file)]
    offline = subprocess.run(
        [*cmd, "--max-tokens", str(args.max_tokens), "--targets", targets],
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    line = next((x for x in offline.stdout.splitlines() if x.startswith("OFFLINE_RESULT ")), None)
    if line is None:
        raise RuntimeError(f"offline LLM.generate failed (code {offline.returncode}):\n{offline.stderr[-3000:]}")
    off = json.loads(line.removeprefix("OFFLINE_RESULT "))
    print(f"offline: {off['seconds']:.1f} s", flush=True)

    # -- adapter swap: restart the server with the adapter -----------------------------------
    assert config.engine.launch is not None
    static = config.engine.launch.model_copy(update={"extra_args": ["--lora-modules", f"restart={adapters[0]}"]})
    server = ManagedServer(str(base), static, log_path=work / "vllm-server.log", max_lora_rank=8, max_logprobs=20)
    t0 = time.perf_counter()
    server.start()
    engine = VLLMEngine(config, work, server=server)
    await engine.start()
    await engine._http().completions.create(model="restart", prompt=[1, 504], max_tokens=1)
    restart_s = time.perf_counter() - t0
    print(f"server start with adapter → first answer: {restart_s:.1f} s", flush=True)

    try:
        # -- adapter swap: runtime-LoRA route (warm server) -------------------------------------
        swaps = []
        for i, path in enumerate(adapters):
            t0 = time.perf_counter()
            handle = await engine.load(Checkpoint("bench", i + 1, None, path))
            await engine.generate(handle, [GenerateRequest(prompt_ids=[1, 504], max_tokens=1)])
            await engine.unload(handle)
            swaps.append(time.perf_counter() - t0)
        swap_s = sum(swaps) / len(swaps)
        rows.append(("adapter swap: runtime-LoRA route (load+1 req+unload)", swap_s, ""))
        rows.append(("adapter swap: restart server with adapter", restart_s, f"{restart_s / swap_s:.0f}x the route"))

        # -- N generations -----------------------------------------------------------------------
        base_handle = await engine.load(Checkpoint.base("bench"))
        print(f"bare client, engine generations (load average {os.getloadavg()[0]:.1f})", flush=True)
        bare_s, bare_tokens = await bare_client(server, engine.served_model, prompts, args.max_tokens)
        t0 = time.perf_counter()
        together = await engine.generate(base_handle, reqs)
        engine_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for r in reqs:
            await engine.generate(base_handle, [r])
        seq_s = time.perf_counter() - t0
        tokens = sum(len(r.completions[0].token_ids) for r in together)
    finally:
        await engine.close()
        server.stop()

    n = args.requests
    rows.append((f"{n} generations: bare openai client, concurrent ({bare_tokens} tokens)", bare_s, ""))
    rows.append((f"{n} generations: engine, concurrent ({tokens} tokens)", engine_s,
                 f"engine = {engine_s / bare_s:.2f}x bare client"))
    rows.append((f"{n} generations: one at a time", seq_s, f"engine is {seq_s / engine_s:.2f}x faster"))
    rows.append(
        (
            f"{n} generations: vLLM offline LLM.generate ({off['tokens']} tokens)",
            off["seconds"],
            f"bare client = {bare_s / off['seconds']:.2f}x offline, engine = {engine_s / off['seconds']:.2f}x",
        )
    )
    return rows


async def bare_client(server: Any, model: str, prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:
    """The same prompts from a plain AsyncOpenAI client, all in flight at once: what the server
    gives anyone, without ckpt-watch's request options, semaphore or parsing."""
    import openai

    client = openai.AsyncOpenAI(base_url=server.base_url, api_key=server.api_key, timeout=900, max_retries=0)
    try:
        t0 = time.perf_counter()
        resps = await asyncio.gather(*[
            client.completions.create(model=model, prompt=p, max_tokens=max_tokens, temperature=0.0)
            for p in prompts
        ])
        seconds = time.perf_counter() - t0
    finally:
        await client.close()
    return seconds, sum(r.usage.completion_tokens for r in resps if r.usage)


def binding_from_log(log: Path) -> str:
    """vLLM's own account of its OpenMP binding (the last server start in the log)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return "unknown"
    keep = [ln.split("]", 1)[-1].strip() for ln in lines if "core ids=" in ln or "reserved_cpus=" in ln]
    return "; ".join(keep[-2:]) or "not in the log"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--swaps", type=int, default=5)
    parser.add_argument("--offline", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--prompts", help=argparse.SUPPRESS)
    parser.add_argument("--targets", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.offline:
        offline_main(args)
        return
    if not VLLM_PYTHON.exists():
        sys.exit(f"no vLLM interpreter at {VLLM_PYTHON}: scripts/setup.sh --with-vllm or set CKPT_WATCH_VLLM_PYTHON")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        rows = asyncio.run(run_bench(args, Path(tmp)))
        binding = binding_from_log(Path(tmp) / "vllm-server.log")
    print()
    print("\n".join(hardware_lines(dtype="float32", load_before=load_before, vllm_python=VLLM_PYTHON,
                                   server_env={"VLLM_CPU_KVCACHE_SPACE": "1"}, binding=binding)))
    print(f"{'measure':<66} {'seconds':>9}  ratio")
    for name, seconds, ratio in rows:
        print(f"{name:<66} {seconds:>9.3f}  {ratio}")


if __name__ == "__main__":
    main()
