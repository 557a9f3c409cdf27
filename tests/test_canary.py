"""The adapter canary on real engines: the HF engine on SmolLM2 and the shared real vLLM CPU server.

The silent no-op faults are real: a vLLM server whose --lora-target-modules leaves out down_proj
(the shared fixture, tests/conftest.py) accepts an adapter that trains only down_proj and serves
the base model for it (vLLM 0.32 logs "No LoRA weights were applied" at debug level only); the HF
engine loads an adapter whose weight names are keyed for another model's layout and PEFT only
warns about "missing adapter keys". Measured figures are printed (run with -s).
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckpt_watch import canary
from ckpt_watch.canary import AdapterMismatch, AdapterNoEffect, CanaryResult, adapter_is_zero, run_canary
from ckpt_watch.config import EngineConfig
from ckpt_watch.core import AdapterHandle, Checkpoint, EngineError
from ckpt_watch.engines.hf import HFEngine
from tests.conftest import VLLM_UNSERVED_LORA_MODULE, make_adapter

NO_EFFECT = "adapter had no effect in the engine: "


@pytest.fixture(scope="module")
def adapters(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("canary-adapters")
    out = {
        "zero": make_adapter(smollm2_path, root / "zero", r=8),
        "noisy": make_adapter(smollm2_path, root / "noisy", r=8, scale=0.2, seed=1),
        "faint": make_adapter(smollm2_path, root / "faint", r=8, scale=1e-4, seed=1),
        "down": make_adapter(smollm2_path, root / "down", r=8, scale=0.2, seed=2,
                             target_modules=(VLLM_UNSERVED_LORA_MODULE,)),
    }
    out["miskeyed"] = _rekeyed(out["noisy"], root / "miskeyed", "model.model.layers.", "model.transformer.h.")
    return out


def _rekeyed(src: Path, dst: Path, old: str, new: str, dtype: torch.dtype | None = None) -> Path:
    """A copy of a real adapter with its tensor names (or dtype) rewritten."""
    dst.mkdir()
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    state = load_file(src / "adapter_model.safetensors")
    save_file({k.replace(old, new): v.to(dtype or v.dtype) for k, v in state.items()},
              dst / "adapter_model.safetensors", metadata={"format": "pt"})
    return dst


def ckpt(path: Path, step: int, run: str = "c") -> Checkpoint:
    return Checkpoint(run=run, step=step, path=None, adapter_dir=path)


@pytest.fixture(scope="module")
def hf(smollm2_path: Path):
    engine = HFEngine(str(smollm2_path), EngineConfig(dtype="float32"))
    asyncio.run(engine.start())
    return engine


async def _canary(engine, adapter: Path, step: int, **kw) -> CanaryResult:
    handle = await engine.load(ckpt(adapter, step))
    try:
        return await run_canary(engine, handle, None, adapter, **kw)
    finally:
        await engine.unload(handle)


# -- the adapter's weights -------------------------------------------------------------------


def test_zero_weights_are_told_from_real_adapter_files(adapters, tmp_path: Path) -> None:
    assert adapter_is_zero(adapters["zero"]) is True  # PEFT's initial lora_B
    assert adapter_is_zero(adapters["noisy"]) is False
    assert adapter_is_zero(adapters["faint"]) is False  # 1e-4 noise is not zero
    # torchtune saves bfloat16 (numpy cannot read it; the safetensors torch reader can), and -0.0 is zero
    bf16 = _rekeyed(adapters["zero"], tmp_path / "bf16", "", "", dtype=torch.bfloat16)
    assert adapter_is_zero(bf16) is True
    neg = tmp_path / "neg"
    neg.mkdir()
    zero_state = load_file(adapters["zero"] / "adapter_model.safetensors")
    state = {k: (-v if "lora_B" in k else v) for k, v in zero_state.items()}
    save_file(state, neg / "adapter_model.safetensors")
    assert adapter_is_zero(neg) is True
    # anything besides LoRA A/B may change the output (modules_to_save copies, DoRA magnitudes)
    extra = tmp_path / "extra"
    extra.mkdir()
    save_file({**state, "base_model.model.lm_head.modules_to_save.default.weight": torch.zeros(2, 2)},
              extra / "adapter_model.safetensors")
    assert adapter_is_zero(extra) is False
    assert adapter_is_zero(tmp_path / "missing") is None


def test_probe_is_short_and_stable(hf) -> None:
    req = canary.probe_request(hf.tokenizer)
    assert len(req.context_ids) == 1 and 8 <= len(req.continuation_ids) <= canary.MAX_PROBE_TOKENS
    assert canary.probe_hash(req) == canary.probe_hash(canary.probe_request(hf.tokenizer))
    assert canary.probe_hash(req) != canary.probe_hash(canary.probe_request(hf.tokenizer, "Another probe text."))
    assert canary.default_tolerance(hf) == canary.TOLERANCE_FP32
    assert canary.default_tolerance(HFEngine("m", EngineConfig(dtype="bfloat16"))) == canary.TOLERANCE_16BIT


# -- HF engine ------------------------------------------------------------------------------


def test_hf_random_adapter_is_ok_zero_adapter_is_noop(hf, adapters) -> None:
    async def body() -> dict[str, CanaryResult]:
        return {k: await _canary(hf, adapters[k], i + 1) for i, k in enumerate(("noisy", "faint", "zero", "down"))}

    res = asyncio.run(body())
    print("\nHF canary:", json.dumps({k: r.as_dict() for k, r in res.items()}))
    noisy, faint, zero = res["noisy"], res["faint"], res["zero"]
    assert noisy.status == "ok" and noisy.max_abs_delta > 1.0 and noisy.zero_weights is False
    assert 0 < noisy.mean_abs_delta < noisy.max_abs_delta
    # B ~ N(0, 1e-4) on q/v: weaker than one real optimizer step at lr 1e-5 (max Δ 1.6e-3 measured), still
    # well above the tolerance
    assert faint.status == "ok" and faint.max_abs_delta > 5 * canary.TOLERANCE_FP32
    assert zero.status == "noop" and zero.max_abs_delta == 0.0 and zero.zero_weights is True
    assert res["down"].status == "ok" and res["down"].max_abs_delta > 0.1  # HF applies down_proj LoRA
    assert noisy.n_tokens == zero.n_tokens == len(canary.probe_request(hf.tokenizer).continuation_ids)
    assert noisy.probe_hash == zero.probe_hash
    # what the evaluator records: a JSON object and two plottable metrics
    assert json.loads(json.dumps(noisy.as_dict()))["status"] == "ok"
    assert noisy.metrics() == {"canary/max_abs_delta": noisy.max_abs_delta,
                               "canary/mean_abs_delta": noisy.mean_abs_delta}


def test_hf_misskeyed_adapter_has_no_effect(hf, adapters) -> None:
    """Weights keyed for another model's layout: PEFT loads the file, matches none of its tensors
    (a warning only) and the engine serves the base model. The canary turns that into an error."""
    with pytest.raises(AdapterNoEffect) as info, pytest.warns(UserWarning, match="missing adapter keys"):
        asyncio.run(_canary(hf, adapters["miskeyed"], 20))
    err = info.value
    assert isinstance(err, EngineError) and str(err).startswith(NO_EFFECT)
    assert "--lora-target-modules" in str(err) and "q_proj, v_proj" in str(err) and "reused name" in str(err)
    assert err.result.status == "no_effect" and err.result.max_abs_delta == 0.0
    assert err.result.zero_weights is False  # its B matrices are the noisy ones, only renamed


def test_zero_snapshot_but_other_weights_served_is_a_mismatch(hf, adapters) -> None:
    """The engine serves the noisy adapter while the snapshot the canary reads is all zero (as when
    stale weights sit under a reused name): neither a no-op nor ok."""

    async def body() -> None:
        handle = await hf.load(ckpt(adapters["noisy"], 25))
        try:
            await run_canary(hf, handle, None, adapters["zero"])
        finally:
            await hf.unload(handle)

    with pytest.raises(AdapterMismatch, match=r"all zero .* other weights") as info:
        asyncio.run(body())
    assert info.value.result.status == "mismatch" and info.value.result.max_abs_delta > 1.0


def test_base_scores_are_cached_per_engine(hf, adapters) -> None:
    """The base model does not change: its probe is scored once per engine, not once per load."""
    calls: list[bool] = []
    real_score = hf.score

    async def counting(handle, requests):
        calls.append(handle.is_base)
        return await real_score(handle, requests)

    async def body() -> tuple[CanaryResult, CanaryResult]:
        hf.score = counting
        try:
            first = await _canary(hf, adapters["noisy"], 30)
            second = await _canary(hf, adapters["noisy"], 31)
        finally:
            del hf.score
        return first, second

    canary._base_scores.pop(hf, None)
    first, second = asyncio.run(body())
    assert calls == [True, False, False]
    assert first == second


def test_base_handle_is_refused(hf) -> None:
    base = AdapterHandle(Checkpoint.base("c"), None)
    with pytest.raises(ValueError, match="base handle"):
        asyncio.run(run_canary(hf, base, base, Path("unused")))


# -- the real vLLM CPU server ------------------------------------------------------------------


@pytest.fixture
def attached(vllm_server, vllm_loop):
    """A VLLMEngine attached to the shared server by URL (no client-side checks of its modules)."""
    from ckpt_watch.engines.vllm import VLLMEngine

    os.environ["CKPT_WATCH_TEST_CANARY_KEY"] = vllm_server.api_key
    config = vllm_server.config.model_copy(update={"engine": EngineConfig(
        kind="vllm", url=vllm_server.base_url, api_key_env="CKPT_WATCH_TEST_CANARY_KEY", dtype="float32")})
    engine = VLLMEngine(config)
    vllm_loop.run_until_complete(engine.start())
    yield engine
    vllm_loop.run_until_complete(engine.close())


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_server_silently_ignores_adapter_outside_its_target_modules(
    attached, vllm_engine, vllm_loop, hf, adapters
) -> None:
    """The server answers 200 to the load, lists the adapter, and serves the base model for it."""

    async def body() -> CanaryResult:
        handle = await attached.load(ckpt(adapters["down"], 40))
        models = [m.id for m in (await attached._http().models.list()).data]
        assert handle.name in models  # loaded, as far as the server says
        try:
            with pytest.raises(AdapterNoEffect) as info:
                await run_canary(attached, handle, None, adapters["down"])
        finally:
            await attached.unload(handle)
        assert str(info.value).startswith(NO_EFFECT) and "down_proj" in str(info.value)
        return info.value.result

    ignored = vllm_loop.run_until_complete(body())
    applied = asyncio.run(_canary(hf, adapters["down"], 41))
    print(f"\nvLLM ignored down_proj adapter: {ignored.as_dict()}; HF applies it: {applied.as_dict()}")
    assert ignored.status == "no_effect" and ignored.max_abs_delta <= canary.TOLERANCE_FP32
    assert applied.max_abs_delta > 0.1
    # the managed engine knows its server's modules and refuses the adapter up front instead
    with pytest.raises(EngineError, match="down_proj"):
        vllm_loop.run_until_complete(vllm_engine.load(ckpt(adapters["down"], 42)))


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_canary_agrees_with_hf(vllm_engine, vllm_loop, hf, adapters) -> None:
    """ok / noop through vLLM as through HF, the same Δ within 1e-3; and vLLM's own noise, measured."""
    from ckpt_watch.engines.base import ScoreRequest

    async def on_vllm() -> tuple[dict[str, CanaryResult], dict[str, float]]:
        res = {k: await _canary(vllm_engine, adapters[k], 50 + i) for i, k in enumerate(("noisy", "faint", "zero"))}
        tok = vllm_engine.tokenizer
        req = canary.probe_request(tok)
        base = AdapterHandle(Checkpoint.base("c"), None)
        # noise: the base rescored alone, and rescored while batched with eight other requests
        (b1,), (b2,) = await vllm_engine.score(base, [req]), await vllm_engine.score(base, [req])
        crowd = [ScoreRequest(tok.encode(f"Sentence number {i} is"), tok.encode(" here.")) for i in range(8)]
        b3 = (await vllm_engine.score(base, [*crowd, req]))[-1]
        noise = {
            "rescored": max(abs(x - y) for x, y in zip(b1.token_logprobs, b2.token_logprobs, strict=True)),
            "batched": max(abs(x - y) for x, y in zip(b1.token_logprobs, b3.token_logprobs, strict=True)),
        }
        hf_base = (await hf.score(base, [req]))[0]
        noise["vllm_vs_hf_base"] = max(
            abs(x - y) for x, y in zip(b1.token_logprobs, hf_base.token_logprobs, strict=True))
        return res, noise

    res, noise = vllm_loop.run_until_complete(on_vllm())
    ref = {k: asyncio.run(_canary(hf, adapters[k], 60 + i)) for i, k in enumerate(("noisy", "faint", "zero"))}
    figures = {k: {"vllm": res[k].as_dict(), "hf": ref[k].as_dict()} for k in res}
    print(f"\nvLLM vs HF canary: {json.dumps(figures)}\nvLLM noise: {json.dumps(noise)}")
    assert res["noisy"].status == "ok" and res["faint"].status == "ok" and res["zero"].status == "noop"
    assert res["zero"].max_abs_delta <= canary.TOLERANCE_FP32
    for k in ("noisy", "faint", "zero"):
        assert abs(res[k].max_abs_delta - ref[k].max_abs_delta) <= 1e-3
        assert abs(res[k].mean_abs_delta - ref[k].mean_abs_delta) <= 1e-3
        assert res[k].probe_hash == ref[k].probe_hash
    assert max(noise["rescored"], noise["batched"]) <= canary.TOLERANCE_FP32 / 10


