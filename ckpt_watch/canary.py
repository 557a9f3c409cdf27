"""The canary: did the adapter actually change the engine's model?

A load can succeed while the engine goes on serving the base model: a server whose
`--lora-target-modules` excludes the adapter's layers applies none of it, a load route can
answer 200 for weights it never applied, a reused name can serve stale weights (DESIGN §6).
Only a measured difference from the base model proves the adapter is applied, so after
every load one short fixed probe is scored with the adapter and with the base model and
the per-token log-probs are compared:

- the adapter's weights are provably zero (every `lora_B` all zero: PEFT's initial state)
  → status "noop", a result like any other (the curve's first point may be one);
- non-zero weights but max |Δ log-prob| within float noise → `AdapterNoEffect`;
- otherwise → status "ok", with the Δ (also a cheap "how far has training moved" signal).

The base model's probe scores are cached per engine: the base does not change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from ckpt_watch.core import AdapterHandle, Checkpoint, EngineError
from ckpt_watch.engines.base import Engine, ScoreRequest

log = logging.getLogger(__name__)

# plain prose any causal LM scores with confidence; fixed, so the probe hash is stable
PROBE_TEXT = (
    "The old lighthouse keeper climbed the narrow stairs every evening, lit the great lamp, "
    "and wrote the weather in his log."
)
MAX_PROBE_TOKENS = 24

# Largest max |Δ log-prob| (nats) between adapter and base that still counts as "the same
# model". Measured on SmolLM2 in float32 (tests/test_canary.py prints them): a zero adapter vs
# the base, the base rescored, and the base batched with eight other requests all differ by
# exactly 0.0, on the HF engine and on vLLM's CPU server alike; the two engines differ from each
# other by 1.5e-5 on the probe and 5e-5 at most over 738 ARC tokens (the size of a different
# kernel path). The weakest real adapter measured, one optimizer step at lr 1e-5, moves the probe
# by 1.6e-3 (lr 1e-4: 2.5e-2). 1e-4 is twice the worst cross-engine noise, 16x below that step.
# 16-bit weights round every matmul to 8 (bf16) or 11 (fp16) mantissa bits, so a different kernel
# path costs far more than in float32: the tolerance is wider. On the HF engine in bf16 a zero or
# ignored adapter still measured exactly 0.0 and every non-zero one >= 0.09 (even B ~ N(0, 1e-5));
# 2e-2 stays below that. Not measured on a 16-bit vLLM server (none on this CPU-only machine).
TOLERANCE_FP32 = 1e-4
TOLERANCE_16BIT = 2e-2

Status = Literal["ok", "noop", "no_effect", "mismatch"]

_LORA_A = re.compile(r"(^|\.)lora_(embedding_)?A(\.|$)")
_LORA_B = re.compile(r"(^|\.)lora_(embedding_)?B(\.|$)")

_base_scores: weakref.WeakKeyDictionary[Any, dict[str, list[float]]] = weakref.WeakKeyDictionary()


class AdapterNoEffect(EngineError):
    """A non-zero adapter whose log-probs equal the base model's: the engine did not apply it."""

    def __init__(self, message: str, result: CanaryResult):
        super().__init__(message)
        self.result = result


class AdapterMismatch(EngineError):
    """An all-zero adapter whose log-probs differ from the base model's: the engine applied
    other weights than these (a stale adapter under a reused name)."""

    def __init__(self, message: str, result: CanaryResult):
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class CanaryResult:
    status: Status  # "no_effect" / "mismatch" only inside the exceptions' `result`
    max_abs_delta: float  # nats, over the probe's continuation tokens
    mean_abs_delta: float
    n_tokens: int
    probe_hash: str  # of the scored token ids: two results compare only under one hash
    tolerance: float
    zero_weights: bool | None  # None: the weights could not be read to tell

    def as_dict(self) -> dict[str, Any]:
        """For a result's `info["canary"]` (JSON-ready)."""
        return asdict(self)

    def metrics(self) -> dict[str, float]:
        return {"canary/max_abs_delta": self.max_abs_delta, "canary/mean_abs_delta": self.mean_abs_delta}


