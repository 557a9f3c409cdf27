"""Pick the engine the config asks for; heavy imports happen only for the chosen kind."""

from __future__ import annotations

from pathlib import Path

from ckpt_watch.config import Config
from ckpt_watch.engines.base import Engine


def make_engine(config: Config, results_dir: Path | None = None) -> Engine:
    if config.engine.kind == "hf":
        from ckpt_watch.engines.hf import HFEngine

        return HFEngine(config.base_model, config.engine)
    from ckpt_watch.engines.replicas import make_vllm_engine  # one server: a plain VLLMEngine

    return make_vllm_engine(config, results_dir=results_dir)
