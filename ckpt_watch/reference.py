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
        out += [f"## {title}", "", *_table(model), ""]
    out += ["## suites", "", "`suites` maps a name (used in metric keys) to a block; `type` defaults to the name.", ""]
    for name, st in sorted(suite_types().items()):
        out += [f"### `{name}`", "", st.summary, "", *_table(st.config_model), ""]
    return "\n".join(out)
