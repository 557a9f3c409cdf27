"""Shared machinery for the fault scenarios: the daemon as a real subprocess whose log lines can be
waited on, configs, result readers, checkpoint copies, and an independent reference for held-out NLL.

Every scenario runs `python -m ckpt_watch run` exactly as a user would and injects its fault from
outside (files, signals, servers, a full filesystem). Nothing in the daemon is patched.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUITES = ("quick", "slow")
N_SLOW_TEXTS = 64  # about 2.5 s per evaluation of the tiny model on one core: long enough to act "mid-suite"


def write_slow_texts(path: Path) -> Path:
    """Deterministic held-out paragraphs for the `slow` suite (written for these tests)."""
    rng = random.Random(0)
    words = ["river", "stone", "bread", "yeast", "prime", "number", "library", "wind", "storm", "sail", "leaf",
             "light", "water", "sugar", "oxygen", "village", "hill", "spring", "bank", "harbour", "baker", "morning"]
    paras = [" ".join(rng.choice(words) for _ in range(60)) + "." for _ in range(N_SLOW_TEXTS)]
    path.write_text("\n\n".join(paras) + "\n")
    return path


def write_config(tmp: Path, base: Path, watch: Path, *, run: str = "run1", results: Path | None = None,
                 settle: float = 0.3, max_attempts: int = 3, order: str = "oldest", suites: str | None = None,
                 mlflow: str = "mlflow: {enabled: false}", engine: str = "engine: {kind: hf, batch_size: 16}",
                 extra: str = "", name: str = "cfg.yaml") -> Path:
    """A daemon config on the HF engine with two held-out suites (`quick`: 6 built-in texts,
    `slow`: N_SLOW_TEXTS paragraphs); `suites`, `mlflow`, `engine` and `extra` replace or add YAML blocks."""
    texts = tmp / "slow_texts.txt"
    if not texts.exists():
        write_slow_texts(texts)
    if suites is None:
        suites = f"""suites:
  quick: {{type: heldout_loss}}
  slow: {{type: heldout_loss, path: {texts}}}"""
    cfg = tmp / name
    cfg.write_text(f"""
base_model: {base}
results_dir: {results or tmp / "results"}
run_name: {run}
watch:
  dir: {watch}
  settle_seconds: {settle}
  rescan_seconds: 30
  max_attempts: {max_attempts}
{engine}
scheduler: {{order: {order}}}
{suites}
{mlflow}
daemon: {{drain_seconds: 5}}
{extra}
""")
    return cfg


class DaemonProc:
    """`ckpt-watch run` in its own process group; a thread collects its log lines so a test can
    wait for "step-4: running slow" and strike at that moment."""

    def __init__(self, cfg: Path, *args: str, env: dict[str, str] | None = None):
        full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ckpt_watch", "run", "-c", str(cfg), *args], env=full_env, cwd=cfg.parent,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self._eof = False
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def count(self, pattern: str) -> int:
        rx = re.compile(pattern)
        with self._cond:
            return sum(1 for line in self.lines if rx.search(line))

    def wait_line(self, pattern: str, timeout: float, *, after: int = 0) -> int:
        """Index of the first line at or after `after` matching `pattern`; fails with the log."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        i = after
        with self._cond:
            while True:
                while i < len(self.lines):
                    if rx.search(self.lines[i]):
                        return i
                    i += 1
                if self._eof:
                    self.proc.wait(timeout=30)
                    raise AssertionError(f"daemon exited ({self.proc.returncode}) before a line matching "
                                         f"{pattern!r}:\n{self._tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no line matching {pattern!r} within {timeout:.0f} s:\n{self._tail()}")
                self._cond.wait(min(left, 0.5))

    def _tail(self, n: int = 60) -> str:
        return "\n".join(self.lines[-n:])

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.close()
            raise AssertionError(f"daemon still running after {timeout:.0f} s:\n{self.output()[-6000:]}") from None
        self._reader.join(timeout=10)
        return code

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (drain, then exit 0 expected)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def sigkill(self) -> None:
        """A crash: SIGKILL to the daemon process itself, no drain, no cleanup."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._reader.join(timeout=10)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def __enter__(self) -> DaemonProc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- reading what the daemon wrote ---------------------------------------------------------------


def metric_lines(results: Path, run: str) -> list[dict[str, Any]]:
    path = results / run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_record(results: Path, run: str, step: int, suite: str) -> dict[str, Any] | None:
    path = results / run / f"step-{step}" / f"{suite}.json"
    return json.loads(path.read_text()) if path.exists() else None


def json_duplicates(results: Path, run: str) -> int:
    """Lines of metrics.jsonl beyond one per (step, suite)."""
    counts = Counter((m["step"], m["suite"]) for m in metric_lines(results, run))
    return sum(n - 1 for n in counts.values())


def ledger_rows(results: Path, sql: str) -> list[tuple]:
    """Rows from the daemon's ledger, read-only; none while the daemon has not created it yet
    (the file can exist a moment before its tables do)."""
    path = results / "ledger.sqlite"
    if not path.exists():
        return []
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            return db.execute(sql).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise


def eval_states(results: Path) -> dict[tuple[int, str], tuple[str, int, str | None]]:
    """(step, suite) → (state, attempts, error) from the ledger."""
    rows = ledger_rows(results, "SELECT step, suite, state, attempts, error FROM evals")
    return {(r[0], r[1]): (r[2], r[3], r[4]) for r in rows}


def checkpoint_states(results: Path) -> dict[int, tuple[str, str | None]]:
    """step → (state, error) from the ledger's checkpoints table."""
    rows = ledger_rows(results, "SELECT step, state, error FROM checkpoints")
    return {r[0]: (r[1], r[2]) for r in rows}


