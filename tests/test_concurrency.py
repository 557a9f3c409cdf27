"""Issue 15.1/15.2: a checkpoint's suites share the engine at once; several checkpoints at once.

Real parts: the tiny Llama trained by the real HF Trainer (tiny_run), the in-process HF engine,
the real ledger and JSON sink. What "at once" means is read from the results themselves (each
suite's started_at / finished_at), not from a stand-in engine.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from pathlib import Path

import pytest

from ckpt_watch.config import Config, EngineConfig, SchedulerConfig, parse_config
from ckpt_watch.core import BASE_STEP, Checkpoint
from ckpt_watch.engines.hf import HFEngine
from ckpt_watch.evaluate import Evaluator
from ckpt_watch.ledger import EvalState, Ledger
from ckpt_watch.scheduler import Scheduler
from ckpt_watch.sinks.jsonfiles import JsonSink

RUN = "c"


@pytest.fixture(scope="module")
def engine(tiny_base: Path) -> HFEngine:
    eng = HFEngine(str(tiny_base), EngineConfig(dtype="float32", batch_size=8))
    asyncio.run(eng.start())
    return eng


@pytest.fixture()
def long_texts(tmp_path: Path) -> Path:
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"text": f"Sentence {i} is about rivers, bread and primes, and it goes on "
                                                f"for a while so that scoring it takes some time."}) + "\n"
                            for i in range(600)))
    return path


class Bench:
    """A ledger, scheduler, JSON sink and evaluator on one results folder."""

    def __init__(self, tmp: Path, engine: HFEngine, suites: dict, *, concurrent: bool = True, run: str = RUN):
        self.tmp = tmp
        self.run = run
        self.suites = parse_config({"base_model": "x", "suites": suites}).suites
        self.ledger = Ledger(tmp / "ledger.sqlite")
        self.sched = Scheduler(self.ledger, run, self.suites, SchedulerConfig())
        sink = JsonSink(tmp)
        sink.start(run, {})
        self.evaluator = Evaluator(engine, [sink], self.ledger, run, tmp, max_attempts=3, canary=False,
                                   concurrent_suites=concurrent)

    def plan(self, step: int) -> list:
        self.sched.plan(step, False)
        return self.sched.pending()[step]

    def result(self, step: int, suite: str) -> dict:
        return json.loads((self.tmp / self.run / f"step-{step}" / f"{suite}.json").read_text())

    def state(self, step: int, suite: str):
        return self.ledger.eval_row(self.run, step, suite, self.sched.suites[suite].hash)


def _ckpt(tiny_run: Path, step: int) -> Checkpoint:
    return Checkpoint(run=RUN, step=step, path=None, adapter_dir=tiny_run / f"checkpoint-{step}")


def _span(result: dict) -> tuple[datetime, datetime]:
    return datetime.fromisoformat(result["started_at"]), datetime.fromisoformat(result["finished_at"])


@pytest.mark.parametrize("concurrent", [True, False])
def test_suites_of_one_checkpoint_run_at_once_with_the_same_numbers(tmp_path, engine, tiny_run, long_texts,
                                                                    concurrent):
    """Concurrent: the short suite starts and finishes while the long one is still running (their
    spans overlap); sequential: the second starts after the first has finished. The numbers are the
    same either way (the HF engine is deterministic)."""
    bench = Bench(tmp_path, engine, {"long": {"type": "heldout_loss", "path": str(long_texts)},
                                     "short": {"type": "heldout_loss"}}, concurrent=concurrent)
    asyncio.run(bench.evaluator.evaluate(_ckpt(tiny_run, 4), bench.plan(4), lambda: False))
    long_, short = bench.result(4, "long"), bench.result(4, "short")
    assert long_["status"] == short["status"] == "ok"
    (ls, le), (ss, se) = _span(long_), _span(short)
    if concurrent:
        assert ss < le and ls < se, (long_["started_at"], long_["finished_at"], short["started_at"])
        assert se < le  # the short one did not wait for the long one
    else:
        assert ss >= le
    assert bench.state(4, "long").state is bench.state(4, "short").state is EvalState.DONE
    (tmp_path / "numbers.json").write_text(json.dumps([long_["metrics"], short["metrics"]]))
    # the same adapter evaluated the other way gives the same figures
    other = Bench(tmp_path / "other", engine, {"long": {"type": "heldout_loss", "path": str(long_texts)},
                                               "short": {"type": "heldout_loss"}}, concurrent=not concurrent)
    asyncio.run(other.evaluator.evaluate(_ckpt(tiny_run, 4), other.plan(4), lambda: False))
    for name in ("long", "short"):
        a, b = bench.result(4, name)["metrics"], other.result(4, name)["metrics"]
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])) for k in a), (a, b)


def test_a_failing_suite_does_not_cancel_the_others(tmp_path, engine, tiny_run, long_texts):
    """The data file of one suite disappears between planning and running (a real OSError inside
    the suite): that suite is recorded failed with the reason, the other finishes and is done."""
    doomed = tmp_path / "doomed.jsonl"
    doomed.write_text('{"text": "gone soon"}\n')
    bench = Bench(tmp_path, engine, {"long": {"type": "heldout_loss", "path": str(long_texts)},
                                     "doomed": {"type": "heldout_loss", "path": str(doomed)}})
    suites = bench.plan(2)
    doomed.unlink()
    asyncio.run(bench.evaluator.evaluate(_ckpt(tiny_run, 2), suites, lambda: False))
    assert bench.state(2, "doomed").state is EvalState.FAILED
    assert "No such file" in bench.state(2, "doomed").error
    assert bench.state(2, "long").state is EvalState.DONE
    assert bench.result(2, "long")["metrics"]["tokens"] > 1000
    assert bench.evaluator.failed == 1


def test_cancelled_mid_evaluation_every_unfinished_suite_is_pending_again(tmp_path, engine, tiny_run, long_texts):
    """The drain is over (the daemon cancels the evaluation): each suite still running goes back to
    pending with its attempt not counted; one that already finished stays done."""
    bench = Bench(tmp_path, engine, {"long": {"type": "heldout_loss", "path": str(long_texts)},
                                     "long2": {"type": "heldout_loss", "path": str(long_texts)},
                                     "short": {"type": "heldout_loss", "max_texts": 2}})
    suites = bench.plan(6)

    async def main() -> None:
        task = asyncio.create_task(bench.evaluator.evaluate(_ckpt(tiny_run, 6), suites, lambda: False))
        for _ in range(600):
            await asyncio.sleep(0.05)
            if bench.state(6, "short").state is EvalState.DONE:
                break
        assert bench.state(6, "long").state is bench.state(6, "long2").state is EvalState.RUNNING
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    for name in ("long", "long2"):
        row = bench.state(6, name)
        assert row.state is EvalState.PENDING and row.attempts == 0, row
    assert bench.state(6, "short").state is EvalState.DONE
    assert not (tmp_path / RUN / "step-6" / "long.json").exists()
    assert engine._adapters == set()  # unloaded on the way out


def test_a_retry_runs_the_suites_in_turn(tmp_path, engine, tiny_run, long_texts):
    """A process killed mid-step (claimed rows left running, recovered at restart) charged an
    attempt to every suite that ran together; the retry runs them one after another, so only the
    one that crashes again is charged again. The daemon also takes such a step alone."""
    bench = Bench(tmp_path, engine, {"long": {"type": "heldout_loss", "path": str(long_texts)},
                                     "short": {"type": "heldout_loss"}})
    suites = bench.plan(4)
    for p in suites:  # the killed process's claims
        assert bench.ledger.claim(RUN, 4, p.name, p.hash, owner="gone")
    bench.ledger.recover([RUN])
    assert bench.evaluator.retried(4, suites) and not bench.evaluator.retried(2, bench.plan(2))
    asyncio.run(bench.evaluator.evaluate(_ckpt(tiny_run, 4), suites, lambda: False))
    first, second = sorted((_span(bench.result(4, n)) for n in ("long", "short")), key=lambda s: s[0])
    assert second[0] >= first[1]  # in turn
    assert {bench.state(4, n).attempts for n in ("long", "short")} == {2}


def test_stopping_before_the_suites_start_leaves_them_all_pending(tmp_path, engine, tiny_run):
    bench = Bench(tmp_path, engine, {"a": {"type": "heldout_loss"}, "b": {"type": "heldout_loss"}})
    asyncio.run(bench.evaluator.evaluate(_ckpt(tiny_run, 2), bench.plan(2), lambda: True))
    assert {bench.state(2, n).state for n in ("a", "b")} == {EvalState.PENDING}
    assert {bench.state(2, n).attempts for n in ("a", "b")} == {0}


# -- several checkpoints at once (issue 15.2) ----------------------------------------------------


def test_next_steps_newest_first_base_alone(tmp_path):
    suites = parse_config({"base_model": "x", "suites": {"q": {"type": "heldout_loss"}}}).suites
    ledger = Ledger(tmp_path / "ledger.sqlite")
    sched = Scheduler(ledger, RUN, suites, SchedulerConfig())
    for step in (BASE_STEP, 10, 20, 30, 40):
        sched.plan(step, False)
    assert sched.next_steps({0, 10, 20, 30, 40}, 3) == [0]  # the base model first, alone
    ledger.set_eval(RUN, 0, "q", sched.suites["q"].hash, EvalState.DONE)
    assert sched.next_steps({0, 10, 20, 30, 40}, 3) == [40, 30, 20]
    assert sched.next_steps({0, 10, 20}, 3) == [20, 10]  # only what is available
    assert sched.next_steps({0, 10, 20, 30, 40}, 1) == [40] == [sched.next_step({0, 10, 20, 30, 40})]
    oldest = Scheduler(ledger, RUN, suites, SchedulerConfig(order="oldest"))
    assert oldest.next_steps({0, 10, 20, 30, 40}, 2) == [10, 20]


def test_adapters_in_flight_defaults_and_limits():
    def engine(**kw) -> EngineConfig:
        suites = {"q": {"type": "heldout_loss"}}
        return Config.model_validate({"base_model": "x", "suites": suites, "engine": kw}).engine

    launch = {"command": ["vllm", "serve"], "max_loras": 3}
    assert engine(kind="hf").adapters_in_flight() == 1
    assert engine(kind="vllm", launch=launch).adapters_in_flight() == 3  # the server's --max-loras
    assert engine(kind="vllm", url="http://127.0.0.1:8000/v1").adapters_in_flight() == 1
    assert engine(kind="vllm", url="http://127.0.0.1:8000/v1", max_adapters_in_flight=4).adapters_in_flight() == 4
    assert engine(kind="vllm", launch=launch, max_adapters_in_flight=2).adapters_in_flight() == 2
    with pytest.raises(ValueError, match="max_loras"):
        engine(kind="vllm", launch=launch, max_adapters_in_flight=4)
    with pytest.raises(ValueError, match=r"needs engine\.kind 'vllm'"):
        engine(kind="hf", max_adapters_in_flight=2)


@pytest.mark.slow
@pytest.mark.vllm
def test_two_adapters_in_flight_on_the_real_server(vllm_engine, vllm_loop, smollm2_path, tmp_path_factory):
    """Two checkpoints evaluated at once on the shared real vLLM CPU server (--max-loras 2), each
    with two suites at once: the same numbers as one at a time, never more adapters loaded than
    the server batches together, and none left loaded afterwards."""
    from ckpt_watch.evaluate import run_together
    from tests.conftest import make_adapter

    tmp = tmp_path_factory.mktemp("in-flight")
    adapters = {s: make_adapter(smollm2_path, tmp / f"a{s}", seed=s, scale=0.02) for s in (10, 20)}
    suites = {"loss": {"type": "heldout_loss"},
              "arc": {"type": "arc_challenge", "n": 8, "path": str(Path(__file__).resolve().parents[2] / "shared"
                                                                  / "data" / "arc_challenge_test.jsonl")}}
    loaded: list[int] = []
    real_load = vllm_engine.load

    async def load(checkpoint):  # records how many adapters the server holds after each load
        handle = await real_load(checkpoint)
        loaded.append(len(vllm_engine.loaded_adapters()))
        return handle

    def ck(run: str, step: int) -> Checkpoint:
        return Checkpoint(run=run, step=step, path=None, adapter_dir=adapters[step])

    results = {}
    vllm_engine.load = load
    try:
        for mode in ("together", "in_turn"):
            bench = Bench(tmp / mode, vllm_engine, suites, run=mode)
            work = [(ck(mode, s), bench.plan(s)) for s in (10, 20)]
            if mode == "together":
                vllm_loop.run_until_complete(run_together(
                    [bench.evaluator.evaluate(c, s, lambda: False) for c, s in work]))
            else:
                for c, s in work:
                    vllm_loop.run_until_complete(bench.evaluator.evaluate(c, s, lambda: False))
            results[mode] = {(s, n): bench.result(s, n) for s in (10, 20) for n in ("loss", "arc")}
    finally:
        vllm_engine.load = real_load
    assert max(loaded) <= 2 and vllm_engine.loaded_adapters() == {}
    assert loaded[:2] == [1, 2]  # both adapters were loaded at once in the concurrent mode
    for key, got in results["together"].items():
        ref = results["in_turn"][key]
        assert got["status"] == ref["status"] == "ok", got.get("error")
        for k, v in ref["metrics"].items():
            assert abs(got["metrics"][k] - v) <= 1e-3, (key, k, got["metrics"][k], v)
    # the two adapters differ, so a mix-up between them would show
    assert results["together"][(10, "loss")]["metrics"]["nll"] != results["together"][(20, "loss")]["metrics"]["nll"]


def test_seeded_samples_do_not_depend_on_what_runs_beside_them(engine, tiny_run):
    """torch's seed is global: seeded sampling on the hf engine must take it under the engine's lock,
    or batches of suites running together (other threads) draw from each other's seeds."""
    from ckpt_watch.engines.base import GenerateRequest
    from ckpt_watch.suites.inflight import in_flight

    reqs = [GenerateRequest(prompt_ids=[1, 450 + i], temperature=1.0, max_tokens=8, seed=1000 + i)
            for i in range(32)]

    async def main():
        handle = await engine.load(_ckpt(tiny_run, 2))
        try:
            alone = [(await engine.generate(handle, reqs[i : i + 4])) for i in range(0, len(reqs), 4)]
            together = await in_flight(reqs, lambda part: engine.generate(handle, part), part=4)
        finally:
            await engine.unload(handle)
        return [r for part in alone for r in part], together

    alone, together = asyncio.run(main())
    assert [r.completions[0].token_ids for r in together] == [r.completions[0].token_ids for r in alone]
