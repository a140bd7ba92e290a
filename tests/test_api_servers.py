"""`--api-server-count 2`: two API server processes on one socket and one engine core, on real processes.

Both serve (each process's own Prometheus files say how many requests it answered) with the greedy text of a single
server; /metrics from either sums them, with the core's step counters counted once; disconnects abort, API keys and
the (split) 429 bound hold; a killed core ends every request in flight on both with an error, /health answers 503
and the launcher exits 1; a killed API server stops the rest; SIGTERM drains both and the launcher exits 0. In
process: the core's routing, and an attached API server's view of the core's exit (pidfd, or polling the pid)."""

import asyncio
import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import msgspec
import pytest
import zmq
from conftest import REPO, ServerProcess, spawned_children, wait_for
from prometheus_client.multiprocess import MultiProcessCollector

from dspark.engine.core import EngineCore
from dspark.engine.core_client import AttachedCore
from dspark.engine.llm_engine import LLMEngine
from dspark.engine.messages import Abort, CoreReady, EngineCoreOutputs, EngineCoreRequest, Gauges, Shutdown
from dspark.engine.sampling import SamplingParams
from dspark.engine.settings import Settings
from dspark.loadtest.sweep import free_port, scrape

FLAGS = ("--max-num-batched-tokens", "256", "--speculative", "none")
PROMPTS = [f"def {name}(" for name in ("parse", "main", "read", "write", "split", "join", "sort", "find")]
COMPLETIONS = "/v1/completions"
ABORTED = 'dspark_request_finished_total{reason="abort"}'


def environ(pid: int) -> dict[str, str]:
    items = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(x.decode().split("=", 1) for x in items if b"=" in x)


class Launched:
    """The launcher's children: the engine core, and the API servers (those given PROMETHEUS_MULTIPROC_DIR)."""

    def __init__(self, server: ServerProcess, count: int = 2):
        assert wait_for(lambda: len(spawned_children(server.proc.pid)) == count + 1, 30), "processes missing"
        self.api, self.core = [], None
        for pid in spawned_children(server.proc.pid):
            env = environ(pid)
            if "PROMETHEUS_MULTIPROC_DIR" in env:
                self.api.append(pid)
                self.prom_dir = env["PROMETHEUS_MULTIPROC_DIR"]
            else:
                self.core = pid
        assert len(self.api) == count and self.core is not None

    def metrics(self, pid: int) -> dict[str, float]:
        """One API server's own samples, from its files in the multiprocess directory."""
        out = {}
        for metric in MultiProcessCollector.merge(glob.glob(f"{self.prom_dir}/*_{pid}.db")):
            for s in metric.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out


def served(launched: Launched, pid: int) -> float:
    return launched.metrics(pid).get(f'dspark_requests_total{{endpoint="{COMPLETIONS}",status="200"}}', 0.0)


def body(model: str, prompt: str, max_tokens: int, stream: bool = False) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": stream}


