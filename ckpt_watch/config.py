"""Configuration: YAML → `${ENV}` interpolation → pydantic models, validated once.

Every error is reported with its dotted path (`suites.arc.n`) so `ckpt-watch validate`
can print them all at once; the rest of the program only ever sees a valid `Config`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ckpt_watch.suites.base import suite_types

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WatchConfig(_Model):
    dir: Path | None = Field(default=None, description="Trainer output directory to watch (or --watch).")
    layout: Literal["hf", "torchtune", "glob"] = "hf"
    pattern: str | None = Field(default=None, description="glob layout: folder pattern, e.g. 'ckpt_*'.")
    step_regex: str | None = Field(
        default=None, description="glob layout: regex with one group capturing the step from the folder name."
    )
    polling: Literal["auto"] | bool = Field(
        default="auto", description="true: PollingObserver; auto: polling on network/FUSE mounts."
    )
    poll_interval: float = Field(default=1.0, gt=0, description="PollingObserver interval, seconds.")
    settle_seconds: float = Field(default=2.0, ge=0, description="A checkpoint must be unchanged this long.")
    rescan_seconds: float = Field(default=30.0, gt=0, description="Full rescan period; events only hint.")
    max_attempts: int = Field(default=5, ge=1, description="Invalid-but-stable checkpoint: tries before failed.")

    @model_validator(mode="after")
    def _glob_needs_pattern(self) -> WatchConfig:
        if self.layout == "glob":
            if not self.pattern:
                raise ValueError("layout 'glob' needs 'pattern'")
            if not self.step_regex:
                raise ValueError("layout 'glob' needs 'step_regex'")
        if self.step_regex is not None:
            try:
                rx = re.compile(self.step_regex)
            except re.error as exc:
                raise ValueError(f"step_regex does not compile: {exc}") from exc
            if rx.groups < 1:
                raise ValueError("step_regex needs one capturing group for the step")
        return self


class LaunchConfig(_Model):
    command: list[str] = Field(
        default_factory=lambda: ["vllm", "serve"],
        description="How to start vLLM; the CPU build needs [python, -m, vllm.entrypoints.openai.api_server].",
    )
    gpu: int | str | None = Field(default=None, description="GPU index/indices → CUDA_VISIBLE_DEVICES.")
    port: int | None = Field(default=None, description="Loopback port; default a free one.")
    max_lora_rank: int | None = Field(default=None, description="Default: from the adapters' r, rounded up.")
    max_loras: int = Field(default=2, ge=1)
    max_logprobs: int | None = Field(default=None, description="Default: what the suites need (≥ 20).")
    extra_args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    startup_timeout: float = Field(default=900.0, gt=0)
    max_restarts: int = Field(default=3, ge=0)


class EngineConfig(_Model):
    kind: Literal["hf", "vllm"] = "hf"
    device: str = Field(default="cpu", description="hf engine: 'cpu', 'cuda', 'cuda:1'.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    batch_size: int = Field(default=16, ge=1, description="hf engine: sequences per forward pass.")
    max_concurrency: int = Field(default=64, ge=1, description="Requests in flight at once.")
    url: str | None = Field(default=None, description="vllm: attach to this server (…/v1).")
    api_key_env: str | None = Field(default=None, description="vllm attach: env var holding the API key.")
    launch: LaunchConfig | None = Field(default=None, description="vllm: start and manage a server.")
    request_timeout: float = Field(default=600.0, gt=0)
    max_retries: int = Field(default=3, ge=0)
    on_base_mismatch: Literal["warn", "refuse"] = "warn"

    @model_validator(mode="after")
    def _vllm_mode(self) -> EngineConfig:
        if self.kind == "vllm" and (self.url is None) == (self.launch is None):
            raise ValueError("engine.kind 'vllm' needs exactly one of 'url' (attach) or 'launch' (managed)")
        return self


class JudgeConfig(_Model):
    model: str = Field(description="Judge model name as the endpoint knows it.")
    base_url: str | None = Field(default=None, description="OpenAI-compatible endpoint; null = OpenAI.")
    api_key_env: str | None = Field(default="OPENAI_API_KEY", description="Env var with the API key.")
    method: Literal["auto", "logprob", "digits"] = Field(
        default="auto", description="logprob: single-token 0–100 (Betley); digits: multi-token numbers."
    )
    tokenizer: str | None = Field(default=None, description="Judge tokenizer (path/id) for 'auto' detection.")
    max_concurrency: int = Field(default=16, ge=1)
    timeout: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=5, ge=0)
    cache: bool = True


class MlflowConfig(_Model):
    enabled: bool = True
    tracking_uri: str | None = Field(
        default=None, description="Default: $MLFLOW_TRACKING_URI, else sqlite under results_dir."
    )
    experiment: str = "ckpt-watch"
    run_id: str | None = Field(default=None, description="Attach to this run (or $MLFLOW_RUN_ID).")
    log_samples: bool = True
    flush_seconds: float = Field(default=5.0, gt=0, description="MLflow retry period; new results go at once.")


class SchedulerConfig(_Model):
    order: Literal["newest", "oldest"] = Field(
        default="newest", description="newest keeps the curve current and backfills when idle."
    )
    base: bool = Field(default=True, description="Evaluate the base model as step 0 first.")


class DaemonConfig(_Model):
    drain_seconds: float = Field(default=60.0, ge=0, description="On SIGTERM, wait this long for the suite.")
    max_suite_attempts: int = Field(default=3, ge=1, description="Tries per (step, suite) before failed.")


def _suite_config_type() -> Any:
    models = tuple(t.config_model for t in suite_types().values())
    member = Union[models] if len(models) > 1 else models[0]  # noqa: UP007
    return Annotated[member, Field(discriminator="type")]


SuiteConfig = _suite_config_type()


class Config(_Model):
    base_model: str = Field(description="Base model: a local HF folder, a hub id, or 'smollm2' (bundled).")
    run_name: str | None = Field(default=None, description="Default: the watch folder's name.")
    results_dir: Path = Field(default=Path("results"), description="Ledger, results, MLflow db, snapshots.")
    watch: WatchConfig = Field(default_factory=WatchConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    suites: dict[str, SuiteConfig] = Field(  # type: ignore[valid-type]
        description="name → suite block; `type` defaults to the name."
    )
    judge: JudgeConfig | None = None
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    daemon: DaemonConfig = Field(default_factory=DaemonConfig)

    @field_validator("suites", mode="before")
    @classmethod
    def _default_suite_type(cls, value: Any) -> Any:
        if not isinstance(value, dict) or not value:
            raise ValueError("needs at least one suite, as a mapping name → settings")
        blocks: dict[str, Any] = {}
        for name, block in value.items():
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(name)):
                raise ValueError(f"suite name '{name}' may only hold letters, digits, '_', '.', '-'")
            block = dict(block or {})
            block.setdefault("type", name)
            blocks[name] = block
        return blocks

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        if any(s.needs_judge() for s in self.suites.values()):
            if self.judge is None:
                raise ValueError("a suite needs an LLM judge: add a 'judge' block")
            env = self.judge.api_key_env
            if env and not os.environ.get(env):
                raise ValueError(f"judge.api_key_env: environment variable {env} is not set")
        key_env = self.engine.api_key_env
        if self.engine.kind == "vllm" and self.engine.url and key_env and not os.environ.get(key_env):
            raise ValueError(f"engine.api_key_env: environment variable {key_env} is not set")
        return self

    def resolved_run_name(self) -> str:
        if self.run_name:
            return self.run_name
        if self.watch.dir is None:
            raise ConfigError([("watch.dir", "no watch directory: set watch.dir or pass --watch")])
        return Path(self.watch.dir).resolve().name

    def max_logprobs(self) -> int:
        return max([20, *(s.max_logprobs() for s in self.suites.values())])


class ConfigError(Exception):
    """Invalid configuration; `errors` is a list of (dotted path, reason)."""

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = errors
        super().__init__("\n".join(f"{path}: {reason}" for path, reason in errors))


def interpolate_env(node: Any, path: str = "", missing: list[tuple[str, str]] | None = None) -> Any:
    """Replace `${VAR}` / `${VAR:-default}` in every string; collect unset variables."""
    if missing is None:
        missing = []
    if isinstance(node, dict):
        return {k: interpolate_env(v, f"{path}.{k}" if path else str(k), missing) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate_env(v, f"{path}.{i}", missing) for i, v in enumerate(node)]
    if isinstance(node, str):

        def sub(m: re.Match[str]) -> str:
            value = os.environ.get(m.group(1))
            if value is None:
                if m.group(2) is not None:
                    return m.group(2)
                missing.append((path, f"environment variable {m.group(1)} is not set"))
                return ""
            return value

        return _ENV_RE.sub(sub, node)
    return node


def _dotted(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc]
    # pydantic puts the discriminator tag after the suite name: suites.arc.arc_challenge.n
    if len(parts) > 2 and parts[0] == "suites" and parts[2] in suite_types():
        del parts[2]
    return ".".join(parts) or "(top level)"


def parse_config(raw: Any) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError([("(top level)", "the config must be a YAML mapping")])
    missing: list[tuple[str, str]] = []
    data = interpolate_env(raw, missing=missing)
    if missing:
        raise ConfigError(missing)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        errors = []
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            errors.append((_dotted(err["loc"]), msg))
        raise ConfigError(errors) from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Read, interpolate and validate a YAML config. Raises ConfigError with every problem."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ConfigError([(str(p), "config file not found")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([(str(p), f"not valid YAML: {exc}")]) from None
    for dotted, value in (overrides or {}).items():
        node = raw
        *head, last = dotted.split(".")
        for key in head:
            node = node.setdefault(key, {})
        node[last] = value
    return parse_config(raw)
