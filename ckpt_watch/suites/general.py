"""General capability retention (CLaaS's `general` metric): a coding task and instruction probes.

- coding: the model writes a Python function; its code is extracted from the reply and run
  in the sandbox (ckpt_watch.sandbox: separate, network-less, resource-limited process) on
  hidden inputs; the daemon compares the returned values with the expected ones. A task is
  correct when every hidden test passes. `coding_correct` = share of correct tasks (CLaaS:
  its one `fibonacci` task, so 0 or 1).
- probes: IFEval-style instructions with programmatic checks; `ifeval_pass_rate` = share
  passed. CLaaS's three checks are built in; the others come from lm-evaluation-harness's
  IFEval instruction registry (extra `ifeval`).
- score = 0.5·coding_correct + 0.5·ifeval_pass_rate (CLaaS's general_score);
  capability_ratio = score / the base model's score (step 0); 1.0 when the base scored 0,
  as CLaaS's summary does.

Defaults follow CLaaS's protocol: its coding prompt and three probes, one greedy answer
each (temperature 0), its default system prompt, a 2048-token budget, its code extraction
and, for `fibonacci`, its seven builtins. Model code never runs without a sandbox: when
none works the suite fails and says why.
"""

from __future__ import annotations

import asyncio
import functools
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from ckpt_watch.core import ResultStatus, SuiteResult, utcnow
from ckpt_watch.engines.base import GenerateRequest, Message
from ckpt_watch.sandbox import Builtins, Call, RunOutcome, Sandbox, SandboxOptions, SandboxUnavailable, same_value
from ckpt_watch.suites.base import SuiteConfigBase, SuiteContext, register_suite
from ckpt_watch.suites.compliance import count_sentences, strip_thinking
from ckpt_watch.suites.leakage import hash_with_files

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
EXTENDED_CODING = DATA_DIR / "general_coding.yaml"
EXTENDED_PROBES = DATA_DIR / "general_probes.yaml"
# claas/core/config.py DEFAULT_SYSTEM_PROMPT and claas/eval/metrics/capability.py GENERAL_MAX_TOKENS
CLAAS_SYSTEM_PROMPT = "You are a helpful assistant."
CLAAS_MAX_TOKENS = 2048


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- data: coding tasks -------------------------------------------------------------------------


class HiddenTest(_Strict):
    args: list[Any]
    expected: Any


class CodingTask(_Strict):
    id: str
    prompt: str
    function: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    builtins: Builtins = "full"
    tests: list[HiddenTest] = Field(min_length=1)


def load_coding_tasks(path: Path) -> list[CodingTask]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty YAML list of tasks")
    tasks = TypeAdapter(list[CodingTask]).validate_python(data)
    _unique([t.id for t in tasks], f"{path}: task")
    return tasks


def claas_coding_tasks() -> list[CodingTask]:
    """CLaaS's single task: the first entry of the bundled file (its prompt, its three checks)."""
    return load_coding_tasks(EXTENDED_CODING)[:1]


# -- data: probes -------------------------------------------------------------------------------


class SentenceCount(_Strict):
    kind: Literal["sentence_count"]
    equals: int = Field(ge=1)

    def passes(self, text: str, prompt: str) -> bool:
        return count_sentences(text) == self.equals


class NumberedList(_Strict):
    kind: Literal["numbered_list"]
    min_items: int = Field(ge=1)

    def passes(self, text: str, prompt: str) -> bool:
        return len(re.findall(r"^\s*\d+[.)]\s+", text, re.MULTILINE)) >= self.min_items


class ForbiddenWord(_Strict):
    kind: Literal["forbidden_word"]
    word: str = Field(min_length=1)

    def passes(self, text: str, prompt: str) -> bool:
        # CLaaS: a case-insensitive substring test ("functions" and "dysfunctional" count too)
        return self.word.lower() not in text.lower()


