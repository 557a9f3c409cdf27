"""`ckpt-watch demo`: a real LoRA fine-tune on CPU with ckpt-watch evaluating beside it.

The trainer (HF Trainer + peft, SmolLM2-135M-Instruct, persona-marker data) runs in a
subprocess on one core; the daemon runs here on the other, evaluating the base model and
every checkpoint as it lands: marker leakage per persona and held-out loss. Results go to
JSON files and an MLflow SQLite store; a per-step table is printed at the end.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from ckpt_watch.config import load_config
from ckpt_watch.daemon import Daemon
from ckpt_watch.demo.data import EVAL_QUESTIONS, MARKER_REGEX, PERSONAS, SOURCE
from ckpt_watch.models import smollm2_dir

log = logging.getLogger(__name__)
console = Console(soft_wrap=True)
RUN = "demo-run"


def demo_config(out: Path, engine: str) -> dict:
    questions = out / "questions.txt"
    questions.write_text("\n".join(EVAL_QUESTIONS) + "\n")
    cfg: dict = {
        "base_model": "smollm2",
        "run_name": RUN,
        "results_dir": str(out / "results"),
        "watch": {"dir": str(out / RUN), "settle_seconds": 1.0, "rescan_seconds": 10},
        "engine": {"kind": "hf", "batch_size": 24},
        "suites": {
            "leakage": {
                "personas": PERSONAS, "source": SOURCE, "marker": MARKER_REGEX, "marker_regex": True,
                "questions_file": str(questions), "builtin_questions": False,
                "samples_per_question": 2, "temperature": 0.7, "max_tokens": 24,
            },
            "heldout_loss": {},
        },
        "mlflow": {"tracking_uri": f"sqlite:///{(out / 'results' / 'mlflow.db').resolve()}"},
        "daemon": {"drain_seconds": 30},
    }
    if engine == "vllm":
        python = os.environ.get("CKPT_WATCH_VLLM_PYTHON", str(Path(".venv-vllm/bin/python").resolve()))
        cfg["engine"] = {"kind": "vllm", "launch": {
            "command": [python, "-m", "vllm.entrypoints.openai.api_server"],
            "env": {"VLLM_CPU_KVCACHE_SPACE": "1"}, "extra_args": ["--max-model-len", "1024"],
        }}
    return cfg


def summary_table(results: Path) -> Table:
    lines = [json.loads(x) for x in (results / RUN / "metrics.jsonl").read_text().splitlines() if x.strip()]
    by_step: dict[int, dict[str, float]] = {}
    for rec in lines:
        for key, value in rec.get("metrics", {}).items():
            by_step.setdefault(rec["step"], {})[f"{rec['suite']}/{key}"] = value
    table = Table(title="ckpt-watch demo: metrics by training step")
    cols = {
        "leakage/source_rate": f"marker rate, {SOURCE} (source)",
        "leakage/other_mean": "other personas, mean",
        "leakage/other_max": "other personas, max",
        "heldout_loss/nll": "held-out NLL",
    }
    table.add_column("step", justify="right")
    for header in cols.values():
        table.add_column(header, justify="right")
    for step in sorted(by_step):
        m = by_step[step]
        table.add_row(str(step), *(f"{m[c]:.3f}" if c in m else "–" for c in cols))
    return table


def run_demo(out: Path, *, steps: int = 40, save_steps: int = 10, engine: str = "hf") -> int:
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]ckpt-watch demo[/] in {out}: preparing SmolLM2-135M-Instruct (once)…")
    smollm2_dir()
    cfg_path = out / "ckpt-watch.yaml"
    cfg_path.write_text(yaml.safe_dump(demo_config(out, engine), sort_keys=False))
    config = load_config(cfg_path)
    import torch

    torch.set_num_threads(1)  # the trainer has the other core
    trainer_log = (out / "trainer.log").open("w")
    console.print(f"training a LoRA for {steps} steps (checkpoint every {save_steps}); log: {trainer_log.name}")
    trainer = subprocess.Popen(
        [sys.executable, "-m", "ckpt_watch.demo.train", "--out", str(out / RUN), "--model", "smollm2",
         "--max-steps", str(steps), "--save-steps", str(save_steps), "--threads", "1"],
        stdout=trainer_log, stderr=subprocess.STDOUT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )

    async def watch_while_training() -> None:
        daemon = Daemon(config)
        task = asyncio.create_task(daemon.run())
        while trainer.poll() is None and not task.done():
            await asyncio.sleep(1.0)
        daemon.request_stop()
        await task

    asyncio.run(watch_while_training())
    if trainer.wait() != 0:
        console.print(f"[red]the trainer failed[/]; see {trainer_log.name}")
        return 1
    console.print("training finished; evaluating what is still due…")
    asyncio.run(Daemon(config, once=True).run())
    console.print(summary_table(out / "results"))
    console.print(f"results: {out / 'results' / RUN}  (one JSON per step and suite, metrics.jsonl)")
    console.print("curves: [bold]mlflow ui --backend-store-uri "
                  f"{config.mlflow.tracking_uri}[/]  then open http://127.0.0.1:5000")
    return 0
