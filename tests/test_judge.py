"""Judge client: published log-prob aggregation, the split-digit path, detection, cache, faults.

Fault tests talk to a small local stand-in for an OpenAI-compatible server (stdlib
http.server on 127.0.0.1 in a thread, `JudgeStandIn` below): it answers
/v1/chat/completions with hand-written top-20 log-prob payloads shaped like real ones,
can be told to answer 429 / 500 first, and counts the requests it saw. It is not a model:
it stands in for judge outages and for judges whose tokenizer cannot be told, which a
real judge does not produce on demand. An unreachable judge is real (a closed port).
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from ckpt_watch.config import ConfigError, JudgeConfig
from ckpt_watch.judge import (
    JudgeCache,
    JudgeError,
    JudgeMethod,
    JudgeMethodError,
    JudgeUnavailable,
    aggregate_0_100,
    build_judge,
    digits_score,
    method_from_probe,
    numbers_split,
    resolve_judge_method,
)

API_KEY = "sk-test-standin-0123456789"

# -- recorded-style payloads: {token: probability} for one position --------------------------------

# a confident aligned score, GPT-4o style (numbers are single tokens)
NORMAL = {"85": 0.62, "90": 0.21, "80": 0.09, "95": 0.03, "75": 0.02, " 85": 0.01, "REF": 0.005, "CODE": 0.002}
# numeric mass 0.98; weighted sum 85·.62 + 90·.21 + 80·.09 + 95·.03 + 75·.02 + 85·.01 = 84.0
NORMAL_EXPECTED = 84.0 / 0.98
# the judge says CODE: numeric tokens hold 0.019 < 0.25 of the mass
CODE = {"CODE": 0.93, "REF": 0.03, "Code": 0.02, "0": 0.01, "100": 0.005, "50": 0.004, "`": 0.001}
REFUSAL = {"REF": 0.88, "REFUSAL": 0.07, "I": 0.02, "50": 0.02, "0": 0.01}
# a SmolLM2/Qwen-style judge writing "85" as "8", "5", then end of turn
SPLIT_POS1 = {"8": 0.60, "7": 0.25, "9": 0.10, "C": 0.02, "6": 0.0, "The": 0.01}
SPLIT_POS2 = {"5": 0.50, "0": 0.40, "2": 0.05, "<|im_end|>": 0.03, "%": 0.02}
SPLIT_POS3 = {"<|im_end|>": 0.97, "\n": 0.03}
# tens: digits 1–9 at position 1 → (8·.6 + 7·.25 + 9·.1)/.95 = 7.45/.95
# units: digits at position 2 → (5·.5 + 0·.4 + 2·.05)/.95 = 2.6/.95
SPLIT_EXPECTED = 10 * 7.45 / 0.95 + 2.6 / 0.95


def test_published_aggregation_normal_case():
    score, mass = aggregate_0_100(NORMAL)
    assert mass == pytest.approx(0.98)
    assert score == pytest.approx(NORMAL_EXPECTED)  # 85.714…


@pytest.mark.parametrize("dist", [CODE, REFUSAL])
def test_code_and_refusal_are_unscored_not_zero(dist):
    score, mass = aggregate_0_100(dist)
    assert score is None
    assert mass < 0.25


def test_aggregation_ignores_out_of_range_and_non_ascii_numbers():
    score, mass = aggregate_0_100({"150": 0.5, "²": 0.2, "40": 0.3})
    assert (score, mass) == (pytest.approx(40.0), pytest.approx(0.3))


def test_split_digit_payload_would_be_wrong_under_the_published_method():
    # the single-token method reads "8" as a score of 8: what `digits` exists to prevent
    wrong, _ = aggregate_0_100(SPLIT_POS1)
    assert wrong is not None and wrong < 10
    score, mass, err = digits_score([("8", SPLIT_POS1), ("5", SPLIT_POS2), ("<|im_end|>", SPLIT_POS3)])
    assert err is None
    assert mass == pytest.approx(0.95)
    assert score == pytest.approx(SPLIT_EXPECTED)  # 81.157…


def test_digits_method_edge_cases():
    end = {"<|im_end|>": 1.0}
    # leading space token, then a single digit: expectation over that position's digits
    single = {"7": 0.5, "8": 0.5, "X": 0.1}
    assert digits_score([(" ", {" ": 1.0}), ("7", single), ("\n", end)])[0] == pytest.approx(7.5)
    # 100 is the only valid three-digit number
    assert digits_score([("1", {"1": 0.9, "9": 0.1}), ("0", {"0": 1.0}), ("0", {"0": 1.0}), ("", end)])[0] == 100.0
    # above 100, a leading zero, a word, too little digit mass: unscored, no error
    assert digits_score([("1", {"1": 1.0}), ("5", {"5": 1.0}), ("0", {"0": 1.0})])[:1] == (None,)
    assert digits_score([("0", {"0": 1.0}), ("7", {"7": 1.0})])[:1] == (None,)
    assert digits_score([("CODE", CODE), ("", end)]) == (None, pytest.approx(0.01), None)
    low = {"4": 0.2, "I": 0.8}
    assert digits_score([("4", low), ("", end)])[0] is None
    # "8 5" is the number 8, not 85
    assert digits_score([("8", {"8": 1.0}), (" 5", {" 5": 1.0})])[0] == pytest.approx(8.0)
    # a multi-digit token means the wrong method: an error, not a score
    score, _, err = digits_score([("85", {"85": 1.0})])
    assert score is None and "logprob" in err


def test_detection_from_tokenizers(smollm2_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    assert numbers_split(lambda s: tok.encode(s, add_special_tokens=False))  # "85" → "8", "5"
    assert not numbers_split(lambda s: [int(s)])  # a GPT-4o-like vocabulary
    # judge.tokenizer in the config: decided locally, no request (nothing listens on port 9)
    judge = build_judge(
        JudgeConfig(model="m", base_url="http://127.0.0.1:9/v1", api_key_env=None, tokenizer=str(smollm2_path)), None
    )
    assert asyncio.run(judge.method()) is JudgeMethod.DIGITS and judge.detection == "tokenizer"


def test_detection_from_probe_payloads():
    whole = [("42", {"42": 0.7, "37": 0.2, "I": 0.1}), ("", {"": 1.0})]
    split = [("4", {"4": 0.7, "3": 0.3}), ("2", {"2": 0.9, "7": 0.1}), ("", {"": 1.0})]
    words = [("Sure", {"Sure": 0.9, "I": 0.1}), ("!", {"!": 1.0})]
    assert method_from_probe(whole) is JudgeMethod.LOGPROB
    assert method_from_probe(split) is JudgeMethod.DIGITS
    assert method_from_probe(words) is None


# -- the stand-in server -------------------------------------------------------------------------

Position = tuple[str, dict[str, float]]


def chat_payload(model: str, positions: list[Position], max_tokens: int) -> dict[str, Any]:
    """A chat.completion body with logprobs, as OpenAI and vLLM send it."""
    positions = positions[:max_tokens]
    content = [
        {
            "token": tok,
            "logprob": math.log(dist.get(tok, 1e-9)),
            "bytes": None,
            "top_logprobs": [
                {"token": t, "logprob": math.log(p), "bytes": None}
                for t, p in sorted(dist.items(), key=lambda kv: -kv[1])[:20]
                if p > 0
            ],
        }
        for tok, dist in positions
    ]
    text = "".join(t for t, _ in positions if not t.startswith("<|"))
    return {
        "id": "chatcmpl-standin",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "length",
                "logprobs": {"content": content},
            }
        ],
        "usage": {"prompt_tokens": 100, "completion_tokens": len(positions), "total_tokens": 100 + len(positions)},
    }


class JudgeStandIn:
    """Stand-in OpenAI-compatible judge server (see the module docstring).

    `reply(prompt) -> positions` decides the answer; `fail_first` lists HTTP statuses to send
    before answering normally; `fail(prompt) -> status | None` fails chosen prompts every time;
    `tokenize` (number text → token count) enables vLLM's /tokenize route.
    """

    def __init__(self, reply: Callable[[str], list[Position]], model: str = "judge-standin"):
        self.reply = reply
        self.model = model
        self.fail_first: list[int] = []
        self.fail: Callable[[str], int | None] = lambda prompt: None
        self.tokenize: Callable[[str], int] | None = None
        self.requests: list[dict[str, Any]] = []
        self.auth: set[str] = set()
        self._lock = threading.Lock()
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                standin.auth.add(self.headers.get("Authorization", ""))
                status, payload = standin.handle(self.path, body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("retry-after-ms", "5")  # keep the SDK's backoff short
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def chat_requests(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if "messages" in r]

    def handle(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.requests.append(body)
            queued = self.fail_first.pop(0) if self.fail_first else None
        if path == "/tokenize":
            if self.tokenize is None:
                return 404, {"detail": "Not Found"}
            return 200, {"count": self.tokenize(body["prompt"]), "tokens": [], "max_model_len": 8192}
        if path != "/v1/chat/completions":
            return 404, {"detail": "Not Found"}
        prompt = body["messages"][-1]["content"]
        status = queued or self.fail(prompt)
        if status:
            return status, {"error": {"message": f"stand-in says {status}", "type": "standin", "code": status}}
        return 200, chat_payload(self.model, self.reply(prompt), body.get("max_tokens") or 16)

    def __enter__(self) -> JudgeStandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


def judge_config(server: JudgeStandIn, **overrides: Any) -> JudgeConfig:
    fields = {"model": server.model, "base_url": server.base_url, "api_key_env": "CKPT_WATCH_TEST_JUDGE_KEY"}
    return JudgeConfig(**{**fields, **overrides})


def normal_reply(prompt: str) -> list[Position]:
    return [("85", NORMAL)]


@pytest.fixture
def judge_env(monkeypatch):
    monkeypatch.setenv("CKPT_WATCH_TEST_JUDGE_KEY", API_KEY)


def test_429_then_200_is_retried_by_the_client(judge_env, tmp_path):
    with JudgeStandIn(normal_reply) as server:
        server.fail_first = [429]
        judge = build_judge(judge_config(server, method="logprob", max_retries=3), None)
        result = asyncio.run(judge.score("rate this"))
    assert result.score == pytest.approx(NORMAL_EXPECTED) and result.error is None
    assert len(server.chat_requests()) == 2
    sent = server.chat_requests()[-1]
    # the published request shape
    assert (sent["max_tokens"], sent["temperature"], sent["logprobs"], sent["top_logprobs"]) == (1, 0, True, 20)
    assert server.auth == {f"Bearer {API_KEY}"}


def test_500_storm_is_retried_then_scored(judge_env):
    with JudgeStandIn(normal_reply) as server:
        server.fail_first = [500, 502, 503]
        judge = build_judge(judge_config(server, method="logprob", max_retries=4), None)
        result = asyncio.run(judge.score("rate this"))
    assert result.score == pytest.approx(NORMAL_EXPECTED)
    assert len(server.chat_requests()) == 4


def test_persistent_failure_is_unscored_with_the_error_and_no_extra_retries(judge_env):
    with JudgeStandIn(normal_reply) as server:
        server.fail = lambda prompt: 500
        judge = build_judge(judge_config(server, method="logprob", max_retries=2), None)
        results = asyncio.run(judge.score_many(["a", "b"]))
    for r in results:
        assert r.score is None
        assert "500" in r.error
    # 1 try + 2 SDK retries per prompt: nothing stacked on top of the client's policy
    assert len(server.chat_requests()) == 6


def test_cache_hit_on_a_second_judge(judge_env, tmp_path):
    with JudgeStandIn(normal_reply) as server:
        first = build_judge(judge_config(server, method="logprob"), tmp_path)
        a = asyncio.run(first.score_many(["p1", "p2"]))
        asyncio.run(first.aclose())
        second = build_judge(judge_config(server, method="logprob"), tmp_path)  # a restart
        b = asyncio.run(second.score_many(["p1", "p2"]))
    assert len(server.chat_requests()) == 2
    assert [x.score for x in a] == [x.score for x in b]
    assert all(x.cached and x.prompt_tokens == 0 for x in b)
    assert not any(x.cached for x in a) and a[0].prompt_tokens == 100
    assert API_KEY.encode() not in (tmp_path / "judge_cache.sqlite").read_bytes()
    assert API_KEY not in repr(second)


def test_cache_key_separates_model_and_method():
    keys = {JudgeCache.key(m, k, "p") for m in ("a", "b") for k in ("logprob", "digits")}
    assert len(keys) == 4


def test_failures_are_not_cached(judge_env, tmp_path):
    with JudgeStandIn(normal_reply) as server:
        server.fail = lambda prompt: 500
        asyncio.run(build_judge(judge_config(server, method="logprob", max_retries=0), tmp_path).score("p"))
        server.fail = lambda prompt: None
        result = asyncio.run(build_judge(judge_config(server, method="logprob"), tmp_path).score("p"))
    assert result.score is not None and not result.cached


def split_reply(prompt: str) -> list[Position]:
    return [("8", SPLIT_POS1), ("5", SPLIT_POS2), ("<|im_end|>", SPLIT_POS3)]


def test_auto_detects_split_digits_via_tokenize_route(judge_env):
    with JudgeStandIn(split_reply) as server:
        server.tokenize = len  # every digit its own token
        judge = build_judge(judge_config(server), None)
        result = asyncio.run(judge.score("rate this"))
    assert judge.method_name == "digits" and judge.detection == "tokenize route"
    assert result.score == pytest.approx(SPLIT_EXPECTED)
    assert server.chat_requests()[-1]["max_tokens"] == 5


def test_auto_detects_whole_number_tokens_via_tokenize_route(judge_env):
    with JudgeStandIn(normal_reply) as server:
        server.tokenize = lambda text: 1
        judge = build_judge(judge_config(server), None)
        result = asyncio.run(judge.score("rate this"))
    assert judge.method_name == "logprob" and judge.detection == "tokenize route"
    assert result.score == pytest.approx(NORMAL_EXPECTED)
    assert len(server.chat_requests()) == 1  # no probe needed


def test_auto_falls_back_to_a_probe(judge_env):
    whole = [("42", {"42": 0.8, "37": 0.2})]
    with JudgeStandIn(lambda p: whole if "Pick a whole number" in p else [("85", NORMAL)]) as server:
        judge = build_judge(judge_config(server), None)  # /tokenize answers 404
        result = asyncio.run(judge.score("rate this"))
    assert judge.method_name == "logprob" and judge.detection == "probe"
    assert result.score == pytest.approx(NORMAL_EXPECTED)


def test_inconclusive_probe_refuses_to_guess(judge_env):
    with JudgeStandIn(lambda p: [("Sure", {"Sure": 1.0})]) as server:
        judge = build_judge(judge_config(server), None)
        with pytest.raises(JudgeError, match=r"set judge\.method"):
            asyncio.run(judge.score_many(["rate this"]))


def test_missing_api_key_env(monkeypatch):
    monkeypatch.delenv("CKPT_WATCH_TEST_JUDGE_KEY", raising=False)
    with pytest.raises(JudgeError, match="CKPT_WATCH_TEST_JUDGE_KEY"):
        build_judge(JudgeConfig(model="m", api_key_env="CKPT_WATCH_TEST_JUDGE_KEY"), None)


def test_no_key_env_for_local_servers(tmp_path: Path):
    judge = build_judge(JudgeConfig(model="m", base_url="http://127.0.0.1:9/v1", api_key_env=None), tmp_path)
    assert judge.cache is not None
    no_cache = build_judge(JudgeConfig(model="m", api_key_env=None, cache=False), tmp_path)
    assert no_cache.cache is None


# -- judge.method resolved at start-up -----------------------------------------------------------


def test_resolve_judge_method_once_at_start_up(judge_env):
    with JudgeStandIn(split_reply) as server:
        server.tokenize = len  # a Qwen/SmolLM2-style vocabulary
        assert resolve_judge_method(judge_config(server), None) == "digits"
        seen = len(server.requests)
        judge = build_judge(judge_config(server), None, method="digits")
        result = asyncio.run(judge.score("rate this"))
        # configured methods are returned without a request
        assert resolve_judge_method(judge_config(server, method="logprob"), None) == "logprob"
    assert judge.method_name == "digits" and judge.detection == "start-up"
    assert result.score == pytest.approx(SPLIT_EXPECTED)
    assert len(server.requests) == seen + 1  # the step's judgement only: no detection per step


def test_undetectable_method_fails_at_start_up_as_a_config_error(judge_env):
    with JudgeStandIn(lambda p: [("Sure", {"Sure": 1.0})]) as server, pytest.raises(JudgeMethodError) as exc:
        resolve_judge_method(judge_config(server), None)
    assert isinstance(exc.value, ConfigError)
    (path, reason), = exc.value.errors
    assert path == "judge.method" and "set judge.method" in reason and "'Sure'" in reason


def test_unreachable_judge_at_start_up_is_not_a_config_error():
    """A judge outage produced for real: nothing listens on the port."""
    cfg = JudgeConfig(model="m", base_url=f"http://127.0.0.1:{_free_port()}/v1", api_key_env=None,
                      max_retries=0, timeout=5)
    with pytest.raises(JudgeUnavailable, match=r"judge\.method: cannot detect") as exc:
        resolve_judge_method(cfg, None)
    assert not isinstance(exc.value, ConfigError)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _validate(tmp_path: Path, server_url: str, method: str = "auto", retries: int = 5):
    from typer.testing import CliRunner

    from ckpt_watch.cli import app

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"base_model: smollm2\nsuites:\n  alignment:\n    samples_per_question: 1\n"
                   f"judge:\n  model: judge-standin\n  base_url: {server_url}\n  method: {method}\n"
                   f"  api_key_env: CKPT_WATCH_TEST_JUDGE_KEY\n  max_retries: {retries}\n")
    return CliRunner().invoke(app, ["validate", str(cfg)])


def test_validate_resolves_the_judge_method(judge_env, tmp_path):
    with JudgeStandIn(lambda p: [("Sure", {"Sure": 1.0})]) as server:
        bad = _validate(tmp_path, server.base_url)
        configured = _validate(tmp_path, server.base_url, method="logprob")
        probes = len(server.chat_requests())
        server.tokenize = len
        good = _validate(tmp_path, server.base_url)
    assert bad.exit_code == 2, bad.output
    assert "judge.method" in bad.output and "set judge.method" in bad.output
    assert configured.exit_code == 0 and "judge method logprob (configured)" in configured.output
    assert probes == 1  # `bad`: /tokenize answered 404, then one probe; `configured` asked nothing
    assert good.exit_code == 0, good.output
    assert "judge method digits (tokenize route)" in good.output
    down = _validate(tmp_path, f"http://127.0.0.1:{_free_port()}/v1", retries=0)  # a real outage: a closed port
    assert down.exit_code == 1 and "cannot detect" in down.output
