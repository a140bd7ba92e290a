"""A real Prometheus (Debian's package) scrapes a running server while traffic flows; the dashboard's key
expressions, sent verbatim to Prometheus' HTTP API, must return data, and every other panel's must evaluate."""

import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import yaml
from conftest import REPO, ServerProcess, needs_tool, wait_for
from prometheus_client.parser import text_string_to_metric_families

from dspark.loadtest.loadgen import LoadConfig, builtin_prompts, closed_loop
from dspark.loadtest.sweep import answers_ok, free_port

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
KEY_PANELS = ("Tokens/s (total)", "Acceptance length per drafter", "SLO attainment", "TTFT p50 / p99")


def dashboard_exprs() -> dict[str, list[str]]:
    dash = json.loads((REPO / "configs/grafana/dspark.json").read_text())
    return {p["title"]: [t["expr"] for t in p.get("targets", []) if t.get("expr")] for p in dash["panels"]}


class Prometheus:
    def __init__(self, workdir: Path, target: str):
        self.url = f"http://127.0.0.1:{free_port()}"
        config = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
        config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = "1s"
        config["scrape_configs"][0]["static_configs"] = [{"targets": [target]}]
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address={self.url.removeprefix('http://')}"],
            stdout=subprocess.DEVNULL, stderr=open(workdir / "prometheus.log", "w"))
        if not wait_for(lambda: answers_ok(self.url + "/-/ready"), 30):
            self.stop()
            raise RuntimeError("prometheus did not start: " + (workdir / "prometheus.log").read_text()[-2000:])

    def query(self, expr: str) -> dict:
        r = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10).json()
        assert r["status"] == "success", f"{expr}: {r}"
        return r["data"]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(15)


def has_data(data: dict) -> bool:
    values = [v["value"][1] for v in data["result"]] if data["resultType"] == "vector" else []
    return any(v not in ("NaN", "+Inf", "-Inf") for v in values)


@needs_tool(PROMETHEUS, "prometheus is not installed (.ci/run installs Debian's prometheus package)")
def test_dashboard_key_expressions_return_data_from_a_real_prometheus(model_dir, tmp_path):
    exprs = dashboard_exprs()
    assert set(KEY_PANELS) <= set(exprs)
    server = ServerProcess(model_dir, "--max-num-batched-tokens", "256", "--speculative", "dspark",
                           "--draft-policy", "fixed")
    prom = None
    try:
        prom = Prometheus(tmp_path / "prometheus", f"127.0.0.1:{server.port}")
        assert wait_for(lambda: has_data(prom.query('up{job="dspark"}')), 20), "prometheus never scraped the server"
        cfg = LoadConfig(server.url, server.name, builtin_prompts("code", 8), max_tokens=32, slo_tokens_per_s=1.0)
        deadline = time.time() + 8  # several scrapes while tokens flow, so rate() has two points to work with
        while time.time() < deadline:
            results, _ = asyncio.run(closed_loop(cfg, users=2, requests_per_user=2))
            assert all(r.ok for r in results)
        time.sleep(2)  # one more scrape after the last request

        empty = []
        for title in KEY_PANELS:
            for expr in exprs[title]:
                if not wait_for(lambda e=expr: has_data(prom.query(e)), 10):
                    empty.append((title, expr))
        assert not empty, f"dashboard expressions with no data: {empty}"
        for panel_exprs in exprs.values():  # the rest must at least be valid PromQL for this server
            for expr in panel_exprs:
                prom.query(expr)
    finally:
        if prom:
            prom.stop()
        server.stop()


GIE_GAUGES = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
              "vllm:cache_config_info")


def gie_samples(url: str) -> dict[str, list]:
    """The GIE protocol's metrics as Prometheus' text parser reads them: name -> (type, samples)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return {f.name: (f.type, f.samples) for f in text_string_to_metric_families(text) if f.name in GIE_GAUGES}


@needs_tool(PROMETHEUS, "prometheus is not installed (.ci/run installs Debian's prometheus package)")
def test_gie_model_server_metrics_move_with_load_and_prometheus_scrapes_them(model_dir, tmp_path):
    """The Gateway API Inference Extension's model-server protocol: queue depth, running requests and KV usage
    (a 0-1 fraction) as gauges under vLLM's names, and the block size / block count labels; they rise under
    load and fall back after, and a real Prometheus has them."""
    server = ServerProcess(model_dir, "--max-num-seqs", "4", "--num-kv-blocks", "64", "--speculative", "none")
    prom = None
    try:
        idle = gie_samples(server.url)
        assert set(idle) == set(GIE_GAUGES) and all(t == "gauge" for t, _ in idle.values())
        info = idle["vllm:cache_config_info"][1][0]
        assert info.labels["block_size"] == "16" and info.labels["num_gpu_blocks"] == "64" and info.value == 1
        assert [s.value for s in idle["vllm:num_requests_running"][1]] == [0]
        assert idle["vllm:num_requests_running"][1][0].labels["model_name"] == server.name
        prom = Prometheus(tmp_path / "prometheus", f"127.0.0.1:{server.port}")
        # it scrapes once before the load starts, so a later scrape lands inside it (a fast host ran the load in ~1 s)
        assert wait_for(lambda: has_data(prom.query("vllm:num_requests_running")), 15), "no first scrape"

        # 12 users, 4 running at most: some wait; long answers keep them there for several scrapes
        cfg = LoadConfig(server.url, server.name, builtin_prompts("code", 12), max_tokens=400)
        peak = {name: 0.0 for name in GIE_GAUGES[:3]}

        async def load_and_watch():
            task = asyncio.create_task(closed_loop(cfg, users=12, requests_per_user=2))
            async with httpx.AsyncClient() as client:
                while not task.done():
                    text = (await client.get(server.url + "/metrics")).text
                    for f in text_string_to_metric_families(text):
                        if f.name in peak:
                            peak[f.name] = max(peak[f.name], *(s.value for s in f.samples))
                    await asyncio.sleep(0.05)
            return await task

        results, _ = asyncio.run(load_and_watch())
        assert all(r.ok for r in results)
        assert peak["vllm:num_requests_running"] == 4 and peak["vllm:num_requests_waiting"] >= 1, peak
        assert 0 < peak["vllm:kv_cache_usage_perc"] <= 1, peak
        after = gie_samples(server.url)
        assert after["vllm:num_requests_running"][1][0].value == 0
        assert after["vllm:num_requests_waiting"][1][0].value == 0

        time.sleep(2)  # a scrape after the load
        for name in GIE_GAUGES:
            assert wait_for(lambda n=name: has_data(prom.query(n)), 15), f"prometheus has no {name}"
        assert float(prom.query("max_over_time(vllm:num_requests_running[5m])")["result"][0]["value"][1]) >= 1
        assert float(prom.query("max_over_time(vllm:kv_cache_usage_perc[5m])")["result"][0]["value"][1]) > 0
    finally:
        if prom:
            prom.stop()
        server.stop()
