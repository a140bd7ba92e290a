"""`dspark loadtest routing`'s parts, against stub HTTP servers (stdlib, no model): the multi-turn replay resends the
answers the server gave (--history generated) or the recorded ones; a replica's KV capacity read off /metrics;
and the session-affinity recipe's bounded load through a real nginx: a replica at max_conns spills a session's
request to the next replica on the hash ring."""

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from conftest import needs_tool

from dspark.loadtest.nginx import NGINX, Nginx
from dspark.loadtest.prefix_bench import replay
from dspark.loadtest.routing import SESSION_HEADER, kv_tokens
from dspark.loadtest.sweep import parse_metrics


class Stub:
    """A stub upstream on a free loopback port. POST /v1/chat/completions streams one SSE content chunk,
    "answer <n> from <port>" (n counts the requests of its X-Session-Id here) and a usage chunk; POST /slow sleeps
    `slow_s` and answers {"port": ...}; GET /health answers 200. Every request is recorded."""

    def __init__(self, slow_s: float = 0.0):
        stub = self
        self.requests: list[dict] = []  # {"path", "session", "body", "at"}
        self.arrived = threading.Event()  # set when a /slow request arrives
        self.lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, body: bytes, ctype: str):
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._send(b"ok", "text/plain")

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                session = self.headers.get(SESSION_HEADER)
                with stub.lock:
                    stub.requests.append({"path": self.path, "session": session, "body": body,
                                          "at": time.perf_counter()})
                    n = sum(r["session"] == session and r["path"] == self.path for r in stub.requests)
                if self.path == "/slow":
                    stub.arrived.set()
                    time.sleep(slow_s)
                    self._send(json.dumps({"port": stub.port}).encode(), "application/json")
                    return
                text = f"answer {n} from {stub.port}"
                events = [{"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": "length"}]},
                          {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}}]
                sse = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
                self._send(sse.encode(), "text/event-stream")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    s = Stub()
    yield s
    s.stop()


CONVS = [[{"role": "user", "content": f"c{i} q{t}"} if k == 0 else {"role": "assistant", "content": f"c{i} a{t}"}
          for t in range(3) for k in range(2)] for i in range(2)]


def test_generated_history_resends_the_answer_the_server_streamed(stub):
    results, _ = asyncio.run(replay(stub.url, "m", CONVS, 3, served=True, session_header=SESSION_HEADER))
    assert len(results) == 6 and all(r.ok for r in results)
    for i in range(2):
        sent = [r["body"]["messages"] for r in stub.requests if r["session"] == f"conversation-{i}"]
        # turn t: the recorded user turns, each previous one followed by the answer the stub gave it
        assert sent == [
            [{"role": "user", "content": f"c{i} q0"}],
            [{"role": "user", "content": f"c{i} q0"}, {"role": "assistant", "content": f"answer 1 from {stub.port}"},
             {"role": "user", "content": f"c{i} q1"}],
            [{"role": "user", "content": f"c{i} q0"}, {"role": "assistant", "content": f"answer 1 from {stub.port}"},
             {"role": "user", "content": f"c{i} q1"}, {"role": "assistant", "content": f"answer 2 from {stub.port}"},
             {"role": "user", "content": f"c{i} q2"}]]
    assert all(r["body"]["stream"] and r["body"]["max_tokens"] == 3 for r in stub.requests)


def test_recorded_history_resends_sharegpts_answers_and_no_header_without_affinity(stub):
    results, _ = asyncio.run(replay(stub.url, "m", CONVS, 3, served=False))
    assert all(r.ok for r in results) and {r["session"] for r in stub.requests} == {None}
    last = [r["body"]["messages"] for r in stub.requests if len(r["body"]["messages"]) == 5]
    assert sorted(m[-1]["content"] for m in last) == ["c0 q2", "c1 q2"]
    assert all(m == CONVS[int(m[0]["content"][1])][:5] for m in last)  # the recorded conversation, verbatim


def test_kv_capacity_in_tokens_from_metrics():
    page = parse_metrics('dspark_kv_total_blocks 1200.0\n'
                         'vllm:cache_config_info{block_size="16",enable_prefix_caching="True",num_gpu_blocks="1200"} '
                         '1.0\n')
    assert kv_tokens(page) == 1200 * 16
    assert kv_tokens({"dspark_kv_total_blocks": 8.0}) is None


@needs_tool(NGINX, "nginx is not installed (.ci/run installs Debian's nginx-light)")
def test_consistent_hash_spills_a_session_to_the_other_replica_at_max_conns(tmp_path):
    """deploy/nginx/nginx-session-affinity.conf with max_conns=1: two slow requests of one session at once are both
    served, by different upstreams (the second skips its hashed replica, which is at its bound, for the next one on
    the ring). A third at once finds both at their bound: open-source nginx has no queue (`queue` is NGINX Plus),
    so it answers 502 at once rather than wait."""
    slow_s = 1.5
    a, b = Stub(slow_s), Stub(slow_s)
    lb = None
    try:
        lb = Nginx(tmp_path / "nginx", [f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"], "nginx-session-affinity.conf",
                   "max_fails=2 fail_timeout=10s max_conns=1")
        headers = {SESSION_HEADER: "conversation-7"}
        # with no load, every request of the session goes to one replica (affinity)
        alone = [httpx.post(lb.url + "/v1/chat/completions", headers=headers, json={"messages": []}, timeout=10)
                 for _ in range(4)]
        assert len({r.text.split(" from ")[1].split('"')[0] for r in alone}) == 1
        stubs = {a.port: a, b.port: b}
        first_port = int(alone[0].text.split(" from ")[1].split('"')[0])
        home, other = stubs[first_port], stubs[a.port + b.port - first_port]

        def post(out, i):
            out[i] = httpx.post(lb.url + "/slow", headers=headers, json={}, timeout=30)

        out: dict[int, httpx.Response] = {}
        threads = [threading.Thread(target=post, args=(out, i)) for i in range(3)]
        threads[0].start()
        assert home.arrived.wait(10), "the first slow request did not reach the session's replica"
        threads[1].start()
        assert other.arrived.wait(10), "the second slow request did not spill to the other replica"
        t0 = time.perf_counter()
        threads[2].start()
        threads[2].join(30)
        third_s = time.perf_counter() - t0
        for t in threads[:2]:
            t.join(30)
        assert [out[i].status_code for i in (0, 1)] == [200, 200]
        assert [out[i].json()["port"] for i in (0, 1)] == [home.port, other.port]
        # both replicas at their bound: refused at once (502, nothing waits in nginx for a slot)
        assert out[2].status_code == 502 and third_s < slow_s
        assert len([r for r in home.requests + other.requests if r["path"] == "/slow"]) == 2
        assert "upstream=127.0.0.1" in "\n".join(lb.access_log())
    finally:
        if lb is not None:
            lb.stop()
        a.stop()
        b.stop()
