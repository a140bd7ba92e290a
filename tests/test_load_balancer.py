"""Two replicas behind nginx (Debian's package, the project's deploy/nginx/nginx.conf), the load test through it,
and a rolling restart: one replica gets SIGTERM mid-run. Every request must complete in full (those the draining
replica answers 503 nginx retries on the other), the streams in flight on the drained replica finish, it exits 0,
and the survivor carries the rest. The replicas log JSON; the test reads their logs to know who served what."""

import asyncio
import json
import signal
import threading
import time

from conftest import ServerProcess, needs_tool, wait_for

from dspark.loadtest.loadgen import LoadConfig, builtin_prompts, closed_loop
from dspark.loadtest.nginx import NGINX, Nginx

KEY = "sk-lb-test-0123456789"
MAX_TOKENS = 32
USERS, PER_USER = 6, 40


def json_log(server: ServerProcess) -> list[dict]:
    lines = server.log_path.read_text().splitlines()
    return [json.loads(x) for x in lines if x.startswith("{")]


@needs_tool(NGINX, "nginx is not installed (.ci/run installs Debian's nginx-light)")
def test_rolling_restart_behind_nginx_loses_no_request(model_dir, tmp_path):
    flags = ("--max-num-batched-tokens", "256", "--speculative", "none", "--log-format", "json",
             "--log-level", "info", "--api-key", KEY)
    a, b = ServerProcess(model_dir, *flags), ServerProcess(model_dir, *flags)
    lb = None
    try:
        lb = Nginx(tmp_path / "nginx", [f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"])
        prompts = builtin_prompts("code", 16)
        cfg = LoadConfig(lb.url, a.name, prompts, max_tokens=MAX_TOKENS, api_key=KEY)
        exited: dict[str, float] = {}

        def stop_a():
            # mid-run by progress, not by the clock: after a quarter of the requests went through nginx
            wait_for(lambda: len(lb.access_log()) >= USERS * PER_USER // 4, 300)
            # ... at a moment the replica has a stream in flight (the tiny model answers in tens of ms, so on a
            # busy machine an arbitrary instant can find it idle, and then nothing would be drained)
            deadline = time.perf_counter() + 60
            while a.metric("dspark_num_requests_running") < 1 and time.perf_counter() < deadline:
                pass  # no sleep: a stream lasts tens of ms
            exited["sigterm"] = time.perf_counter()
            a.proc.send_signal(signal.SIGTERM)
            exited["code"] = a.proc.wait(60)
            exited["at"] = time.perf_counter()

        async def load():
            stopper = threading.Thread(target=stop_a)
            stopper.start()
            try:
                return await closed_loop(cfg, users=USERS, requests_per_user=PER_USER)
            finally:
                stopper.join()

        results, wall = asyncio.run(load())

        bad = [(r.status, r.error, r.tokens) for r in results if not (r.ok and r.tokens == MAX_TOKENS)]
        assert not bad, f"{len(bad)} of {len(results)} requests failed through the balancer: {bad[:5]}"
        assert all(r.finish_reason == "length" for r in results)
        assert exited.get("code") == 0, f"drained replica exit code {exited.get('code')}"

        # The drained replica's log: requests still running at SIGTERM finished there, each complete at the client.
        log_a = json_log(a)
        drain_at = next(i for i, x in enumerate(log_a) if x["msg"] == "SIGTERM: draining")
        after = [x for x in log_a[drain_at:] if x["logger"] == "dspark.access" and x["path"] == "/v1/completions"]
        finished_in_drain = {x["request_id"] for x in after if x["status"] == 200}
        assert finished_in_drain, "no stream was in flight on the replica when it got SIGTERM: nothing was drained"
        by_id = {r.request_id: r for r in results}
        assert finished_in_drain <= set(by_id), "a stream drained on the replica did not reach the client"
        assert all(by_id[i].tokens == MAX_TOKENS for i in finished_in_drain)

        # The survivor carried the requests sent after the replica was gone.
        t0 = min(r.start for r in results)
        ids_b = {x["request_id"] for x in json_log(b) if x["logger"] == "dspark.access" and x["status"] == 200}
        later = [r for r in results if r.start > exited["at"]]
        assert later, f"the run ({wall:.1f} s from {t0:.1f}) ended before the replica exited; make it longer"
        assert all(r.request_id in ids_b for r in later)

        # 503s the draining replica sent were retried by nginx, never shown to a client.
        refused = [x for x in after if x["status"] == 503]
        retried = [ln for ln in lb.access_log() if "upstream_status=503, 200" in ln]
        assert len(retried) >= len(refused)

        print(f"\n{len(results)} requests in {wall:.1f} s through nginx; SIGTERM at "
              f"{exited['sigterm'] - t0:.1f} s; {len(finished_in_drain)} streams drained on the replica; it exited 0 "
              f"after {exited['at'] - exited['sigterm']:.1f} s; {len(refused)} requests it refused with 503, "
              f"{len(retried)} retried by nginx; {len(later)} served by the survivor after")

        # Logs: JSON, with request ids; neither prompt text nor the API key at INFO.
        text = "\n".join(json.dumps(x) for x in log_a + json_log(b))
        assert KEY not in text
        assert not any(p["prompt"].strip() in text for p in prompts)
        assert any(x["msg"] == "request finished" and x["request_id"].startswith("cmpl-") for x in log_a)
    finally:
        if lb:
            lb.stop()
        for s in (a, b):
            if s.proc.poll() is None:
                s.stop()
