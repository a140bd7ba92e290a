"""The HTTP load generator and the sweep, end to end on small settings (figures come from the real sweep)."""

import asyncio
import json

import dspark.loadtest.sweep as sweep_mod
from dspark.loadtest.loadgen import (
    LoadConfig,
    Result,
    all_users_rate,
    builtin_prompts,
    closed_loop,
    open_loop,
    paired_speedup,
    percentiles,
    summarize,
)
from dspark.loadtest.sweep import adaptive_vs_fixed, goodput, markdown, render, sweep


def test_closed_and_open_loop_against_the_server(server):
    prompts = builtin_prompts("mixed", 6)
    assert {("prompt" in p) for p in prompts} == {True, False}  # completions and chat both exercised
    cfg = LoadConfig(server.url, server.name, prompts, max_tokens=12, slo_tokens_per_s=1.0)
    results, wall = asyncio.run(closed_loop(cfg, users=3, requests_per_user=2))
    s = summarize(results, wall)
    assert s["requests"] == s["ok"] == 6 and not s["errors"]
    assert all(r.tokens == 12 and r.ttft > 0 and r.latency >= r.ttft for r in results)
    assert [r.prompt for r in results] == [0, 1, 2, 3, 4, 5]  # user u's i-th request: prompt u * 2 + i
    assert s["total_tokens_per_s"] > 0 and s["per_user_tokens_per_s"]["p50"] > 0
    assert s["slo_attainment"] == 1.0 and s["goodput_rps"] > 0
    results, wall = asyncio.run(open_loop(LoadConfig(server.url, "no-such-model", prompts, 4), rate=50,
                                          num_requests=3))
    s = summarize(results, wall)
    assert s["ok"] == 0 and s["errors"] == {"http 404": 3}  # errors are counted by class, not raised


def test_all_users_rate_stops_when_the_first_user_is_done():
    """User 0: one request, 8 tokens in 4 chunks at 0.5..2 s. User 1: two requests of 2 tokens (one chunk each),
    ending at 1 and 4 s. Until 2 s (user 0 done): user 0's 8 tokens and user 1's first request's 2."""
    u0 = Result(ok=True, start=100.0, ttft=0.5, gaps=[0.5, 0.5, 0.5], latency=2.0, tokens=8, chunks=4)
    u1a = Result(ok=True, start=100.0, ttft=1.0, latency=1.0, tokens=2, chunks=1)
    u1b = Result(ok=True, start=101.0, ttft=3.0, latency=3.0, tokens=2, chunks=1)
    failed = Result(ok=False, start=100.0)
    assert all_users_rate([u0, failed, u1a, u1b], users=2) == (10.0, 2.0)


def test_percentiles():
    assert percentiles(list(range(1, 101))) == {"p50": 51, "p90": 91, "p99": 100}
    assert percentiles([]) == {"p50": 0.0, "p90": 0.0, "p99": 0.0}


def test_paired_speedup_is_taken_prompt_by_prompt():
    """Three prompts, two repeats each: the speed-up is each prompt's median over the baseline's on the same prompt
    (2x, 0.9x, 3x: median 2x), where the ratio of the two p50s (over a mix whose middle is another prompt) reads 1.8x.
    Requests without a prompt index, or whose prompt the baseline lacks, are left out."""
    base = [(0, 10.0), (0, 10.0), (1, 40.0), (1, 40.0), (2, 20.0), (2, 20.0)]
    spec = [(0, 19.0), (0, 21.0), (1, 36.0), (1, 36.0), (2, 60.0), (2, 60.0), (3, 99.0), (-1, 99.0)]
    vs = paired_speedup(spec, base)
    assert vs == {"median": 2.0, "min": 0.9, "p10": 0.9, "p90": 3.0, "max": 3.0, "prompts": 3}
    p50 = lambda xs: percentiles([x for _, x in xs])["p50"]  # noqa: E731
    assert p50(spec[:6]) / p50(base) == 1.8
    assert paired_speedup(spec, []) is None