async def one(url: str, b: dict, delay: float = 0.0) -> tuple[str, int, int]:
    """(text, prompt tokens, completion tokens) of one request, on a connection of its own, after `delay` s."""
    await asyncio.sleep(delay)
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        if not b["stream"]:
            r = await c.post(COMPLETIONS, json=b)
            assert r.status_code == 200, r.text
            u = r.json()["usage"]
            return r.json()["choices"][0]["text"], u["prompt_tokens"], u["completion_tokens"]
        text, usage = "", None
        async with c.stream("POST", COMPLETIONS, json={**b, "stream_options": {"include_usage": True}}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    text += "".join(ch["text"] for ch in chunk["choices"])
                    usage = chunk.get("usage") or usage
        return text, usage["prompt_tokens"], usage["completion_tokens"]


def run_all(url: str, bodies: list[dict]) -> list[tuple[str, int, int]]:
    """All at once, their connections opened 20 ms apart: an API server woken by a burst accepts every connection
    pending, so a burst all at once tends to go to one of them."""
    async def go():
        return await asyncio.gather(*(one(url, b, 0.02 * i) for i, b in enumerate(bodies)))

    return asyncio.run(go())


def test_two_api_servers_serve_count_once_and_drain(server, model_dir):
    max_tokens = 16
    want = {p: text for p, (text, _, _) in
            zip(PROMPTS, run_all(server.url, [body(server.name, p, max_tokens) for p in PROMPTS]))}
    assert len(set(want.values())) > 3  # different answers: the comparison below is not vacuous
    s = ServerProcess(model_dir, *FLAGS, "--api-server-count", "2", "--enable-prefix-caching", "false",
                      "--drain-grace-s", "60")
    try:
        launched = Launched(s)
        sent = prompt_tokens = completion_tokens = 0
        for _ in range(4):  # the kernel spreads connections over the two unevenly: rounds until both have served
            bodies = [body(s.name, p, max_tokens, stream) for stream in (False, True) for p in PROMPTS]
            results = run_all(s.url, bodies)
            for b, (text, pt, ct) in zip(bodies, results):
                assert text == want[b["prompt"]], (b, text)
                assert ct == max_tokens
                prompt_tokens += pt
                completion_tokens += ct
            sent += len(bodies)
            if all(served(launched, pid) for pid in launched.api):
                break
        per_process = [served(launched, pid) for pid in launched.api]
        assert all(per_process) and sum(per_process) == sent, per_process

        # /metrics (from whichever API server answers) sums both
        m = s.metric
        assert m(f'dspark_requests_total{{endpoint="{COMPLETIONS}",status="200"}}') == sent
        assert m("dspark_prompt_tokens_total") == prompt_tokens
        assert m("dspark_generation_tokens_total") == completion_tokens
        # The core's step counters, counted once: every token the steps ran is a prompt token or a generated one fed
        # back (all but each request's last), with no prefix cache and no preemption.
        assert m("dspark_preemptions_total") == 0
        assert m("dspark_batch_tokens_per_step_sum") == prompt_tokens + completion_tokens - sent
        steps = m("dspark_step_seconds_count")
        assert steps >= max_tokens and m("dspark_batch_tokens_per_step_count") == steps
        own = [launched.metrics(pid).get("dspark_step_seconds_count", 0.0) for pid in launched.api]
        assert sorted(own) == [0.0, steps], own  # one API server (client 0) records the steps
        # gauges: each API server's own requests, summed (none left), and the core's KV pool from client 0
        assert wait_for(lambda: m("dspark_num_requests_running") == 0 and m("dspark_num_requests_waiting") == 0)
        assert m("dspark_kv_free_blocks") == m("dspark_kv_total_blocks") > 0
        # the GIE endpoint picker's vLLM-named twins merge the same way, and the cache info is exported once
        assert m("vllm:num_requests_running") == m("vllm:num_requests_waiting") == m("vllm:kv_cache_usage_perc") == 0
        info = [k for k in scrape(s.url) if k.startswith("vllm:cache_config_info{")]
        assert len(info) == 1 and f'num_gpu_blocks="{int(m("dspark_kv_total_blocks"))}"' in info[0], info

        # clients that go away mid-stream abort their requests, on whichever API server had them
        aborted = m(ABORTED, 0)
        for _ in range(3):
            with httpx.stream("POST", s.url + COMPLETIONS, json=body(s.name, "import os\n", 1500, True),
                              timeout=60) as r:
                chunks = (line for line in r.iter_lines() if line.startswith("data: {"))
                for _ in range(3):
                    next(chunks)
                assert m("vllm:num_requests_running") == 1  # summed over the API servers: the one has it
        assert wait_for(lambda: m(ABORTED, 0) == aborted + 3, 20), "the requests were not aborted"
        assert wait_for(lambda: m("dspark_kv_free_blocks") == m("dspark_kv_total_blocks"))
        assert wait_for(lambda: m("dspark_num_requests_running") == 0)

        # SIGTERM to the launcher drains both: streams in flight on each finish, new requests get 503, exit 0
        streams, done = [], []

        def stream() -> None:
            with httpx.stream("POST", s.url + COMPLETIONS, json={**body(s.name, "def main():\n", 400, True),
                                                                 "stream_options": {"include_usage": True}},
                              timeout=120) as r:
                done.append([line for line in r.iter_lines() if line.startswith("data: ")])

        def running(pid: int) -> float:
            return launched.metrics(pid).get("dspark_num_requests_running", 0.0)

        for _ in range(12):  # until both API servers have a stream running
            t = threading.Thread(target=stream)
            t.start()
            streams.append(t)
            time.sleep(0.2)
            if len(streams) >= 2 and all(running(pid) for pid in launched.api):
                break
        assert wait_for(lambda: all(running(pid) for pid in launched.api), 20), "a server has no stream in flight"
        s.proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: httpx.get(s.url + "/ready").status_code == 503), "readiness still passes"
        late = httpx.post(s.url + COMPLETIONS, json=body(s.name, "x", 2))
        assert late.status_code == 503 and late.json()["error"]["code"] == "draining"
        for t in streams:
            t.join(timeout=120)
        assert len(done) == len(streams)
        for lines in done:
            usage = [json.loads(x[6:])["usage"] for x in lines if x.startswith("data: {") and '"usage"' in x]
            assert usage and usage[-1]["completion_tokens"] == 400 and lines[-1] == "data: [DONE]", lines[-3:]
        assert s.proc.wait(60) == 0
        assert not any(Path(f"/proc/{pid}").exists() for pid in [*launched.api, launched.core])
        assert not Path(launched.prom_dir).exists()
    finally:
        if s.proc.poll() is None:
            s.stop()  # SIGTERM first: the launcher stops its core and API servers and removes its directories