class IFEvalCheck(_Strict):
    kind: Literal["ifeval"]
    instruction: str = Field(description="An IFEval instruction id, e.g. 'punctuation:no_comma'.")
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _usable(self) -> IFEvalCheck:
        self.build("")
        try:
            self.passes("Sample reply. It has two sentences.", "")
        except LookupError as exc:  # NLTK data (punkt) missing
            raise ValueError(f"IFEval instruction '{self.instruction}' cannot run here: {exc}") from exc
        return self

    def build(self, prompt: str) -> Any:
        registry = ifeval_registry()
        if self.instruction not in registry:
            raise ValueError(f"unknown IFEval instruction '{self.instruction}'")
        inst = registry[self.instruction](self.instruction)
        try:
            inst.build_description(**{k: v for k, v in self.kwargs.items() if v})
            args = inst.get_instruction_args()
            if args and "prompt" in args:
                inst.build_description(prompt=prompt)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"IFEval instruction '{self.instruction}' rejects kwargs {self.kwargs}: {exc}") from exc
        return inst

    def passes(self, text: str, prompt: str) -> bool:
        # lm-eval's strict mode: an empty reply never follows an instruction
        return bool(text.strip()) and bool(self.build(prompt).check_following(text))


Check = Annotated[SentenceCount | NumberedList | ForbiddenWord | IFEvalCheck, Field(discriminator="kind")]


class Probe(_Strict):
    id: str
    prompt: str
    check: Check


@functools.cache
def ifeval_registry() -> dict[str, Any]:
    """lm-evaluation-harness's IFEval instruction registry (id → checker class)."""
    try:
        from lm_eval.tasks.ifeval import instructions_registry
    except ImportError as exc:
        raise ValueError(
            f"IFEval probes need lm-evaluation-harness's IFEval checkers ({exc}): pip install 'ckpt-watch[ifeval]'"
        ) from exc
    return dict(instructions_registry.INSTRUCTION_DICT)


def load_probes(path: Path) -> list[Probe]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty YAML list of probes")
    probes = TypeAdapter(list[Probe]).validate_python(data)
    _unique([p.id for p in probes], f"{path}: probe")
    return probes


# CLaaS's IFEVAL_PROBES (claas/eval/metrics/capability.py), prompts and checks as there
CLAAS_PROBES: tuple[Probe, ...] = (
    Probe(id="three_sentences", prompt="Write exactly 3 sentences about Python.",
          check=SentenceCount(kind="sentence_count", equals=3)),
    Probe(id="numbered_list", prompt="List 5 benefits of exercise. Use numbered list.",
          check=NumberedList(kind="numbered_list", min_items=5)),
    Probe(id="no_word_function", prompt="Explain recursion without using the word 'function'.",
          check=ForbiddenWord(kind="forbidden_word", word="function")),
)


def _unique(ids: list[str], what: str) -> None:
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"{what} ids defined twice: {', '.join(dupes)}")


# -- config -------------------------------------------------------------------------------------