async def run_canary(
    engine: Engine,
    handle: AdapterHandle,
    base_handle: AdapterHandle | None = None,
    adapter_dir: Path | None = None,
    *,
    tolerance: float | None = None,
    probe: str = PROBE_TEXT,
) -> CanaryResult:
    """Score the probe with `handle` (a loaded adapter) and the base model; decide as the module says.

    `base_handle` defaults to the base of the adapter's run (`AdapterHandle(Checkpoint.base(run), None)`),
    `adapter_dir` to the checkpoint's snapshot, `tolerance` to the engine's dtype's. Raises
    `AdapterNoEffect` / `AdapterMismatch` (both `EngineError`); the engine's own errors pass through."""
    if handle.is_base:
        raise ValueError("the canary compares an adapter with the base model: got the base handle")
    if base_handle is None:
        base_handle = AdapterHandle(Checkpoint.base(handle.checkpoint.run), None)
    adapter_dir = Path(adapter_dir or handle.checkpoint.adapter_dir or "")
    req = probe_request(engine.tokenizer, probe)
    phash = probe_hash(req)
    base = await _base_logprobs(engine, base_handle, req, phash)
    (res,) = await engine.score(handle, [req])
    deltas = _deltas(res.token_logprobs, base)
    tol = default_tolerance(engine) if tolerance is None else tolerance
    zero = adapter_is_zero(adapter_dir)
    worst = max(deltas)
    same = worst <= tol
    status: Status = ("noop" if same else "mismatch") if zero else ("no_effect" if same else "ok")
    result = CanaryResult(status, worst, sum(deltas) / len(deltas), len(deltas), phash, tol, zero)
    if status == "mismatch":
        raise AdapterMismatch(_mismatch_message(handle, result), result)
    if status == "no_effect":
        raise AdapterNoEffect(_no_effect_message(handle, adapter_dir, result), result)
    log.info("%s: canary %s, max |Δ log-prob| %.3g", handle.checkpoint.label, status, worst)
    return result


def probe_request(tokenizer: Any, text: str = PROBE_TEXT) -> ScoreRequest:
    """The probe as one score request: the first token is the context, the rest is scored."""
    ids = list(tokenizer.encode(text))[: MAX_PROBE_TOKENS + 1]
    if len(ids) < 2:
        raise ValueError(f"canary probe {text!r} is shorter than two tokens")
    return ScoreRequest(context_ids=ids[:1], continuation_ids=ids[1:])


def probe_hash(req: ScoreRequest) -> str:
    ids = [*req.context_ids, *req.continuation_ids]
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:12]


async def _base_logprobs(engine: Engine, base_handle: AdapterHandle, req: ScoreRequest, phash: str) -> list[float]:
    try:
        cache = _base_scores.setdefault(engine, {})
    except TypeError:  # an engine that cannot be weakly referenced: no cache
        cache = {}
    if phash not in cache:
        (res,) = await engine.score(base_handle, [req])
        cache[phash] = list(res.token_logprobs)
    return cache[phash]


def _deltas(adapter: list[float], base: list[float]) -> list[float]:
    if len(adapter) != len(base) or not base:
        raise EngineError(f"canary: engine scored {len(adapter)} probe tokens with the adapter, {len(base)} without")
    # a non-finite log-prob is never "the same as the base"
    return [abs(a - b) if math.isfinite(a - b) else math.inf for a, b in zip(adapter, base, strict=True)]


def default_tolerance(engine: Any) -> float:
    """TOLERANCE_FP32 when the engine computes in float32, else the 16-bit one."""
    conf = getattr(engine, "econf", None) or getattr(engine, "config", None)
    dtype = getattr(conf, "dtype", None)
    if dtype is None:
        dtype = getattr(getattr(conf, "engine", None), "dtype", None)
    if dtype == "auto" and getattr(conf, "device", None) == "cpu":
        dtype = "float32"  # the HF engine's choice on CPU
    return TOLERANCE_FP32 if dtype == "float32" else TOLERANCE_16BIT