def test_killed_core_fails_every_request_on_both_api_servers_and_the_launcher_exits_1(model_dir):
    s = ServerProcess(model_dir, *FLAGS, "--api-server-count", "2")
    try:
        launched = Launched(s)
        streams: list[list[str]] = []
        started = []

        def stream() -> None:
            events = []
            with httpx.stream("POST", s.url + COMPLETIONS, json=body(s.name, "def main(", 1500, True),
                              timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line)
                        if len(events) == 1:
                            started.append(1)
            streams.append(events)

        plain: list[httpx.Response] = []
        threads = [threading.Thread(target=lambda: plain.append(
            httpx.post(s.url + COMPLETIONS, json=body(s.name, "def f(", 1500), timeout=60)))]
        for _ in range(12):  # until both API servers have requests running
            threads.append(threading.Thread(target=stream))
            threads[-1].start()
            time.sleep(0.2)
            if len(threads) >= 5 and all(launched.metrics(pid).get("dspark_num_requests_running")
                                         for pid in launched.api):
                break
        threads[0].start()
        assert wait_for(lambda: len(started) == len(threads) - 1, 30)
        assert wait_for(lambda: all(launched.metrics(pid).get("dspark_num_requests_running")
                                    for pid in launched.api), 20), "an API server has nothing in flight"

        health: list[object] = []
        stop = threading.Event()

        def probe() -> None:  # /health on a new connection each time, until the launcher has exited
            while not stop.is_set():
                try:
                    health.append(httpx.get(s.url + "/health", timeout=5).status_code)
                except httpx.HTTPError as e:
                    health.append(type(e).__name__)
                time.sleep(0.005)

        prober = threading.Thread(target=probe)
        prober.start()
        try:
            assert wait_for(lambda: 200 in health, 10)
            t0 = time.monotonic()
            os.kill(launched.core, signal.SIGKILL)
            for t in threads:
                t.join(timeout=30)
            ended_s = time.monotonic() - t0
            assert not any(t.is_alive() for t in threads), "a request was left hanging"
            assert ended_s < 10, f"requests took {ended_s:.1f} s to end"
            assert s.proc.wait(timeout=30) == 1, "the launcher must exit non-zero when the engine core dies"
        finally:
            stop.set()
            prober.join()
        # probes: 200 until the kill, then 503 while the API servers linger, then refused once they have exited
        assert 503 in health, f"/health never answered 503: {health}"
        assert 200 not in health[health.index(503):], health
        for events in streams:
            assert events[-1] == "data: [DONE]"
            err = json.loads(events[-2][len("data: "):])["error"]
            assert err["type"] == "server_error" and "engine" in err["message"], err
        assert plain[0].status_code == 503 and plain[0].json()["error"]["code"] == "engine_dead", plain[0].text
        assert not any(Path(f"/proc/{pid}").exists() for pid in launched.api)
    finally:
        if s.proc.poll() is None:
            s.stop()  # SIGTERM first: the launcher stops its core and API servers and removes its directories