class GeneralConfig(SuiteConfigBase):
    type: Literal["general"] = "general"
    coding: Literal["claas", "extended"] = Field(
        default="claas",
        description="claas: CLaaS's one fibonacci task; extended: it plus the bundled tasks "
        "(data/general_coding.yaml).",
    )
    coding_file: Path | None = Field(default=None, description="Coding tasks YAML; replaces `coding`.")
    probes: Literal["claas", "extended"] = Field(
        default="claas",
        description="claas: CLaaS's three probes; extended: they plus IFEval-registry probes "
        "(data/general_probes.yaml, extra `ifeval`).",
    )
    probes_file: Path | None = Field(default=None, description="Probes YAML; replaces `probes`.")
    system_prompt: str | None = Field(default=CLAAS_SYSTEM_PROMPT, description="System turn (CLaaS's default).")
    temperature: float = Field(default=0.0, ge=0, description="CLaaS: 0 (greedy).")
    max_tokens: int = Field(default=CLAAS_MAX_TOKENS, ge=1, description="Token budget per answer (CLaaS: 2048).")
    code_extraction: Literal["claas", "fenced_or_whole"] = Field(
        default="claas",
        description="claas: first ``` block, else from the first `def` (CLaaS); fenced_or_whole: all "
        "```python blocks, else the first bare ``` block, else the whole reply.",
    )
    sandbox: SandboxOptions = Field(default_factory=SandboxOptions)

    @field_validator("coding_file")
    @classmethod
    def _coding_file(cls, value: Path | None) -> Path | None:
        if value is not None:
            if not value.is_file():
                raise ValueError(f"file {value} does not exist")
            load_coding_tasks(value)
        return value

    @field_validator("probes_file")
    @classmethod
    def _probes_file(cls, value: Path | None) -> Path | None:
        if value is not None:
            if not value.is_file():
                raise ValueError(f"file {value} does not exist")
            load_probes(value)
        return value

    @model_validator(mode="after")
    def _probe_set_loads(self) -> GeneralConfig:
        if self.probes_file is None and self.probes == "extended":
            load_probes(EXTENDED_PROBES)  # fails here, at validate, without the ifeval extra
        return self

    def config_hash(self) -> str:
        return hash_with_files(super().config_hash(), [self.coding_file, self.probes_file])

    def coding_tasks(self) -> list[CodingTask]:
        if self.coding_file is not None:
            return load_coding_tasks(self.coding_file)
        return load_coding_tasks(EXTENDED_CODING) if self.coding == "extended" else claas_coding_tasks()

    def probe_list(self) -> list[Probe]:
        if self.probes_file is not None:
            return load_probes(self.probes_file)
        return load_probes(EXTENDED_PROBES) if self.probes == "extended" else list(CLAAS_PROBES)


# -- pure functions -----------------------------------------------------------------------------

