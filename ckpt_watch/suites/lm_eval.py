"""Any lm-evaluation-harness task as a suite: lm-eval's prompts, filters and metrics, our engine.

The suite drives lm-eval's own evaluator (`lm_eval.simple_evaluate`) with `EngineLM`, a
model class of ours implementing lm-eval's model API on the checkpoint's adapter handle
(suites/lm_eval_model.py). Tasks are lm-eval task names, task YAML files or folders of
them (suites/lm_eval_tasks.py); every task is built when the config is validated, so a
task whose data cannot be loaded fails `ckpt-watch validate`, not the first checkpoint.

Metrics: `<task>/<metric>` and `<task>/<metric>_stderr` for every metric lm-eval reports
(groups too), with `/<filter>` appended when a task has more than one filter; with the
suite named `lm_eval` they reach MLflow as `lm_eval/<task>/<metric>`.

`lm_eval` is optional (`pip install 'ckpt-watch[lm-eval]'`): imported only when a config
has this suite.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ckpt_watch.core import ResultStatus, SuiteResult, utcnow
from ckpt_watch.suites.base import SuiteConfigBase, SuiteContext, register_suite

_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-/ :]")


class LmEvalConfig(SuiteConfigBase):
    type: Literal["lm_eval"] = "lm_eval"
    tasks: list[str] = Field(
        min_length=1,
        description="lm-eval task / group / tag names, paths to task YAMLs, or folders of task YAMLs "
                    "(every task in the folder). Relative data_files in a YAML resolve against its folder.",
    )
    overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="task name → task-config keys to replace, e.g. {arc_challenge: {dataset_path: json, "
                    "dataset_name: null, dataset_kwargs: {data_files: {test: local.jsonl}}}} for local data.",
    )
    num_fewshot: int | None = Field(default=None, ge=0, description="Few-shot examples; null = each task's own.")
    limit: int | None = Field(
        default=None, ge=1,
        description="Documents per task: a fixed-seed subsample (like arc_challenge's n), not the first N; "
                    "null = all.",
    )
    seed: int = Field(default=0, description="Seed of the `limit` subsample.")
    batch_size: int = Field(default=256, ge=1, description="Requests handed to the engine per call.")
    apply_chat_template: bool = Field(default=False, description="Render prompts with the model's chat template.")
    system_instruction: str | None = Field(default=None, description="System prompt (lm-eval's system_instruction).")
    gen_kwargs: dict[str, Any] | None = Field(
        default=None, description="Generation settings for generate_until tasks (lm-eval's gen_kwargs)."
    )
    max_length: int | None = Field(
        default=None, ge=2,
        description="Context length for truncation and rolling windows; null = the model's (as lm-eval hf).",
    )
    bootstrap_iters: int = Field(default=100000, ge=0, description="lm-eval's bootstrap_iters for stderrs.")

    @field_validator("tasks")
    @classmethod
    def _no_duplicates(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("a task is listed twice")
        return value

    @model_validator(mode="after")
    def _build_tasks(self) -> LmEvalConfig:
        # building a task loads its data: a task that cannot be loaded fails validation here
        from ckpt_watch.suites.lm_eval_tasks import LmEvalMissing, TaskLoadError

        try:
            _prepared(self)
        except (LmEvalMissing, TaskLoadError) as exc:
            raise ValueError(str(exc)) from None
        return self

    def _key(self) -> str:
        payload = self.model_dump(mode="json", exclude={"every", "at", "at_final", "base"})
        return json.dumps([payload, str(Path.cwd())], sort_keys=True, default=str)

    def config_hash(self) -> str:
        """The options, lm-eval's version and every task's config (and local data) fingerprint."""
        version, fingerprint, _ = _prepared(self)
        h = hashlib.sha256(f"{super().config_hash()}|lm-eval {version}|{fingerprint}".encode())
        return h.hexdigest()[:12]


_PREPARED: dict[str, tuple[str, str, dict[str, int]]] = {}


def _prepared(config: LmEvalConfig) -> tuple[str, str, dict[str, int]]:
    """(lm-eval version, task fingerprint, docs per task), built once per process and config."""
    key = config._key()
    if key not in _PREPARED:
        from ckpt_watch.suites.lm_eval_tasks import build_tasks, require_lm_eval, task_fingerprint

        version = require_lm_eval()
        built = build_tasks(config.tasks, config.overrides)
        _PREPARED[key] = (version, task_fingerprint(built), dict(built.n_docs))
    return _PREPARED[key]


# -- results → metrics and samples ------------------------------------------------------------


def _clean(name: str) -> str:
    return _UNSAFE.sub("_", name)


def flatten_metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """lm-eval's `results` ({task: {"acc,none": v, "acc_stderr,none": s, ...}}) as
    `<task>/<metric>[_stderr][/<filter>]`; the filter only when the task has more than one."""
    out: dict[str, float] = {}
    for task, values in results.items():
        keys = [k for k in values if "," in k]
        filters = {k.split(",", 1)[1] for k in keys}
        for key in keys:
            metric, flt = key.split(",", 1)
            value = values[key]
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue  # "N/A" stderrs
            name = f"{_clean(task)}/{_clean(metric)}" + (f"/{_clean(flt)}" if len(filters) > 1 else "")
            out[name] = float(value)
    return out


def _plain(value: Any) -> Any:
    """JSON-safe copy of a sample field (tuples → lists, numpy scalars → numbers)."""
    try:
        return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
    except (TypeError, ValueError):
        return str(value)


def sample_record(task: str, output_type: str, s: dict[str, Any]) -> dict[str, Any]:
    """One lm-eval logged sample, trimmed: prompt, target, the response or per-choice log-likelihoods."""
    args = s.get("arguments") or []
    rec: dict[str, Any] = {"task": task, "doc_id": s.get("doc_id"), "filter": s.get("filter"),
                           "prompt": args[0][0] if args and args[0] else None, "target": _plain(s.get("target"))}
    resps = [r[0] if isinstance(r, list | tuple) and r else r for r in s.get("resps") or []]
    if output_type == "generate_until":
        rec["response"] = _plain(resps[0] if resps else None)
        rec["filtered"] = _plain((s.get("filtered_resps") or [None])[0])
    elif output_type == "loglikelihood_rolling":
        rec["loglikelihood"] = _plain(resps[0] if resps else None)
    else:  # multiple_choice, loglikelihood: one (log-likelihood, is_greedy) per choice
        rec["choices"] = [_plain(a[1]) if len(a) > 1 else None for a in args]
        rec["loglikelihoods"] = [_plain(r[0]) for r in resps]
        rec["is_greedy"] = [_plain(r[1]) for r in resps]
    rec["metrics"] = {m: _plain(s.get(m)) for m in s.get("metrics") or []}
    return rec


@register_suite("lm_eval", LmEvalConfig, "Any lm-evaluation-harness task (names, YAMLs, local data) via our engine")
class LmEvalSuite:
    def __init__(self, name: str, config: LmEvalConfig):
        self.name = name
        self.config = config

    async def run(self, ctx: SuiteContext) -> SuiteResult:
        from ckpt_watch.suites.lm_eval_model import EngineLM

        started = utcnow()
        loop = asyncio.get_running_loop()
        lm = EngineLM(ctx.engine, ctx.handle, loop, chunk=self.config.batch_size,
                      max_length=self.config.max_length, progress=ctx.progress)
        # its own thread, not the loop's default pool: the worker blocks on engine calls that need
        # that pool (the hf engine's forward passes), so several lm_eval suites at once could starve it
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"lm_eval-{self.name}")
        work = loop.run_in_executor(pool, self.evaluate, lm)
        try:
            out = await asyncio.shield(work)
        except asyncio.CancelledError:
            lm.stop()  # the worker thread ends at its next engine call
            raise
        finally:
            pool.shutdown(wait=False)
        metrics, samples, info = out
        return SuiteResult(suite=self.name, step=ctx.checkpoint.step, status=ResultStatus.OK, metrics=metrics,
                           samples=samples, n_scored=int(metrics.get("n", len(samples))), started_at=started,
                           finished_at=utcnow(), info=info)

    def evaluate(self, lm: Any) -> tuple[dict[str, float], list[dict[str, Any]], dict[str, Any]]:
        """lm-eval's simple_evaluate on freshly built tasks (runs in a worker thread)."""
        import lm_eval
        from lm_eval.tasks import TaskManager

        from ckpt_watch.suites.lm_eval_tasks import build_tasks, subsample_ids

        c = self.config
        built = build_tasks(c.tasks, c.overrides)
        samples = subsample_ids(built.n_docs, c.limit, c.seed)
        res = lm_eval.simple_evaluate(
            model=lm, tasks=built.items, num_fewshot=c.num_fewshot, samples=samples,
            bootstrap_iters=c.bootstrap_iters, log_samples=True, system_instruction=c.system_instruction,
            apply_chat_template=c.apply_chat_template, gen_kwargs=dict(c.gen_kwargs) if c.gen_kwargs else None,
            task_manager=TaskManager(include_defaults=False), torch_random_seed=None,
        )
        return self._collect(res, built.output_types(), built.n_docs)

    @staticmethod
    def _collect(res: dict[str, Any], types: dict[str, str], n_docs: dict[str, int]):
        import lm_eval

        metrics = flatten_metrics(res.get("results", {}))
        evaluated = {t: int((res.get("n-samples", {}).get(t) or {}).get("effective", n_docs.get(t, 0))) for t in types}
        for task, n in evaluated.items():
            metrics[f"{_clean(task)}/n"] = float(n)
        metrics["n"] = float(sum(evaluated.values()))
        samples = [sample_record(task, types.get(task, ""), s)
                   for task, rows in (res.get("samples") or {}).items() for s in rows]
        info = {"lm_eval": {
            "version": str(lm_eval.__version__),
            "tasks": {t: {"output_type": types[t], "n": evaluated[t], "n_docs": n_docs.get(t),
                          "num_fewshot": (res.get("n-shot") or {}).get(t),
                          "version": (res.get("versions") or {}).get(t)} for t in types},
            "higher_is_better": _plain(res.get("higher_is_better") or {}),
        }}
        return metrics, samples, info
