"""Graceful drain on SIGTERM, on real server processes: readiness fails while liveness holds, new requests get 503
with Retry-After, streams already in flight finish, and the process exits 0; past the grace period streams are cut
and the exit is still 0."""

import json
import signal
import time

import httpx
from conftest import ServerProcess, wait_for

from dspark.server.drain import SHUTDOWN_S

FLAGS = ("--max-num-batched-tokens", "256", "--speculative", "none")


def first_chunk(lines) -> None:
    for line in lines:
        if line.startswith("data: {"):
            return


def stream_body(server, max_tokens: int) -> dict:
    return {"model": server.name, "prompt": "def main():\n", "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}


def test_sigterm_finishes_in_flight_streams_refuses_new_requests_and_exits_0(model_dir):
    s = ServerProcess(model_dir, *FLAGS, "--drain-grace-s", "60", "--drain-retry-after-s", "7")
    try:
        assert httpx.get(s.url + "/ready").status_code == 200
        with httpx.stream("POST", s.url + "/v1/completions", json=stream_body(s, 600), timeout=60) as r:
            lines = r.iter_lines()
            first_chunk(lines)
            s.proc.send_signal(signal.SIGTERM)
            assert wait_for(lambda: httpx.get(s.url + "/ready").status_code == 503), "readiness still passes"
            assert httpx.get(s.url + "/health").status_code == 200  # alive: do not restart it
            late = httpx.post(s.url + "/v1/completions", json={"model": s.name, "prompt": "x", "max_tokens": 2})
            assert late.status_code == 503
            assert late.headers["retry-after"] == "7"
            assert late.json()["error"]["code"] == "draining" and late.headers["x-request-id"]
            assert s.proc.poll() is None  # still serving the stream
            rest = list(lines)
        usage = [json.loads(x[6:])["usage"] for x in rest if x.startswith("data: {") and '"usage"' in x]
        assert usage and usage[-1]["completion_tokens"] == 600, "the in-flight stream was cut"
        assert "data: [DONE]" in rest
        assert s.proc.wait(30) == 0
    finally:
        if s.proc.poll() is None:
            s.proc.kill()


def test_grace_period_bounds_the_drain(model_dir):
    s = ServerProcess(model_dir, *FLAGS, "--drain-grace-s", "0.5")
    rest = []
    try:
        with httpx.stream("POST", s.url + "/v1/completions", json=stream_body(s, 2000), timeout=60) as r:
            lines = r.iter_lines()
            first_chunk(lines)
            t0 = time.monotonic()
            s.proc.send_signal(signal.SIGTERM)
            try:
                for line in lines:
                    rest.append(line)
            except httpx.HTTPError:  # the server closed the stream mid-body
                pass
            cut_after = time.monotonic() - t0
        assert s.proc.wait(30) == 0
        chunks = sum(x.startswith("data: {") for x in rest)
        assert "data: [DONE]" not in rest and chunks < 1999, f"the stream was not cut ({chunks} chunks)"
        assert cut_after < 0.5 + SHUTDOWN_S + 1.5, f"cut {cut_after:.1f} s after SIGTERM"
    finally:
        if s.proc.poll() is None:
            s.proc.kill()


def test_sigterm_on_an_idle_server_exits_at_once(model_dir):
    s = ServerProcess(model_dir, *FLAGS)
    t0 = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(30) == 0
    assert time.monotonic() - t0 < 10
