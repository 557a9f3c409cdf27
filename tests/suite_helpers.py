"""Helpers for the suite tests: a real HF engine on SmolLM2, and running one suite on a checkpoint."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from ckpt_watch.config import EngineConfig
from ckpt_watch.core import Checkpoint, CheckpointKind, SuiteResult
from ckpt_watch.engines.hf import HFEngine
from ckpt_watch.suites.base import SuiteContext, build_suite


def make_engine(base: Path, batch_size: int = 16) -> HFEngine:
    engine = HFEngine(str(base), EngineConfig(batch_size=batch_size))
    asyncio.run(engine.start())
    return engine


def adapter_checkpoint(run: str, step: int, adapter_dir: Path) -> Checkpoint:
    return Checkpoint(run=run, step=step, path=adapter_dir, adapter_dir=adapter_dir, kind=CheckpointKind.ADAPTER)


def run_suite(engine: HFEngine, name: str, config: Any, checkpoint: Checkpoint,
              baseline: SuiteResult | None = None) -> SuiteResult:
    """Load the checkpoint, run the suite on it, unload: what the daemon does for one step."""

    async def go() -> SuiteResult:
        handle = await engine.load(checkpoint)
        try:
            ctx = SuiteContext(engine=engine, handle=handle, checkpoint=checkpoint, run_name=checkpoint.run,
                               baseline=baseline)
            return await build_suite(name, config).run(ctx)
        finally:
            await engine.unload(handle)

    return asyncio.run(go())
