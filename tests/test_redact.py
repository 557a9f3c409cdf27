"""Secrets in URLs never reach a log line, an error text or an MLflow param.

`redact_url` / `redact_text` on hand-checked cases, then the real MLflow sink on a real SQLite
store (params built by the daemon's `run_params` from a config holding credentials) and on an
unreachable tracking URI that carries credentials, with every log record captured.
"""

from __future__ import annotations

import logging
import socket
import sqlite3
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ckpt_watch.config import MlflowConfig, parse_config
from ckpt_watch.redact import REDACTED, redact_text, redact_url
from ckpt_watch.sinks import mlflow as mlflow_sink
from ckpt_watch.sinks.mlflow import MlflowSink

SECRET = "s3cr3t-Pa55word"
TOKEN = "tok-0123456789abcdef"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://user:pass@host:5000/api", "http://user:***@host:5000/api"),
        ("postgresql://u:pw@h/db", "postgresql://u:***@h/db"),
        ("postgresql+psycopg2://u:p%40ss@h:5432/db?sslmode=require",
         "postgresql+psycopg2://u:***@h:5432/db?sslmode=require"),
        ("https://ghp_abcdef123456@github.com/x.git", "https://***@github.com/x.git"),
        ("https://h/v1?token=abc&model=m", "https://h/v1?token=***&model=m"),
        ("https://h/v1?model=m&api_key=abc", "https://h/v1?model=m&api_key=***"),
        ("https://h/p?X-Amz-Signature=ff&X-Amz-Credential=AK%2F1&x=1",
         "https://h/p?X-Amz-Signature=***&X-Amz-Credential=***&x=1"),
        ("https://h/cb#access_token=abc&state=1", "https://h/cb#access_token=***&state=1"),
        ("https://h/p?apiKey=1&sig=2&password=3&client_secret=4",
         "https://h/p?apiKey=***&sig=***&password=***&client_secret=***"),
        # nothing secret: unchanged, byte for byte
        ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1"),
        ("sqlite:////abs/path/mlflow.db", "sqlite:////abs/path/mlflow.db"),
        ("https://h/v1?model=m&limit=5", "https://h/v1?model=m&limit=5"),
        ("http://user@host/x@y", "http://***@host/x@y"),  # '@' in the path is not userinfo
        ("not a url", "not a url"),
        ("", ""),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_redact_text_finds_urls_in_messages() -> None:
    msg = (f"API request to http://admin:{SECRET}@10.0.0.5:5000/api/2.0/mlflow/runs/get failed "
           f"(also tried 'postgresql://u:{SECRET}@db/x', https://h/v1?token={TOKEN}).")
    out = redact_text(msg)
    assert SECRET not in out and TOKEN not in out
    assert out == ("API request to http://admin:***@10.0.0.5:5000/api/2.0/mlflow/runs/get failed "
                   "(also tried 'postgresql://u:***@db/x', https://h/v1?token=***).")
    assert redact_text("no url here: 3 < 4") == "no url here: 3 < 4"
    assert REDACTED == "***"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*mlflow_sink._HTTP_CAPS, "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)


def _config_with_credentials(tmp_path: Path):
    """A real config whose values carry credentials the daemon would log as run params."""
    return parse_config({
        "base_model": "smollm2",
        "results_dir": str(tmp_path / "res"),
        "suites": {"compliance": {
            "preferences": {"p": {"verifier": "no_emoji", "probe_prompts": ["hi"]}},
            "system_prompt": f"Fetch http://bot:{SECRET}@intranet/docs and https://h/x?api_key={TOKEN}",
        }},
    })


