"""Engine faults and oversized bodies: OpenAI-shaped errors with a request id, and the server keeps serving."""

import pytest
from fastapi.testclient import TestClient

from dspark.engine.core_client import ThreadCore
from dspark.engine.llm_engine import LLMEngine
from dspark.engine.settings import Settings
from dspark.engine.tokenizer import Tokenizer
from dspark.server.app import create_app
from dspark.server.async_llm import AsyncLLM


@pytest.fixture(scope="module")
def app_and_engine():
    settings = Settings(speculative="none", max_request_bytes=20_000)
    engine = AsyncLLM(ThreadCore(LLMEngine(settings)), Tokenizer(settings.model))
    with TestClient(create_app(engine, settings), raise_server_exceptions=False) as client:
        yield client, engine.client.core.engine  # the core's LLMEngine, on the core thread


def test_engine_step_failure_is_a_500_with_request_id_then_recovers(app_and_engine, monkeypatch):
    client, engine = app_and_engine
    body = {"model": "tiny-qwen3-5m", "prompt": "def f(", "max_tokens": 4}
    real_step = engine.step
    calls = {"n": 0}

    def failing_once():
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected fault")
        return real_step()

    monkeypatch.setattr(engine, "step", failing_once)
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["type"] == "server_error" and r.headers["x-request-id"] in err["message"]
    r = client.post("/v1/completions", json=body)  # the loop survived the fault
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert client.get("/health").status_code == 200
    assert engine.block_manager.num_free == engine.block_manager.num_blocks


def test_streaming_engine_failure_reports_in_band(app_and_engine, monkeypatch):
    client, engine = app_and_engine
    monkeypatch.setattr(engine, "step", lambda: (_ for _ in ()).throw(RuntimeError("injected")))
    r = client.post("/v1/completions", json={"model": "tiny-qwen3-5m", "prompt": "x", "max_tokens": 4,
                                             "stream": True})
    assert r.status_code == 200 and '"server_error"' in r.text and r.text.rstrip().endswith("data: [DONE]")


def test_oversized_body_is_413_with_or_without_content_length(app_and_engine):
    client, _ = app_and_engine
    big = {"model": "tiny-qwen3-5m", "prompt": "x" * 30_000, "max_tokens": 1}
    r = client.post("/v1/completions", json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked(data: bytes, n: int = 4096):  # a generator body is sent chunked, without Content-Length
        for i in range(0, len(data), n):
            yield data[i : i + n]

    import json

    r = client.post("/v1/completions", content=chunked(json.dumps(big).encode()),
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
    small = json.dumps({"model": "tiny-qwen3-5m", "prompt": "def f(", "max_tokens": 2}).encode()
    r = client.post("/v1/completions", content=chunked(small, 7), headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2 and "x-request-id" in r.headers


def test_deadline_ends_a_request_with_its_finish_reason(app_and_engine):
    client, engine = app_and_engine
    body = {"model": "tiny-qwen3-5m", "prompt": "def f(", "max_tokens": 1500, "ignore_eos": True, "deadline_s": 0.3}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200
    choice, usage = r.json()["choices"][0], r.json()["usage"]
    assert choice["finish_reason"] == "deadline" and 0 < usage["completion_tokens"] < 1500
    r = client.post("/v1/completions", json={**body, "stream": True})
    assert '"finish_reason": "deadline"' in r.text
    assert engine.block_manager.num_free == engine.block_manager.num_blocks
    assert client.post("/v1/completions", json={**body, "deadline_s": -1}).status_code == 400