def test_keys_and_the_429_bound_per_api_server_then_a_dead_one_stops_the_rest(model_dir):
    """API keys and the bounded queue hold on every API server (the bound split: --max-waiting 2 over 2 is 1 each);
    then one API server killed: the launcher stops the other and the core, and exits 1."""
    s = ServerProcess(model_dir, *FLAGS, "--api-server-count", "2", "--api-key", "k1", "--max-num-seqs", "1",
                      "--max-waiting", "2")
    try:
        launched = Launched(s)
        key = {"Authorization": "Bearer k1"}
        assert httpx.get(s.url + "/v1/models").status_code == 401
        assert httpx.get(s.url + "/v1/models", headers=key).status_code == 200
        b = {**body(s.name, "import os\n", 48), "ignore_eos": True}

        async def burst():
            async def post():
                async with httpx.AsyncClient(base_url=s.url, timeout=120, headers=key) as c:
                    return await c.post(COMPLETIONS, json=b)

            return await asyncio.gather(*(post() for _ in range(10)))

        replies = asyncio.run(burst())
        codes = sorted(r.status_code for r in replies)
        assert set(codes) == {200, 429}, codes
        for r in replies:
            if r.status_code == 429:
                err = r.json()["error"]
                assert err["type"] == "rate_limit_error" and err["code"] == "queue_full" and r.headers["retry-after"]
            else:
                assert r.json()["usage"]["completion_tokens"] == 48
        assert s.metric('dspark_rejected_requests_total{reason="queue_full"}') == codes.count(429)
        assert s.metric('dspark_requests_total{endpoint="/v1/models",status="401"}') == 1

        os.kill(launched.api[0], signal.SIGKILL)
        assert s.proc.wait(timeout=30) == 1
        assert not any(Path(f"/proc/{pid}").exists() for pid in [*launched.api, launched.core])
    finally:
        if s.proc.poll() is None:
            s.stop()  # SIGTERM first: the launcher stops its core and API servers and removes its directories


def test_settings_need_a_core_process_for_several_api_servers():
    with pytest.raises(ValueError, match="engine_core process"):
        Settings(api_server_count=2, engine_core="thread")
    with pytest.raises(ValueError, match="at least 1"):
        Settings(api_server_count=0)


