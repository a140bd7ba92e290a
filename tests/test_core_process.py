"""The engine core in its own process: killed mid-stream, every request in flight ends at once with an
OpenAI-shaped error, and the server exits non-zero (so that a supervisor restarts it); on a thread, a core that
dies does the same to its requests and /health."""

import json
import os
import signal
import threading
import time

import httpx
import pytest
from conftest import spawned_children, wait_for
from fastapi.testclient import TestClient

from dspark.engine.core_client import ThreadCore
from dspark.engine.llm_engine import LLMEngine
from dspark.engine.settings import Settings
from dspark.engine.tokenizer import Tokenizer
from dspark.loadtest.sweep import Server
from dspark.server.app import create_app
from dspark.server.async_llm import AsyncLLM


def core_pid(server_pid: int) -> int:
    """The server's engine core: its child started by multiprocessing's spawn."""
    children = spawned_children(server_pid)
    assert children, "no engine core process"
    return children[0]


def test_killed_core_ends_every_request_with_an_error_and_the_server_exits(tmp_path):
    server = Server(["--engine-core", "process", "--speculative", "none", "--max-num-seqs", "8"], log_dir=tmp_path)
    try:
        name = server.model
        body = {"model": name, "prompt": "def main(", "max_tokens": 1500, "ignore_eos": True, "temperature": 0}
        results: dict[str, object] = {}
        started = threading.Barrier(5)

        def stream(i: int) -> None:
            events = []
            with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True},
                              timeout=60) as r:
                lines = (line for line in r.iter_lines() if line.startswith("data: "))
                events.append(next(lines))
                started.wait(timeout=60)
                events += list(lines)
            results[f"stream{i}"] = events

        def plain() -> None:
            results["plain"] = httpx.post(server.url + "/v1/completions", json=body, timeout=60)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)] + [threading.Thread(target=plain)]
        for t in threads:
            t.start()
        started.wait(timeout=60)  # every stream has its first token: all five requests are in flight
        time.sleep(0.3)
        t0 = time.monotonic()
        os.kill(core_pid(server.proc.pid), signal.SIGKILL)
        for t in threads:
            t.join(timeout=30)
        ended_s = time.monotonic() - t0
        assert not any(t.is_alive() for t in threads), "a request was left hanging"
        assert ended_s < 10, f"requests took {ended_s:.1f} s to end"
        for i in range(4):
            events = results[f"stream{i}"]
            assert events[-1] == "data: [DONE]"
            err = json.loads(events[-2][len("data: "):])["error"]
            assert err["type"] == "server_error" and "engine" in err["message"], err
        r = results["plain"]
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead", r.text
        assert server.proc.wait(timeout=30) == 1, "the server must exit non-zero when its engine core dies"
    finally:
        server.stop()


@pytest.fixture
def thread_app():
    settings = Settings(speculative="none")
    engine = AsyncLLM(ThreadCore(LLMEngine(settings)), Tokenizer(settings.model))
    exits = []
    with TestClient(create_app(engine, settings), raise_server_exceptions=False) as client:
        engine.on_fatal = exits.append
        yield client, engine, exits


def test_a_dead_core_thread_fails_requests_and_health(thread_app, monkeypatch):
    client, engine, exits = thread_app
    assert client.get("/health").status_code == 200

    def die():
        raise SystemExit("injected: the core thread ends")

    monkeypatch.setattr(engine.client.core.engine, "step", die)
    r = client.post("/v1/completions", json={"model": "tiny-qwen3-5m", "prompt": "x", "max_tokens": 8})
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
    assert wait_for(lambda: not engine.client.alive, 5)
    h = client.get("/health")
    assert h.status_code == 503 and h.json()["error"]["type"] == "server_error"
    assert exits and "engine core thread died" in exits[0]
    r = client.post("/v1/completions", json={"model": "tiny-qwen3-5m", "prompt": "x", "max_tokens": 8,
                                             "stream": True})
    assert '"server_error"' in r.text and r.text.rstrip().endswith("data: [DONE]")
