"""Shared fixtures: real data from ../shared/data, the bundled SmolLM2, real PEFT adapters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
                background: bool = False, threads: int = 1) -> subprocess.Popen | subprocess.CompletedProcess:
    """Run the real HF Trainer script (ckpt_watch.demo.train) in a subprocess."""
    cmd = [sys.executable, "-m", "ckpt_watch.demo.train", "--out", str(out), "--model", model,
           "--max-steps", str(max_steps), "--save-steps", str(save_steps), "--lr", str(lr),
           "--step-sleep", str(step_sleep), "--threads", str(threads)]
    if save_total_limit is not None:
        cmd += ["--save-total-limit", str(save_total_limit)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if background:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=1800)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A finished tiny-Llama LoRA run: checkpoint-2, -4, -6 (no rotation)."""
    out = tmp_path_factory.mktemp("tiny_run")
    run_trainer(out, model="tiny", max_steps=6, save_steps=2)
    return out


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