def test_sweep_writes_json_chart_and_table(tmp_path, monkeypatch):
    md = tmp_path / "bench.md"
    md.write_text("# Benchmarks\n")
    order, measure = [], sweep_mod.measure
    servers = {}

    def spy(server, prompts, users, *args):
        servers.setdefault(server.url, len(servers))
        order.append((users, servers[server.url]))
        return measure(server, prompts, users, *args)

    monkeypatch.setattr(sweep_mod, "measure", spy)
    data = sweep(["none", "dspark adaptive"], [1, 2], "code", max_tokens=8, requests_total=2,
                 out_dir=str(tmp_path), name="sweep-test", write_md=str(md), repeats=2)
    assert set(data["modes"]) == {"none", "dspark adaptive"}
    # both servers up at once (a warm-up each), then taking turns at each concurrency in rotating order
    assert order == [(1, 0), (1, 1), (1, 0), (1, 1), (1, 1), (1, 0), (2, 0), (2, 1), (2, 1), (2, 0)]
    for points in data["modes"].values():
        assert [p["concurrency"] for p in points] == [1, 2] and all(p["ok"] == p["requests"] for p in points)
        assert [p["requests"] for p in points] == [4, 8]  # 2 runs (of 2 requests per user) per point, together
        assert all(len(p["runs_total_tokens_per_s"]) == 2 for p in points)
        assert all(0 < p["all_users_tokens_per_s"] for p in points)
    assert json.loads((tmp_path / "sweep-test.json").read_text())["config"]["max_tokens"] == 8
    assert (tmp_path / "sweep-test.png").read_bytes()[:4] == b"\x89PNG"
    text = md.read_text()
    assert "<!-- bench:sweep-test -->" in text and "| dspark adaptive | 2 |" in text
    assert "--repeats 2" in text and "2 runs per point" in text and "| all users active tok/s |" in text
    rows = adaptive_vs_fixed(data)
    assert len(rows) == 2 and "none" in rows[0] and "fixed" not in rows[0]  # no fixed-k mode in this sweep
    a, n = data["modes"]["dspark adaptive"][0], data["modes"]["none"][0]
    assert rows[0]["none"]["runs_ratio"] == [x / y for x, y in zip(a["runs_total_tokens_per_s"],
                                                                     n["runs_total_tokens_per_s"])]
    assert markdown(data, "x", "x.png").count("| none |") == 2
    for points in data["modes"].values():  # per-request figures are kept, so goodput can be read afterwards
        assert all(len(p["requests_tps"]) == p["ok"] == len(p["requests_tokens"]) for p in points)
        assert all(len(p["requests_prompt"]) == p["ok"] for p in points)
    # against none prompt by prompt, and the drafted rounds by proposer (this sweep's drafter only)
    vs = sweep_mod.per_prompt_speedup(a, n)
    assert vs is not None and vs["prompts"] == 2 and vs["min"] <= vs["median"] <= vs["max"]
    assert set(a["proposers"]) == {"dspark"} and a["proposers"]["dspark"]["rounds_share"] == 1.0
    assert a["proposers"]["dspark"]["tau"] >= 1.0 and n["proposers"] == {}
    assert "| dspark adaptive | 1 | " in text.split("per-user vs none, per prompt")[1]
    render(str(tmp_path / "sweep-test.json"), str(md), goodput_slo=1e-3)
    assert "Goodput at a per-user SLO of 0.001 tok/s" in md.read_text()


def test_goodput_counts_only_requests_meeting_the_slo():
    point = {"requests_tps": [10.0, 30.0, 50.0], "requests_tokens": [64, 32, 16], "wall_s": 4.0}
    assert goodput(point, 30.0) == (32 + 16) / 4.0
    assert goodput(point, 60.0) == 0.0
    assert goodput({"wall_s": 1.0}, 1.0) is None  # a sweep saved before per-request figures


def test_speculative_bench_interleaves_methods_and_writes_its_table(tmp_path):
    """`dspark bench --speculative-methods`: every method on every prompt, tau only where drafting ran, speed-up
    against none, one table row per method and temperature."""
    from dspark.engine.settings import Settings
    from dspark.loadtest.bench import bench_speculative

    out = tmp_path / "b.md"
    rows = bench_speculative(Settings(), ["none", "dspark:fixed", "ngram"], tokens=8, write=str(out), per_group=2)
    assert len(rows) == 3 * 2 * 4  # methods x temperatures x groups (code, chat, math, edit)
    assert {r["group"] for r in rows} == {"code", "chat", "math", "edit"}
    for r in rows:
        assert 0 < r["tokens"] <= 2 * 8
        if r["method"] == "dspark:fixed":
            assert r["tau"] >= 1.0
        elif r["method"] == "none":
            assert r["tau"] != r["tau"]  # no drafting: nan
        if r["method"] == "none":
            assert r["speedup"] == 1.0
    text = out.read_text()
    assert text.count("| dspark:fixed |") == 2 and "take turns" in text
