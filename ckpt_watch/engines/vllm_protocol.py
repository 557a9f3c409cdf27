"""vLLM's side of the wire: which PEFT adapters a server will serve, its errors translated into
ones a user can act on, and its vLLM-only response fields parsed.

Adapter checks run on the client before the load route is called: the server's own refusals
(HTTP 500 from a worker, 404 from a missing route) say little about what to change.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Literal

from ckpt_watch.core import EngineError
from ckpt_watch.engines.base import Completion
from ckpt_watch.engines.vllm_server import adapter_rank, round_lora_rank

log = logging.getLogger(__name__)

RUNTIME_LORA_HINT = (
    "the server has no runtime-LoRA routes: start it with --enable-lora and the environment variable "
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"
)
_RANK_RE = re.compile(r"LoRA rank (\d+) is greater than max_lora_rank (\d+)")


class VLLMRequestError(EngineError):
    """The server answered a request with an HTTP error status."""

    def __init__(self, what: str, status: int, message: str, err_type: str | None):
        super().__init__(f"vLLM {what} failed with HTTP {status}: {message}")
        self.status, self.message, self.err_type = status, message, err_type

    @property
    def route_missing(self) -> bool:
        # FastAPI's own 404/405 ({"detail": "Not Found"}), not vLLM's NotFoundError for a name or path
        return self.status in (404, 405) and self.err_type != "NotFoundError"


def read_adapter_config(name: str, path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise EngineError(f"adapter {name}: cannot read {path / 'adapter_config.json'}: {exc}") from exc
    if not isinstance(cfg, dict):
        raise EngineError(f"adapter {name}: {path / 'adapter_config.json'} is not a JSON object")
    return cfg


def rank_error(name: str, r: int, current: int | str) -> EngineError:
    need = round_lora_rank(r)
    return EngineError(
        f"adapter {name} has LoRA rank {r} but the server runs with --max-lora-rank {current}; "
        f"it needs --max-lora-rank {need} (engine.launch.max_lora_rank: {need})"
    )


def check_adapter(
    name: str,
    path: Path,
    cfg: dict[str, Any],
    *,
    max_lora_rank: int | None,
    target_modules: list[str] | None,
    served: list[str],
    on_base_mismatch: Literal["warn", "refuse"],
) -> None:
    """Raise EngineError for an adapter the server cannot serve; warn or refuse a base mismatch.

    `max_lora_rank` / `target_modules` are known for a managed server only (None in attach mode);
    `served` holds the names the base model goes by (config value, local folder, server id)."""
    if cfg.get("modules_to_save"):
        raise EngineError(
            f"adapter {name} has modules_to_save={cfg['modules_to_save']} (full copies of embedding/lm_head "
            "layers); vLLM serves LoRA layers only and rejects them. Train without modules_to_save, "
            "or use engine.kind: hf"
        )
    if max_lora_rank is not None:
        r = adapter_rank(path)
        if r > max_lora_rank:
            raise rank_error(name, r, max_lora_rank)
    targets = cfg.get("target_modules")
    if target_modules and isinstance(targets, list):
        extra = sorted({str(t).rsplit(".", 1)[-1] for t in targets} - set(target_modules))
        if extra:
            raise EngineError(
                f"adapter {name} trains {extra}, outside the decoder layers the managed server applies LoRA "
                f"to ({', '.join(target_modules)}); LoRA on lm_head/embeddings breaks batched prompt "
                "log-probs in vLLM. Use engine.kind: hf for this adapter"
            )
    base = cfg.get("base_model_name_or_path")  # may be null (torchtune, some trainers): nothing to compare
    if base and not same_model(str(base), served):
        msg = f"adapter {name} was trained on {base!r} but the server serves {served[-1]!r}"
        if on_base_mismatch == "refuse":
            raise EngineError(f"{msg} (engine.on_base_mismatch: refuse)")
        log.warning("%s; evaluating anyway (engine.on_base_mismatch: warn)", msg)


def load_error(name: str, path: Path, exc: VLLMRequestError) -> EngineError:
    """Translate the load route's HTTP error into what the user must change."""
    if exc.route_missing:
        return EngineError(f"cannot load adapter {name}: {RUNTIME_LORA_HINT}")
    if exc.status == 404:
        return EngineError(f"adapter {name}: the server finds no adapter at {path} (is it readable there?)")
    if m := _RANK_RE.search(exc.message):
        return rank_error(name, int(m.group(1)), m.group(2))
    if "modules_to_save" in exc.message:
        return EngineError(f"adapter {name}: vLLM rejects its modules_to_save: {exc.message}")
    return EngineError(f"adapter {name} could not be loaded: {exc}")


def same_model(adapter_base: str, served: list[str]) -> bool:
    """Same base model by name: a hub id and a local folder of it share the last path component."""

    def key(s: str) -> str:
        return s.rstrip("/").rsplit("/", 1)[-1].lower()

    return key(adapter_base) in {key(s) for s in served if s}


# -- responses ------------------------------------------------------------------------------


def vllm_extra(obj: Any, key: str) -> Any:
    """A vLLM-only response field (the openai models keep unknown fields as extras)."""
    extra = getattr(obj, "model_extra", None) or {}
    return extra.get(key, getattr(obj, key, None))


def top_k_by_id(top: dict[str, float], k: int) -> dict[int, float]:
    """Keys are "token_id:N" (return_tokens_as_token_ids). vLLM adds the sampled token to the top-k
    when it is not among them; keep exactly k, as the HF engine does."""
    by_id = {int(key.rsplit(":", 1)[-1]): float(v) for key, v in top.items()}
    return dict(sorted(by_id.items(), key=lambda kv: -kv[1])[:k])


def parse_choice(choice: Any, top_logprobs: int, eos_ids: set[int]) -> Completion:
    """One /v1/completions choice (asked with return_token_ids) as a Completion."""
    ids = list(vllm_extra(choice, "token_ids") or [])
    lps: list[float] = []
    tops: list[dict[int, float]] = []
    if top_logprobs > 0 and choice.logprobs is not None:
        lps = [float(x) for x in choice.logprobs.token_logprobs or []]
        tops = [top_k_by_id(d or {}, top_logprobs) for d in choice.logprobs.top_logprobs or []]
    if choice.finish_reason == "stop" and ids and ids[-1] in eos_ids:
        # the HF engine's convention: the end-of-sequence token is not part of the completion
        ids, lps, tops = ids[:-1], lps[: len(ids) - 1], tops[: len(ids) - 1]
    return Completion(choice.text, ids, lps, tops, choice.finish_reason)