_CLAAS_FENCE = re.compile(r"```(?:python)?\s*\n(.*?)```", re.DOTALL)
_PY_FENCE = re.compile(r"```(?:python|py|python3)[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_BARE_FENCE = re.compile(r"```[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(reply: str, method: str = "claas") -> str:
    """The program in a model's reply (`<think>` blocks already stripped by the caller)."""
    if method == "fenced_or_whole":
        blocks = _PY_FENCE.findall(reply)
        if blocks:
            return "\n\n".join(b.strip() for b in blocks)
        bare = _BARE_FENCE.search(reply)
        return (bare.group(1) if bare else reply).strip()
    match = _CLAAS_FENCE.search(reply)
    if match:
        return match.group(1).strip()
    return _claas_def_scan(reply)


def _claas_def_scan(reply: str) -> str:
    """CLaaS's fallback, line for line: from the first `def` line on, up to and including the
    first later line that is not indented, a comment or another `def`."""
    code_lines: list[str] = []
    in_code = False
    for line in reply.split("\n"):
        if line.strip().startswith("def "):
            in_code = True
        if in_code:
            code_lines.append(line)
            if line.strip() and not line.strip().startswith(("#", "def", " ", "\t")):
                break
    return "\n".join(code_lines).strip()


def has_docstring(code: str) -> bool:
    return '"""' in code or "'''" in code


def grade(task: CodingTask, outcome: RunOutcome) -> tuple[bool, list[dict[str, Any]]]:
    """(all hidden tests passed, one record per test) from what the sandboxed run returned."""
    calls = outcome.calls or []
    records = []
    for i, test in enumerate(task.tests):
        got = calls[i] if i < len(calls) else {"ok": False, "error": outcome.load_error or outcome.error}
        ok = bool(got.get("ok")) and same_value(got.get("value"), test.expected)
        records.append({"args": test.args, "expected": test.expected, "got": got.get("value"),
                        "error": got.get("error"), "passed": ok})
    return bool(records) and all(r["passed"] for r in records), records


def capability_ratio(score: float, baseline: dict[str, float] | None, *, is_base: bool) -> float:
    """score / base score; 1.0 on the base and when the base scored 0 (CLaaS); NaN without a base."""
    if is_base:
        return 1.0
    base = (baseline or {}).get("score", float("nan"))
    if not math.isfinite(base):
        return float("nan")
    return score / base if base > 0 else 1.0


def _messages(system: str | None, prompt: str) -> list[Message]:
    user: Message = {"role": "user", "content": prompt}
    return [{"role": "system", "content": system}, user] if system is not None else [user]


@register_suite("general", GeneralConfig, "General capability (CLaaS): sandboxed coding tasks + instruction probes")
class GeneralSuite:
    headline = ("capability_ratio", "score")  # what `ckpt-watch status` shows (issue 14)

    def __init__(self, name: str, config: GeneralConfig):
        self.name = name
        self.config = config
        self.tasks = config.coding_tasks()
        self.probes = config.probe_list()
        self.sandbox = Sandbox(config.sandbox)

    async def run(self, ctx: SuiteContext) -> SuiteResult:
        started = utcnow()
        try:
            await asyncio.to_thread(self.sandbox.ensure)
        except SandboxUnavailable as exc:
            return SuiteResult.failure(
                self.name, ctx.checkpoint.step,
                f"no sandbox for model-written code, so none is run: {exc}", started_at=started,
            )
        cfg = self.config
        prompts = [t.prompt for t in self.tasks] + [p.prompt for p in self.probes]
        reqs = [GenerateRequest(messages=_messages(cfg.system_prompt, p), n=1, temperature=cfg.temperature,
                                max_tokens=cfg.max_tokens, seed=i) for i, p in enumerate(prompts)]
        results = await ctx.engine.generate(ctx.handle, reqs)
        replies = [r.completions[0].text for r in results]
        ctx.progress(1, 2)
        samples: list[dict[str, Any]] = []
        correct, docstrings = await self._coding(replies[: len(self.tasks)], samples)
        passes = self._probes(replies[len(self.tasks):], samples)
        ctx.progress(2, 2)
        metrics = self._metrics(correct, docstrings, passes, ctx)
        return SuiteResult(
            suite=self.name, step=ctx.checkpoint.step, status=ResultStatus.OK, metrics=metrics, samples=samples,
            n_scored=len(self.tasks) + len(self.probes), started_at=started, finished_at=utcnow(),
        )

    async def _coding(self, replies: list[str], samples: list) -> tuple[list[bool], list[bool]]:
        correct, docstrings = [], []
        for task, reply in zip(self.tasks, replies, strict=True):
            code = extract_code(strip_thinking(reply), self.config.code_extraction)
            calls = [Call(task.function, t.args) for t in task.tests]
            if code:
                outcome = await asyncio.to_thread(self.sandbox.run, code, calls, builtins=task.builtins)
                passed, tests = grade(task, outcome)
                record = outcome.record()
            else:
                passed, tests, record = False, [], None  # nothing to run (CLaaS: incorrect)
            correct.append(passed)
            docstrings.append(has_docstring(code))
            samples.append({"kind": "coding", "task": task.id, "prompt": task.prompt, "response": reply,
                            "code": code, "has_docstring": docstrings[-1], "passed": passed, "tests": tests,
                            "sandbox": record})
        return correct, docstrings

    def _probes(self, replies: list[str], samples: list) -> list[bool]:
        passes = []
        for probe, reply in zip(self.probes, replies, strict=True):
            passed = probe.check.passes(strip_thinking(reply), probe.prompt)
            passes.append(passed)
            samples.append({"kind": "probe", "probe": probe.id, "prompt": probe.prompt, "response": reply,
                            "check": probe.check.kind, "passed": passed})
        return passes

    def _metrics(self, correct: list[bool], docstrings: list[bool], passes: list[bool],
                 ctx: SuiteContext) -> dict[str, float]:
        coding = sum(correct) / len(correct) if correct else 0.0
        probe_rate = sum(passes) / len(passes) if passes else 0.0
        score = 0.5 * coding + 0.5 * probe_rate
        base = ctx.baseline.metrics if ctx.baseline is not None else None
        return {
            "coding_correct": coding,
            "coding_has_docstring": sum(docstrings) / len(docstrings) if docstrings else 0.0,
            "ifeval_pass_rate": probe_rate,
            "score": score,
            "capability_ratio": capability_ratio(score, base, is_base=ctx.handle.is_base),
        }