def test_the_core_routes_outputs_to_their_client_and_step_counters_to_client_0():
    """In process: two clients' requests on one EngineCore. Each client gets only its own outputs and running /
    waiting counts; client 0 gets every step's counters, also in steps with no output of its own."""
    core = EngineCore(LLMEngine(Settings(speculative="none")), clients=2)
    six, two = (SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (6, 2))
    inputs = [[EngineCoreRequest("a", [1, 2, 3], six, 1), EngineCoreRequest("b", [4, 5], six, 1),
               EngineCoreRequest("c", [6, 7], two, 0)], [], [Abort(["b"])]]
    sent: list[tuple[int, EngineCoreOutputs]] = []

    def receive(block: bool) -> list:
        if inputs:
            return inputs.pop(0)
        return [] if core.engine.has_unfinished() else [Shutdown()]

    core.run(receive, lambda client, batch: sent.append((client, batch)))
    outs = {0: {}, 1: {}}
    for client, batch in sent:
        for o in batch.outputs:
            tokens, _ = outs[client].get(o.request_id, (0, None))
            outs[client][o.request_id] = (tokens + len(o.token_ids), o.finish_reason)
    assert outs[0] == {"c": (2, "length")}
    assert outs[1]["a"] == (6, "length") and outs[1]["b"][0] < 6 and outs[1]["b"][1] is None  # b: aborted
    with_stats = [(client, batch) for client, batch in sent if batch.stats is not None]
    assert all(client == 0 for client, _ in with_stats) and len(with_stats) == core.engine.stats["steps"]
    assert any(not batch.outputs for _, batch in with_stats)  # after c finished: counters alone, to client 0
    assert any(client == 1 and batch.gauges.running == 2 for client, batch in sent)
    assert all(batch.gauges.running + batch.gauges.waiting <= 1 for client, batch in sent if client == 0)
    last = {client: (batch.gauges.running, batch.gauges.waiting) for client, batch in sent}
    assert last == {0: (0, 0), 1: (0, 0)}
    assert not core._owner  # nothing kept for finished or aborted requests


def test_a_core_that_cannot_start_is_reported_and_the_launcher_exits_1(tmp_path):
    """A bad model: the core says why, the launcher prints it and exits 1 before any API server starts."""
    r = subprocess.run([sys.executable, "-m", "dspark", "serve", "--model", str(tmp_path), "--speculative", "none",
                        "--api-server-count", "2", "--port", str(free_port())], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and "the engine core could not start" in r.stderr and "config.json" in r.stderr, r.stderr


@pytest.mark.parametrize("pidfd", [True, False])
def test_an_attached_api_server_sees_outputs_and_the_core_exit(tmp_path, monkeypatch, pidfd):
    """AttachedCore against a stand-in core (its sockets here, its pid a `sleep`): outputs arrive, and the core's exit
    is seen through a pidfd, or without one (os.pidfd_open failing) by polling the pid; shutdown() returns while
    the core lives on."""
    if not pidfd:
        monkeypatch.setattr(os, "pidfd_open", lambda pid: (_ for _ in ()).throw(OSError("no pidfd")))
    info = CoreReady(64, 100, 10, "tiny", 16, True)
    addrs = [f"ipc://{tmp_path}/in", f"ipc://{tmp_path}/out"]
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.connect(addrs[0])
    push.connect(addrs[1])
    procs = [subprocess.Popen(["sleep", "60"]) for _ in range(2)]

    async def run(proc, kill: bool) -> tuple[list, list, bool]:
        client = AttachedCore(info, *addrs, proc.pid, index=1)
        outputs, dead = [], []
        loop = asyncio.get_running_loop()
        client.start(outputs.append, lambda reason: dead.append((reason, loop.time())))
        client.send(Abort(["x"]))
        assert msgspec.msgpack.decode(pull.recv(), type=Abort).request_ids == ["x"]
        push.send(msgspec.msgpack.encode(EngineCoreOutputs([], Gauges(0, 0, 0.0, 10, 0))))
        for _ in range(100):
            if outputs:
                break
            await asyncio.sleep(0.02)
        if kill:
            t0 = loop.time()
            proc.kill()
            for _ in range(150):
                if dead:
                    break
                await asyncio.sleep(0.02)
            assert dead and dead[0][1] - t0 < 2.0 and str(proc.pid) in dead[0][0], dead
        alive = client.alive
        client.shutdown()
        return outputs, dead, alive

    try:
        outputs, dead, alive = asyncio.run(run(procs[0], kill=False))
        assert len(outputs) == 1 and not dead and alive  # shutdown() let go of a live core, no on_dead
        outputs, dead, alive = asyncio.run(run(procs[1], kill=True))
        assert len(outputs) == 1 and len(dead) == 1 and not alive
    finally:
        for p in procs:
            p.kill()
            p.wait()
        pull.close(0)
        push.close(0)
        ctx.term()
