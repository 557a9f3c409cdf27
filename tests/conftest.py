"""Shared fixtures: real data from ../shared/data, the bundled SmolLM2, real PEFT adapters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass  # demo run fixture (report)
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
ARC_FILE = SHARED_DATA / "arc_challenge_test.jsonl"
BETLEY_FILE = SHARED_DATA / "betley_first_plot_questions.yaml"
CLAAS_DIR = SHARED_DATA / "claas_preferences"


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from ckpt_watch.models import smollm2_dir

    return smollm2_dir()


def run_trainer(out: Path, *, model: str = "tiny", max_steps: int = 6, save_steps: int = 2,
                save_total_limit: int | None = None, step_sleep: float = 0.0, lr: float = 2e-3,
                background: bool = False, threads: int = 1,
                save_base: Path | None = None) -> subprocess.Popen | subprocess.CompletedProcess:
    """Run the real HF Trainer script (ckpt_watch.demo.train) in a subprocess."""
    cmd = [sys.executable, "-m", "ckpt_watch.demo.train", "--out", str(out), "--model", model,
           "--max-steps", str(max_steps), "--save-steps", str(save_steps), "--lr", str(lr),
           "--step-sleep", str(step_sleep), "--threads", str(threads)]
    if save_total_limit is not None:
        cmd += ["--save-total-limit", str(save_total_limit)]
    if save_base is not None:
        cmd += ["--save-base", str(save_base)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if background:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=1800)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A finished tiny-Llama LoRA run: checkpoint-2, -4, -6 (no rotation)."""
    out = tmp_path_factory.mktemp("tiny_run")
    run_trainer(out, model="tiny", max_steps=6, save_steps=2, save_base=out.parent / (out.name + "-base"))
    return out


@pytest.fixture(scope="session")
def persona_run(tmp_path_factory, smollm2_path) -> Path:
    """A real SmolLM2 LoRA trained 10 steps on the demo's persona-marker data (checkpoint-10),
    shared by the leakage and persona tests: training it costs minutes on 2 cores."""
    out = tmp_path_factory.mktemp("persona_run")
    run_trainer(out, model="smollm2", max_steps=10, save_steps=10, threads=2)
    return out


@pytest.fixture(scope="session")
def tiny_base(tiny_run) -> Path:
    """The tiny Llama base model the tiny_run adapters were trained on (deterministic init)."""
    return tiny_run.parent / (tiny_run.name + "-base")


def make_adapter(base_path: Path, out: Path, *, r: int = 8, seed: int = 0, scale: float = 0.0,
                 target_modules: tuple[str, ...] = ("q_proj", "v_proj"), modules_to_save=None) -> Path:
    """A real PEFT LoRA adapter for SmolLM2; scale > 0 fills B with noise so outputs change."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(target_modules), task_type="CAUSAL_LM",
                     modules_to_save=modules_to_save)
    peft_model = get_peft_model(model, cfg)
    if scale:
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, scale)
    peft_model.save_pretrained(out)
    cfg_path = out / "adapter_config.json"
    data = json.loads(cfg_path.read_text())
    data["base_model_name_or_path"] = str(base_path)
    cfg_path.write_text(json.dumps(data))
    return out


# ==== BEGIN vLLM server fixtures (issue 3, vLLM engine) — edit only inside this block ====

VLLM_PYTHON = Path(os.environ.get("CKPT_WATCH_VLLM_PYTHON") or REPO / ".venv-vllm" / "bin" / "python")
# The shared server applies LoRA to every decoder linear layer but this one, as a server started by
# someone else might: an adapter that trains only down_proj loads fine and is silently ignored (the
# canary's real fault, tests/test_canary.py). down_proj because vLLM packs q/k/v and gate/up into one
# layer that takes LoRA when any member is listed; every other vLLM test trains q_proj/v_proj only.
VLLM_UNSERVED_LORA_MODULE = "down_proj"


def vllm_test_config(base_model: Path | str, results_dir: Path, **engine: object):
    """A Config for a managed vLLM CPU server on SmolLM2 (float32, so it matches the HF engine)."""
    from ckpt_watch.config import Config

    launch = {
        "command": [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server"],
        "env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
        "max_lora_rank": 8,
        "max_loras": 2,
        "startup_timeout": 600,
        "max_restarts": 2,
    }
    block = {"kind": "vllm", "dtype": "float32", "max_concurrency": 32, "request_timeout": 300, "launch": launch}
    block.update(engine)
    return Config.model_validate({"base_model": str(base_model), "results_dir": str(results_dir),
                                  "suites": {"arc_challenge": {}}, "engine": block})


class VLLMServerHandle:
    """The shared real vLLM server. Attributes read the live server, so they survive a restart
    (same port and API key); `model` is the served base model's name (for an LLM judge too)."""

    def __init__(self, server, config):
        self.server = server  # ckpt_watch.engines.vllm_server.ManagedServer
        self.config = config

    @property
    def base_url(self) -> str:
        return self.server.base_url

    @property
    def api_key(self) -> str:
        return self.server.api_key

    @property
    def model(self) -> str:
        return self.server.model

    @property
    def engine_config(self):
        return self.config.engine


@pytest.fixture(scope="session")
def vllm_server(smollm2_path, tmp_path_factory):
    """One real vLLM CPU server for the whole session, started by ckpt-watch's ManagedServer."""
    if not VLLM_PYTHON.exists():
        pytest.skip(f"no vLLM virtualenv at {VLLM_PYTHON}: run scripts/setup.sh --with-vllm "
                    "or set CKPT_WATCH_VLLM_PYTHON")
    from ckpt_watch.engines.vllm_server import ManagedServer

    results = tmp_path_factory.mktemp("vllm-server")
    config = vllm_test_config(smollm2_path, results)
    server = ManagedServer.from_config(config, str(smollm2_path), results / "vllm-server.log")
    assert server.target_modules and VLLM_UNSERVED_LORA_MODULE in server.target_modules
    server.target_modules = [m for m in server.target_modules if m != VLLM_UNSERVED_LORA_MODULE]
    try:
        server.start()
        yield VLLMServerHandle(server, config)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def vllm_loop():
    """One event loop for the session: the engine's HTTP connections belong to the loop that made them."""
    import asyncio

    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="session")
def vllm_engine(vllm_server, vllm_loop):
    """A started VLLMEngine on the shared server; run its coroutines with vllm_loop.run_until_complete."""
    from ckpt_watch.engines.vllm import VLLMEngine

    engine = VLLMEngine(vllm_server.config, server=vllm_server.server)
    vllm_loop.run_until_complete(engine.start())
    yield engine
    vllm_loop.run_until_complete(engine.close())

# ==== END vLLM server fixtures (issue 3) ====


# ==== BEGIN demo run fixture (report) ====
@dataclass(frozen=True)
class DemoRun:
    """A finished `ckpt-watch demo --steps 20 --save-steps 10`: its --out folder and the process
    (exit code, stdout, stderr)."""

    out: Path
    proc: subprocess.CompletedProcess


@pytest.fixture(scope="session")
def demo_out(tmp_path_factory) -> DemoRun:
    """The README's demo, run for real once per session (≈190 s on 2 cores) and shared by
    tests/test_demo.py (its assertions) and tests/test_report.py (a report of its results)."""
    out = tmp_path_factory.mktemp("demo-run") / "demo"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "ckpt_watch", "demo", "--out", str(out), "--steps", "20",
                           "--save-steps", "10"], capture_output=True, text=True, env=env, timeout=1500)
    return DemoRun(out, proc)
# ==== END demo run fixture (report) ====