def wait_until(predicate: Any, timeout: float, what: str, daemon: DaemonProc | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if daemon is not None and daemon.proc.poll() is not None:
            raise AssertionError(f"daemon exited ({daemon.proc.returncode}) while waiting for {what}:\n"
                                 f"{daemon.output()[-6000:]}")
        time.sleep(0.2)
    tail = daemon.output()[-6000:] if daemon is not None else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")


# -- checkpoints --------------------------------------------------------------------------------


def place_checkpoint(src: Path, watch: Path, step: int) -> Path:
    """Copy a real checkpoint folder in as `checkpoint-<step>` the way a finished save looks:
    staged in a hidden folder (ignored by the watcher), `global_step` set, then renamed in."""
    watch.mkdir(parents=True, exist_ok=True)
    stage = watch / f".stage-{step}"
    shutil.rmtree(stage, ignore_errors=True)
    shutil.copytree(src, stage)
    state_file = stage / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["global_step"] = step
    state_file.write_text(json.dumps(state))
    dest = watch / f"checkpoint-{step}"
    os.replace(stage, dest)
    return dest


def populate(tiny_run: Path, watch: Path, steps: Iterable[int] = (2, 4, 6)) -> None:
    for step in steps:
        place_checkpoint(tiny_run / f"checkpoint-{step}", watch, step)


# -- an independent reference for the held-out suites ---------------------------------------------


@dataclass(frozen=True)
class Reference:
    """Held-out NLL per (step, suite) computed here with plain transformers + peft, one text at a
    time and a freshly loaded model per checkpoint: what an honest result must equal."""

    nll: dict[tuple[int, str], float]

    def check(self, record: dict[str, Any], step: int, suite: str, tol: float = 2e-4) -> None:
        want = self.nll[(step, suite)]
        got = record["metrics"]["nll"]
        assert record["status"] == "ok", record.get("error")
        assert abs(got - want) <= tol, f"step {step} {suite}: nll {got} but the reference says {want}"


def reference_nll(base: Path, adapter: Path | None, texts: list[str], tokenizer: Any) -> float:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ckpt_watch.suites.heldout import score_request

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    total, count = 0.0, 0
    reqs = [score_request(tokenizer, text) for text in texts]
    with torch.inference_mode():
        for i in range(0, len(reqs), 16):  # right-padded batches: a causal model's real positions are unaffected
            batch = reqs[i : i + 16]
            seqs = [r.context_ids + r.continuation_ids for r in batch]
            width = max(len(q) for q in seqs)
            ids = torch.tensor([q + [0] * (width - len(q)) for q in seqs])
            mask = torch.tensor([[1] * len(q) + [0] * (width - len(q)) for q in seqs])
            logps = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
            for b, r in enumerate(batch):
                start, cont = len(r.context_ids), torch.tensor(r.continuation_ids)
                rows = logps[b, start - 1 : start - 1 + len(cont)]
                total -= float(rows.gather(1, cont[:, None]).sum())
                count += len(cont)
    return total / count


def build_reference(base: Path, run_dir: Path, texts_file: Path, steps: Iterable[int] = (0, 2, 4, 6)) -> Reference:
    import torch
    from transformers import AutoTokenizer

    from ckpt_watch.suites.heldout import BUILTIN_TEXTS, load_texts

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(base)
    slow = load_texts(texts_file)
    nll: dict[tuple[int, str], float] = {}
    for step in steps:
        adapter = None if step == 0 else run_dir / f"checkpoint-{step}"
        nll[(step, "quick")] = reference_nll(base, adapter, list(BUILTIN_TEXTS), tokenizer)
        nll[(step, "slow")] = reference_nll(base, adapter, slow, tokenizer)
    return Reference(nll)


# -- MLflow -------------------------------------------------------------------------------------


def mlflow_block(uri: str, experiment: str, flush_seconds: float = 0.5) -> str:
    return (f"mlflow: {{enabled: true, tracking_uri: '{uri}', experiment: {experiment}, "
            f"flush_seconds: {flush_seconds}, log_samples: true}}")


def mlflow_run(uri: str, experiment: str, run: str) -> tuple[Any, list[Any]]:
    """(client, runs) for the runs ckpt-watch made for `run` in `experiment`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return client, []
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`ckpt_watch.run_name` = '{run}'")
    return client, runs


def mlflow_points(uri: str, experiment: str, run: str) -> dict[str, list[tuple[int, float, int]]]:
    """metric key → every (step, value, timestamp) MLflow holds for it (get_metric_history)."""
    client, runs = mlflow_run(uri, experiment, run)
    assert len(runs) == 1, f"expected one MLflow run for {run}, found {len(runs)}"
    run_id = runs[0].info.run_id
    return {key: sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key))
            for key in runs[0].data.metrics}


def mlflow_tables(uri: str, experiment: str, run: str, suite: str) -> list[str]:
    client, runs = mlflow_run(uri, experiment, run)
    return sorted(f.path for f in client.list_artifacts(runs[0].info.run_id, f"samples/{suite}"))


def mlflow_duplicates(points: dict[str, list[tuple[int, float, int]]]) -> int:
    """Points beyond one per (metric key, step)."""
    return sum(len(p) - len({s for s, _, _ in p}) for p in points.values())
