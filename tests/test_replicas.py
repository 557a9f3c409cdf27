"""Several vLLM servers as one engine (issue 17.2): `engine.replicas` / `engine.launch.gpus`.

Fast: the config's rules and the replica choice (a pure function), and what each managed server of
launch.gpus is started with. Slow: two real vLLM CPU servers as replicas, the one evaluating an
adapter SIGKILLed mid-suite; the evaluation finishes on the other with the numbers of one server alone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
import urllib.request

import pytest

from ckpt_watch.config import ConfigError, SchedulerConfig, parse_config
from ckpt_watch.core import Checkpoint
from ckpt_watch.engines.base import adapter_name
from ckpt_watch.engines.replicas import Load, ReplicaEngine, choose_replica, replica_configs
from ckpt_watch.engines.vllm import VLLMEngine
from ckpt_watch.engines.vllm_server import ManagedServer

LAUNCH = {"command": ["python", "-m", "vllm.entrypoints.openai.api_server"]}


def _config(engine: dict, **top):
    return parse_config({"base_model": "x", "suites": {"heldout_loss": {}}, "engine": {"kind": "vllm", **engine},
                         **top})


def _errors(engine: dict) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as exc:
        _config(engine)
    return exc.value.errors


# -- config ---------------------------------------------------------------------------------------


def test_replica_counts_and_adapters_in_flight(monkeypatch):
    monkeypatch.setenv("CKW_REPLICA_KEY", "k")
    attached = _config({"replicas": ["http://a:8000/v1", "http://b:8000/v1", "http://c:8000/v1"],
                        "api_key_env": "CKW_REPLICA_KEY"}).engine
    assert attached.replica_count() == 3 and attached.adapters_in_flight() == 3
    managed = _config({"launch": {**LAUNCH, "gpus": [0, 1], "max_loras": 3}}).engine
    assert managed.replica_count() == 2 and managed.adapters_in_flight() == 6
    assert _config({"launch": {**LAUNCH, "gpus": [0, 1], "max_loras": 3}, "max_adapters_in_flight": 6}).engine
    one = _config({"launch": {**LAUNCH, "max_loras": 3}}).engine
    assert one.replica_count() == 1 and one.adapters_in_flight() == 3  # unchanged
    # vLLM's own data parallelism is one server: every adapter on every rank, so max_loras as before
    dp = _config({"launch": {**LAUNCH, "gpu": "0,1", "data_parallel_size": 2, "max_loras": 3}}).engine
    assert dp.replica_count() == 1 and dp.adapters_in_flight() == 3


@pytest.mark.parametrize(("engine", "path", "words"), [
    ({"url": "http://a/v1", "replicas": ["http://b/v1", "http://c/v1"]}, "engine", "exactly one of"),
    ({"replicas": ["http://b/v1"]}, "engine.replicas", "two or more"),
    ({"replicas": ["http://b/v1", "http://b/v1/"]}, "engine.replicas", "twice"),
    ({"replicas": ["http://b/v1", "http://c/v1"], "api_key_env": "CKW_UNSET_KEY"}, "engine.replicas",
     "CKW_UNSET_KEY"),
    ({"launch": {**LAUNCH, "gpu": 0, "gpus": [0, 1]}}, "engine.launch", "not both"),
    ({"launch": {**LAUNCH, "gpus": [0]}}, "engine.launch", "two or more"),
    ({"launch": {**LAUNCH, "gpus": [0, "0"]}}, "engine.launch", "twice"),
    ({"launch": {**LAUNCH, "gpus": [0, 1], "extra_args": ["--port", "9000"]}}, "engine.launch", "same port"),
    ({"launch": {**LAUNCH, "data_parallel_size": 2, "extra_args": ["--data-parallel-size=2"]}}, "engine.launch",
     "set twice"),
    ({"launch": {**LAUNCH, "data_parallel_size": 0}}, "engine.launch.data_parallel_size", "greater than"),
    ({"launch": {**LAUNCH, "gpus": [0, 1], "max_loras": 2}, "max_adapters_in_flight": 5}, "engine",
     "× 2 servers"),
])
def test_bad_replica_settings_name_their_field(engine, path, words, monkeypatch):
    monkeypatch.delenv("CKW_UNSET_KEY", raising=False)
    errors = _errors(engine)
    assert any(p == path and words in why for p, why in errors), errors


def test_each_server_of_launch_gpus_gets_its_gpu_port_and_log(tmp_path):
    config = _config({"launch": {**LAUNCH, "gpus": [0, "2,3"], "port": 8100, "data_parallel_size": 2}},
                     results_dir=str(tmp_path))
    configs = replica_configs(config)
    servers = [ManagedServer.from_config(c, "org/model", tmp_path / f"vllm-server-{i}.log")
               for i, c in enumerate(configs)]
    assert [s.env()["CUDA_VISIBLE_DEVICES"] for s in servers] == ["0", "2,3"]
    assert [s.port for s in servers] == [8100, 8101]
    assert servers[0].api_key != servers[1].api_key
    assert [s.pidfile.name for s in servers] == ["vllm-server-0.pid", "vllm-server-1.pid"]
    cmd = servers[1].command()
    assert cmd[cmd.index("--data-parallel-size") + 1] == "2" and cmd[cmd.index("--api-server-count") + 1] == "1"
    # the factory: several servers → ReplicaEngine, each replica a VLLMEngine with its own log; one → VLLMEngine
    from ckpt_watch.engines.factory import make_engine

    engine = make_engine(config, tmp_path)
    assert isinstance(engine, ReplicaEngine) and len(engine.replicas) == 2
    assert [r.engine.econf.launch.gpu for r in engine.replicas] == [0, "2,3"]
    single = make_engine(_config({"launch": LAUNCH}), tmp_path)
    assert type(single) is VLLMEngine


# -- the choice -----------------------------------------------------------------------------------


def test_an_adapter_goes_to_the_live_replica_with_fewest_adapters():
    loads = [Load(True, 2, 0), Load(True, 1, 50), Load(False, 0, 0), Load(True, 1, 3)]
    assert choose_replica(loads, for_adapter=True) == 3  # 1 adapter, fewer requests than replica 1
    assert choose_replica([Load(True, 0, 0), Load(True, 0, 0)], for_adapter=True) == 0  # ties: first index
    assert choose_replica([Load(False, 0, 0), Load(False, 0, 0)], for_adapter=True) is None


def test_base_requests_spread_over_live_replicas():
    loads = [Load(True, 0, 4), Load(True, 3, 1), Load(False, 0, 0)]
    assert choose_replica(loads, for_adapter=False) == 1  # fewest in flight
    even = [Load(True, 0, 0), Load(False, 0, 0), Load(True, 0, 0)]
    assert [choose_replica(even, for_adapter=False, start=s) for s in range(3)] == [0, 2, 2]


# -- two real servers, one killed -----------------------------------------------------------------

KEY_ENV = "CKW_TEST_REPLICA_KEY"
KILL_AFTER = 24  # adapter requests answered by the doomed server before it is killed


def _lora_cards(base_url: str, key: str) -> list[str]:
    req = urllib.request.Request(f"{base_url}/models", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return [m["id"] for m in json.loads(resp.read())["data"] if m.get("parent")]


@pytest.mark.slow
@pytest.mark.vllm
def test_replica_killed_mid_suite_the_evaluation_finishes_on_the_other(
        vllm_server, vllm_engine, vllm_loop, smollm2_path, tmp_path, monkeypatch, caplog):
    """Replica 0 is a second real vLLM CPU server started here, replica 1 the session's shared one,
    both attached by URL with one API key. A real SmolLM2 LoRA (q_proj/v_proj) is loaded on replica 0
    (fewest adapters, first index) and evaluated by the real Evaluator (canary, ARC-C n=40, JSON sink,
    ledger); after KILL_AFTER of its requests are answered, replica 0's process group is SIGKILLed.
    The adapter is loaded on replica 1 and the unanswered requests go there: the suite ends ok with
    the figures of the same adapter evaluated on the shared server alone, and nothing stays loaded.
    The shared server is never killed (other tests use it); an attached replica is only re-probed,
    never restarted, so this test starts exactly one extra server."""
    from ckpt_watch.engines.factory import make_engine
    from ckpt_watch.evaluate import Evaluator
    from ckpt_watch.ledger import EvalState, Ledger
    from ckpt_watch.scheduler import Scheduler
    from ckpt_watch.sinks.jsonfiles import JsonSink
    from ckpt_watch.suites.base import SuiteContext, build_suite
    from tests.conftest import ARC_FILE, make_adapter, vllm_test_config

    caplog.set_level(logging.INFO, logger="ckpt_watch.engines.replicas")
    adapter = make_adapter(smollm2_path, tmp_path / "adapter", r=8, scale=0.02, seed=1)
    suites = {"arc_challenge": {"n": 40, "seed": 3, "path": str(ARC_FILE)}}
    extra_dir = tmp_path / "extra"
    extra = ManagedServer.from_config(vllm_test_config(smollm2_path, extra_dir), str(smollm2_path),
                                      extra_dir / "vllm-server-extra.log")
    extra.target_modules = list(vllm_server.server.target_modules)  # the same LoRA layers as the shared one
    extra.api_key = vllm_server.api_key  # replicas share engine.api_key_env
    t0 = time.monotonic()
    extra.spawn()
    try:
        # meanwhile, the reference: the same adapter on the shared server alone
        ref_ckpt = Checkpoint(run="ref", step=1, path=adapter, adapter_dir=adapter)
        ref_cfg = parse_config({"base_model": str(smollm2_path), "suites": suites}).suites["arc_challenge"]

        async def reference():
            handle = await vllm_engine.load(ref_ckpt)
            try:
                ctx = SuiteContext(engine=vllm_engine, handle=handle, checkpoint=ref_ckpt, run_name="ref")
                return await build_suite("arc_challenge", ref_cfg).run(ctx)
            finally:
                await vllm_engine.unload(handle)

        ref = vllm_loop.run_until_complete(reference())
        extra.wait_ready()
        startup = time.monotonic() - t0

        monkeypatch.setenv(KEY_ENV, vllm_server.api_key)
        timed_out = _timeout_on_healthy_servers(smollm2_path, [extra.base_url, vllm_server.base_url])
        config = parse_config({
            "base_model": str(smollm2_path), "results_dir": str(tmp_path / "results"), "suites": suites,
            "engine": {"kind": "vllm", "dtype": "float32", "max_concurrency": 32, "request_timeout": 300,
                       "max_retries": 2, "replicas": [extra.base_url, vllm_server.base_url],
                       "api_key_env": KEY_ENV},
        })
        engine = make_engine(config)
        assert isinstance(engine, ReplicaEngine)
        ledger = Ledger(tmp_path / "ledger.sqlite")
        sched = Scheduler(ledger, "r", config.suites, SchedulerConfig())
        sink = JsonSink(tmp_path / "results")
        sink.start("r", {})
        evaluator = Evaluator(engine, [sink], ledger, "r", tmp_path / "results", max_attempts=3)
        ckpt = Checkpoint(run="r", step=1, path=adapter, adapter_dir=adapter)
        name = adapter_name(ckpt)
        seen: dict[str, float] = {}

        async def kill_when_busy() -> None:
            doomed = engine.replicas[0]
            while not (engine.replica_of(name) == 0 and doomed.answered >= KILL_AFTER):
                await asyncio.sleep(0.01)
            os.killpg(extra.pid, signal.SIGKILL)  # the server and its engine core, no warning
            seen.update(answered=doomed.answered, at=time.monotonic())

        async def main() -> float:
            sched.plan(1, False)
            killer = asyncio.create_task(kill_when_busy())
            t1 = time.monotonic()
            try:
                await evaluator.evaluate(ckpt, sched.pending()[1], lambda: False)
            finally:
                killer.cancel()
                await asyncio.gather(killer, return_exceptions=True)
            seen["end"] = time.monotonic()
            elapsed = seen["end"] - t1
            seen["left"] = engine.loaded_adapters()
            seen["status"] = engine.status
            await engine.close()
            return elapsed

        elapsed = asyncio.run(main())
    finally:
        extra.stop(grace=5.0)

    result = json.loads((tmp_path / "results" / "r" / "step-1" / "arc_challenge.json").read_text())
    planned = sched.suites["arc_challenge"]
    row = ledger.eval_row("r", 1, "arc_challenge", planned.hash)
    lp = [x for s in result["samples"] for x in s["logprobs"]]
    lp_ref = [x for s in ref.samples for x in s["logprobs"]]
    worst = max(abs(a - b) for a, b in zip(lp, lp_ref, strict=True))
    print(f"\nextra server up in {startup:.0f} s (reference evaluated meanwhile); evaluation {elapsed:.1f} s, "
          f"killed after {seen.get('answered')} answers, {seen['end'] - seen.get('at', seen['end']):.1f} s before "
          f"the end; acc {result['metrics']['acc']:.3f} vs "
          f"{ref.metrics['acc']:.3f} alone; max |Δ log-prob| {worst:.2e}; status: {seen.get('status')}")
    assert "answered" in seen, "the evaluation ended before the server was killed"
    assert seen["answered"] < len(lp), "the doomed server had already answered everything"
    assert result["status"] == "ok", result.get("error")
    assert row is not None and row.state is EvalState.DONE and row.attempts == 1
    assert result["metrics"]["n"] == 40
    assert [s["pred"] for s in result["samples"]] == [s["pred"] for s in ref.samples]
    assert result["metrics"]["acc"] == pytest.approx(ref.metrics["acc"])
    assert worst < 1e-3
    assert result["info"]["canary"]["status"] == "ok"
    assert f"adapter {name} moved from replica 0" in caplog.text
    assert seen["status"].startswith("1/2 vLLM replicas live")
    assert seen["left"] == {}
    assert name not in _lora_cards(vllm_server.base_url, vllm_server.api_key)
    assert vllm_server.server.alive()
    # a request that times out on servers that are up is no server's death: no fail-over loop, no
    # adapter moved, it reaches the caller (whose max_suite_attempts bound it) after one try per server
    assert timed_out["error"] == "EngineUnavailable" and timed_out["seconds"] < 60, timed_out
    assert timed_out["status"].startswith("2/2 vLLM replicas live"), timed_out


def _timeout_on_healthy_servers(base_model, urls: list[str]) -> dict:
    """One long generation on two live replicas with a 0.5 s request timeout (a real timeout)."""
    from ckpt_watch.core import AdapterHandle, EngineUnavailable
    from ckpt_watch.engines.base import GenerateRequest
    from ckpt_watch.engines.factory import make_engine

    config = parse_config({
        "base_model": str(base_model), "suites": {"heldout_loss": {}},
        "engine": {"kind": "vllm", "dtype": "float32", "request_timeout": 0.5, "max_retries": 0,
                   "replicas": urls, "api_key_env": KEY_ENV},
    })
    engine = make_engine(config)

    async def main() -> dict:
        await engine.start()
        t0 = time.monotonic()
        error = None
        try:
            story = [{"role": "user", "content": "Tell a long story about a dragon."}]
            await engine.generate(AdapterHandle(Checkpoint.base("t"), None),
                                  [GenerateRequest(messages=story, max_tokens=400, temperature=0.0)])
        except EngineUnavailable as exc:
            error = type(exc).__name__
        out = {"error": error, "seconds": time.monotonic() - t0, "status": engine.status}
        await engine.close()
        return out

    return asyncio.run(main())