@pytest.mark.slow
@pytest.mark.vllm
def test_evaluator_fails_the_checkpoint_when_the_server_ignores_the_adapter(
    attached, vllm_loop, adapters, tmp_path
) -> None:
    """Through the evaluator (claim → load → canary → suites → sinks → ledger), on the attached real
    server: the ignored adapter's suites are failed with the canary's message, never a base-model
    result under the adapter's step; a zero-init adapter is evaluated and reported as a no-op."""
    from ckpt_watch.config import SchedulerConfig, parse_config
    from ckpt_watch.evaluate import Evaluator
    from ckpt_watch.ledger import EvalState, Ledger
    from ckpt_watch.scheduler import Scheduler
    from ckpt_watch.sinks.jsonfiles import JsonSink

    suites = parse_config({"base_model": "x", "suites": {"quick": {"type": "heldout_loss", "max_texts": 2}}}).suites
    ledger = Ledger(tmp_path / "ledger.sqlite")
    sched = Scheduler(ledger, "c", suites, SchedulerConfig())
    sink = JsonSink(tmp_path)
    sink.start("c", {})
    evaluator = Evaluator(attached, [sink], ledger, "c", tmp_path, max_attempts=3)
    for step, name in ((10, "down"), (20, "zero")):
        sched.plan(step, False)
        vllm_loop.run_until_complete(evaluator.evaluate(ckpt(adapters[name], step), sched.pending()[step],
                                                        lambda: False))
    h = sched.suites["quick"].hash
    failed = ledger.eval_row("c", 10, "quick", h)
    assert failed.state is EvalState.FAILED and failed.error.startswith("canary: " + NO_EFFECT)
    record = json.loads((tmp_path / "c" / "step-10" / "quick.json").read_text())
    assert record["status"] == "error" and record["metrics"] == {}
    assert record["info"]["canary"]["status"] == "no_effect"
    noop = json.loads((tmp_path / "c" / "step-20" / "quick.json").read_text())
    assert noop["status"] == "ok" and noop["info"]["canary"]["status"] == "noop"
    assert ledger.eval_row("c", 20, "quick", h).state is EvalState.DONE
    assert evaluator.failed == 1