# -- the adapter's weights ----------------------------------------------------------------


def adapter_is_zero(adapter_dir: Path) -> bool | None:
    """True when the adapter provably changes nothing: it holds only LoRA A/B matrices and every
    B is all zero (PEFT's initial state, so B·A = 0). False when some weight may change the output
    (a non-zero B; any other tensor: modules_to_save copies, DoRA magnitudes). None when the
    weights cannot be read here (no adapter file, or a dtype only torch reads and no torch)."""
    st, pt = adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_model.bin"
    try:
        if st.is_file():
            return _safetensors_zero(st)
        if pt.is_file():
            return _state_dict_zero(_torch_load(pt))
    except (ImportError, TypeError, ValueError, OSError, RuntimeError) as exc:
        log.warning("canary: cannot read %s to tell a zero adapter: %s", adapter_dir, exc)
    return None


def _safetensors_zero(path: Path) -> bool | None:
    from safetensors import safe_open

    framework = "pt" if _has_torch() else "numpy"
    with safe_open(str(path), framework=framework) as f:
        keys = list(f.keys())
        if not _only_lora(keys):
            return False if keys else None
        return not any(_nonzero(f.get_tensor(k)) for k in keys if _LORA_B.search(k))


def _state_dict_zero(state: dict[str, Any]) -> bool | None:
    if not _only_lora(list(state)):
        return False if state else None
    return not any(_nonzero(t) for k, t in state.items() if _LORA_B.search(k))


def _only_lora(keys: list[str]) -> bool:
    """Every tensor is a LoRA A or B matrix, and there is at least one B."""
    return any(_LORA_B.search(k) for k in keys) and all(_LORA_A.search(k) or _LORA_B.search(k) for k in keys)


def _nonzero(tensor: Any) -> bool:
    return bool(tensor.any())  # torch and numpy alike; -0.0 counts as zero


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _torch_load(path: Path) -> dict[str, Any]:
    import torch

    return dict(torch.load(path, map_location="cpu", weights_only=True))


# -- messages -----------------------------------------------------------------------------


def _targets(adapter_dir: Path) -> str:
    try:
        targets = json.loads((adapter_dir / "adapter_config.json").read_text()).get("target_modules")
    except (OSError, ValueError, AttributeError):
        return "see its adapter_config.json"
    if isinstance(targets, list):
        return ", ".join(sorted(str(t) for t in targets))
    return str(targets)


def _no_effect_message(handle: AdapterHandle, adapter_dir: Path, r: CanaryResult) -> str:
    weights = "its LoRA weights are non-zero" if r.zero_weights is False else "its weights could not be checked"
    return (
        f"adapter had no effect in the engine: {handle.name} ({handle.checkpoint.label}) scores the canary "
        f"probe exactly as the base model does (max |Δ log-prob| {r.max_abs_delta:.2g} nats over "
        f"{r.n_tokens} tokens, tolerance {r.tolerance:g}) although {weights}. Likely causes: the server's "
        f"--lora-target-modules excludes the adapter's target modules ({_targets(adapter_dir)}); the server "
        "accepted the load but silently ignored it; a stale adapter cached under a reused name; a wrong base "
        "model (an adapter trained for another model, whose weight names match none of the served model's "
        "modules: PEFT only warns about 'missing adapter keys')"
    )


def _mismatch_message(handle: AdapterHandle, r: CanaryResult) -> str:
    return (
        f"adapter {handle.name} ({handle.checkpoint.label}) is all zero (an untrained LoRA), yet the engine's "
        f"log-probs differ from the base model's by up to {r.max_abs_delta:.2g} nats on the canary probe "
        f"(tolerance {r.tolerance:g}): the engine applied other weights than these, most likely a stale "
        "adapter cached under a reused name"
    )