def test_mlflow_params_and_logs_carry_no_secret(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from ckpt_watch.daemon import run_params

    params = run_params(_config_with_credentials(tmp_path))
    assert SECRET not in str(params) and TOKEN not in str(params)
    params["engine.url"] = f"https://vllm:{SECRET}@gpu-pod:8000/v1"  # what a caller might add
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    caplog.set_level(logging.DEBUG)
    sink = MlflowSink(MlflowConfig(tracking_uri=uri), tmp_path / "res", background=False)
    sink.start("creds", params)
    assert sink.flush().error is None
    stored = MlflowClient(tracking_uri=uri).get_run(sink.run_id).data.params
    assert stored["engine.url"] == "https://vllm:***@gpu-pod:8000/v1"
    assert stored["compliance.system_prompt"] == "Fetch http://bot:***@intranet/docs and https://h/x?api_key=***"
    assert not any(SECRET in v or TOKEN in v for v in stored.values())
    sink.close()
    assert SECRET not in caplog.text and TOKEN not in caplog.text
    outbox = tmp_path / "res" / "creds" / mlflow_sink.OUTBOX_FILE
    assert SECRET.encode() not in outbox.read_bytes()


def test_unreachable_tracking_uri_with_credentials_is_logged_redacted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail at once (the cap keeps lower values)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    uri = f"http://ops:{SECRET}@127.0.0.1:{port}"
    caplog.set_level(logging.DEBUG)
    sink = MlflowSink(MlflowConfig(tracking_uri=uri), tmp_path, background=False, close_timeout=10)
    sink.start("dead", {"engine": "vllm"})
    report = sink.flush()
    sink.close()
    assert report.error and SECRET not in report.error and SECRET not in (sink.last_error or "")
    assert f"http://ops:***@127.0.0.1:{port}" in caplog.text  # the line still says where
    assert SECRET not in caplog.text
    db = sqlite3.connect(tmp_path / "dead" / mlflow_sink.OUTBOX_FILE)
    stored = " ".join(str(v) for row in db.execute("SELECT * FROM outbox") for v in row)
    db.close()
    assert SECRET not in stored


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_judge_errors_and_repr_carry_no_secret(caplog: pytest.LogCaptureFixture) -> None:
    """A real judge outage (a closed port) behind a base_url that carries credentials."""
    import asyncio

    from ckpt_watch.config import JudgeConfig
    from ckpt_watch.judge import JudgeUnavailable, build_judge, resolve_judge_method

    caplog.set_level(logging.DEBUG)
    url = f"http://bot:{SECRET}@127.0.0.1:{_closed_port()}/v1"
    cfg = JudgeConfig(model="m", base_url=url, api_key_env=None, max_retries=0, timeout=5)
    assert repr(build_judge(cfg, None)).count("bot:***@127.0.0.1") == 1
    with pytest.raises(JudgeUnavailable) as exc:
        resolve_judge_method(cfg, None)
    assert "bot:***@127.0.0.1" in str(exc.value) and SECRET not in str(exc.value)
    judgement = asyncio.run(build_judge(cfg.model_copy(update={"method": "logprob"}), None).score("rate"))
    assert judgement.score is None and judgement.error and SECRET not in judgement.error
    assert SECRET not in caplog.text


def test_attached_engine_status_carries_no_secret(smollm2_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """engine.url with credentials, and nothing listening there (a real outage)."""
    import asyncio

    from ckpt_watch.core import EngineUnavailable
    from ckpt_watch.engines.vllm import VLLMEngine

    caplog.set_level(logging.DEBUG)
    url = f"http://ops:{SECRET}@127.0.0.1:{_closed_port()}/v1"
    config = parse_config({"base_model": str(smollm2_path), "engine": {"kind": "vllm", "url": url, "max_retries": 0},
                           "suites": {"heldout_loss": {}}})
    engine = VLLMEngine(config)
    with pytest.raises(EngineUnavailable) as exc:
        asyncio.run(engine.start())
    assert "ops:***@127.0.0.1" in str(exc.value) and "ops:***@127.0.0.1" in engine.status
    assert SECRET not in str(exc.value) and SECRET not in engine.status and SECRET not in caplog.text


def test_log_filter_redacts_whatever_is_logged() -> None:
    import io

    from ckpt_watch.redact import RedactFilter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.addFilter(RedactFilter())
    log = logging.getLogger("ckpt_watch.test_redact_filter")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("connecting to %s", f"postgresql://u:{SECRET}@db:5432/mlflow")
        try:
            raise ConnectionError(f"refused: https://h/v1?token={TOKEN}")
        except ConnectionError:
            log.exception("judge down")
    finally:
        log.removeHandler(handler)
    text = stream.getvalue()
    assert "WARNING connecting to postgresql://u:***@db:5432/mlflow" in text
    assert "ConnectionError: refused: https://h/v1?token=***" in text
    assert SECRET not in text and TOKEN not in text
