"""`ckpt-watch demo`: a real LoRA fine-tune on CPU with ckpt-watch evaluating beside it.

The trainer (HF Trainer + peft, SmolLM2-135M-Instruct, persona-marker data) runs in a
subprocess on one core; the daemon runs here on the other, evaluating the base model and
every checkpoint as it lands: marker leakage per persona and held-out loss. Results go to
JSON files and an MLflow SQLite store; a per-step table is printed at the end. The trainer
is stopped on every way out of the demo (an evaluation error, Ctrl-C), never left behind.

`--engine vllm` evaluates through a managed vLLM CPU server started from
`$CKPT_WATCH_VLLM_PYTHON`, else the project's `.venv-vllm/bin/python` (what
`scripts/setup.sh --with-vllm` makes), checked to import vllm before anything starts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO

import yaml
from rich.console import Console
from rich.table import Table

import ckpt_watch
from ckpt_watch.config import Config, load_config
from ckpt_watch.daemon import Daemon
from ckpt_watch.demo.data import EVAL_QUESTIONS, MARKER_REGEX, PERSONAS, SOURCE
from ckpt_watch.engines.preflight import VLLMPreflightError, check_vllm_python
from ckpt_watch.models import smollm2_dir

log = logging.getLogger(__name__)
console = Console(soft_wrap=True)
RUN = "demo-run"
VLLM_PYTHON_ENV = "CKPT_WATCH_VLLM_PYTHON"
VENV_PYTHON = Path(".venv-vllm") / "bin" / "python"
TRAINER_STOP_SECONDS = 10.0  # SIGTERM, then SIGKILL after this long


class DemoError(Exception):
    """The demo cannot run as asked (e.g. no interpreter with vLLM); the text says how to fix it."""


def project_root() -> Path | None:
    """The checkout ckpt_watch runs from (an editable install), or None when it is installed as a
    package (site-packages has no pyproject.toml beside the package)."""
    root = Path(ckpt_watch.__file__).absolute().parent.parent
    return root if (root / "pyproject.toml").is_file() else None


PROJECT_ROOT = project_root()


def vllm_python(environ: Mapping[str, str] | None = None, root: Path | None = PROJECT_ROOT) -> str:
    """The interpreter for the demo's vLLM server: $CKPT_WATCH_VLLM_PYTHON, then the project's
    .venv-vllm/bin/python — the first that imports vllm. Paths are used as given (absolute, never
    resolved: a venv's bin/python is a symlink to the base interpreter, which has no vllm).
    `root`: the checkout whose .venv-vllm to try; None when there is none (a package install)."""
    environ = os.environ if environ is None else environ
    tried: list[str] = []
    candidates: list[tuple[str, Path]] = []
    if environ.get(VLLM_PYTHON_ENV):
        candidates.append((f"${VLLM_PYTHON_ENV}", Path(environ[VLLM_PYTHON_ENV]).absolute()))
    else:
        tried.append(f"${VLLM_PYTHON_ENV} is not set")
    if root is not None:
        candidates.append(("the project's .venv-vllm", root / VENV_PYTHON))
    else:
        tried.append("no project .venv-vllm: ckpt-watch is installed as a package, not run from a checkout")
    for i, (label, python) in enumerate(candidates):
        try:
            check_vllm_python(python)
            return str(python)
        except VLLMPreflightError as exc:
            tried.append(f"{label}: {exc.reason}")
            if i + 1 < len(candidates):
                log.warning("%s: %s; trying %s", label, exc.reason, candidates[i + 1][0])
    raise DemoError(
        "--engine vllm needs a Python interpreter that imports vllm, and none was found:\n  - "
        + "\n  - ".join(tried)
        + f"\nRun `bash scripts/setup.sh --with-vllm` in the checkout (it makes .venv-vllm), or set "
        f"{VLLM_PYTHON_ENV} to such an interpreter (a virtualenv's bin/python)."
    )


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
        python = vllm_python()
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


def start_trainer(out: Path, steps: int, save_steps: int, log_file: IO[str]) -> subprocess.Popen:
    """The real HF Trainer run, in a subprocess on one thread, writing checkpoints under out/RUN."""
    return subprocess.Popen(
        [sys.executable, "-m", "ckpt_watch.demo.train", "--out", str(out / RUN), "--model", "smollm2",
         "--max-steps", str(steps), "--save-steps", str(save_steps), "--threads", "1"],
        stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )


def stop_trainer(trainer: subprocess.Popen, grace: float = TRAINER_STOP_SECONDS) -> None:
    """SIGTERM the trainer if it still runs, SIGKILL it after `grace` seconds; always reap it."""
    if trainer.poll() is not None:
        return
    log.warning("stopping the trainer (pid %d)", trainer.pid)
    trainer.terminate()
    try:
        trainer.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        trainer.kill()
        trainer.wait()


async def watch_while_training(config: Config, trainer: subprocess.Popen) -> int:
    """Run the daemon until the trainer exits (or the daemon stops: Ctrl-C, an error)."""
    daemon = Daemon(config)
    task = asyncio.create_task(daemon.run())
    while trainer.poll() is None and not task.done():
        await asyncio.sleep(1.0)
    daemon.request_stop()
    return await task


def run_demo(out: Path, *, steps: int = 40, save_steps: int = 10, engine: str = "hf") -> int:
    """Train beside a live daemon, evaluate what is still due, print the table. Exit code."""
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        cfg = demo_config(out, engine)
    except DemoError as exc:
        console.print(f"[red]{exc}[/]", highlight=False)
        return 2
    console.print(f"[bold]ckpt-watch demo[/] in {out}: preparing SmolLM2-135M-Instruct (once)…")
    smollm2_dir()
    cfg_path = out / "ckpt-watch.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    config = load_config(cfg_path)
    import torch

    torch.set_num_threads(1)  # the trainer has the other core
    with (out / "trainer.log").open("w") as trainer_log:
        console.print(f"training a LoRA for {steps} steps (checkpoint every {save_steps}); log: {trainer_log.name}")
        trainer = start_trainer(out, steps, save_steps, trainer_log)
        try:
            code = asyncio.run(watch_while_training(config, trainer))
            if trainer.poll() is None:
                console.print("[red]evaluation stopped before training finished[/]; stopping the trainer")
                return code or 1
        finally:
            stop_trainer(trainer)
    if trainer.returncode != 0:
        console.print(f"[red]the trainer failed[/] (exit code {trainer.returncode}); see {trainer_log.name}")
        return 1
    console.print("training finished; evaluating what is still due…")
    code = asyncio.run(Daemon(config, once=True).run())
    console.print(summary_table(out / "results"))
    console.print(f"results: {out / 'results' / RUN}  (one JSON per step and suite, metrics.jsonl)")
    console.print("curves: [bold]mlflow ui --backend-store-uri "
                  f"{config.mlflow.tracking_uri}[/]  then open http://127.0.0.1:5000")
    return code
