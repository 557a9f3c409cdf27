"""The in-process HF engine on the real SmolLM2: adapters, generation, scoring paths agree."""

from __future__ import annotations

import asyncio
from pathlib import Path

from ckpt_watch.config import EngineConfig
from ckpt_watch.core import Checkpoint, CheckpointKind
from ckpt_watch.engines.base import GenerateRequest, ScoreRequest
from ckpt_watch.engines.hf import HFEngine
from ckpt_watch.suites.arc import label_token_ids, letter_prompt_ids, load_rows
from tests.conftest import ARC_FILE, make_adapter


def test_shared_context_scoring_equals_per_request_scoring(smollm2_path):
    """Multiple-choice labels share one forward pass; the numbers must not change."""

    async def main():
        eng = HFEngine(str(smollm2_path), EngineConfig(batch_size=8))
        await eng.start()
        h = await eng.load(Checkpoint.base("r"))
        tok = eng.tokenizer
        reqs = []
        for row in load_rows(ARC_FILE)[:4]:
            p = letter_prompt_ids(tok, row)
            reqs += [ScoreRequest(p, ids) for ids in label_token_ids(tok, row.labels)]
        # a multi-token request in the same batch takes the ordinary path
        reqs.append(ScoreRequest(reqs[0].context_ids, tok.encode(" The answer", add_special_tokens=False)))
        fast = await eng.score(h, reqs)
        slow = await asyncio.to_thread(eng._score_batch, h, reqs)
        return fast, slow

    fast, slow = asyncio.run(main())
    assert len(fast) == len(slow) == 17
    for a, b in zip(fast, slow, strict=True):
        assert len(a.token_logprobs) == len(b.token_logprobs)
        assert max(abs(x - y) for x, y in zip(a.token_logprobs, b.token_logprobs, strict=True)) < 1e-4
        assert a.greedy == b.greedy


def test_adapter_changes_outputs_and_unload_restores_base(smollm2_path, tmp_path):
    adapter = make_adapter(smollm2_path, tmp_path / "a", r=8, scale=0.05)

    async def main():
        eng = HFEngine(str(smollm2_path), EngineConfig())
        await eng.start()
        base = await eng.load(Checkpoint.base("r"))
        ck = Checkpoint("r", 10, tmp_path, Path(adapter), CheckpointKind.ADAPTER)
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        req = [GenerateRequest(messages=msgs, temperature=0, max_tokens=12, top_logprobs=5)]
        before = (await eng.generate(base, req))[0].completions[0]
        h = await eng.load(ck)
        tuned = (await eng.generate(h, req))[0].completions[0]
        await eng.unload(h)
        after = (await eng.generate(base, req))[0].completions[0]
        return before, tuned, after

    before, tuned, after = asyncio.run(main())
    assert "Paris" in before.text
    assert before.token_ids == after.token_ids  # unload leaves no LoRA in the forward pass
    assert tuned.token_logprobs != before.token_logprobs
    assert len(before.top_logprobs) == len(before.token_ids) and len(before.top_logprobs[0]) == 5
