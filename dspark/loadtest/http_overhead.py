"""What HTTP costs: the server's streamed decode speed against the same engine's in-process decode speed.

    python -m dspark.loadtest.http_overhead --model models/tiny-qwen3-5m --users 1 32 --tokens 256 --prompt-len 60
        [--dtype bfloat16] [--engine-core thread process] [--repeats 1]

In-process: decode_profile's figure (the engine stepped directly; decode only, after every request's first
token). Over HTTP: `dspark serve` per engine-core mode, a plain httpx client streaming N completions at once
(token-id prompts of the same shapes, greedy, `ignore_eos`, no speculation); each SSE chunk's tokens are counted
from the running usage it carries (vLLM's `continuous_usage_stats`: a front end behind the core merges several
steps' tokens into one chunk). At 1 user the figure is that user's decode tokens/s (first to last token); at N users
the total tokens/s while all N decode (the tokens that arrive between the last first token and the last token, over
that window). The ratio is HTTP
over in-process. TTFT is the client's, from sending to the first chunk. Where the CPU goes over each N-user run
(from /proc): the API process, its engine core process (0 with the core on a thread: it counts in the API's), this
client, and the core's own time inside steps (its `dspark_step_seconds`). Each figure is the median of `--repeats`
runs (in-process and over HTTP alike).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

import httpx

from dspark.engine.report import replace_section
from dspark.loadtest.sweep import REPO, Server, scrape


def in_process(model: str | None, dtype: str, users: list[int], tokens: int, prompt_len: int, repeats: int,
               threads: int) -> tuple[dict[int, float], list[list[int]]]:
    import torch

    from dspark.engine.llm_engine import LLMEngine
    from dspark.engine.settings import Settings
    from dspark.loadtest.decode_profile import bench, make_prompts

    torch.set_num_threads(threads)
    kw = {"model": model} if model else {}
    eng = LLMEngine(Settings(**kw, dtype=dtype, speculative="none", threads=threads,
                             max_num_seqs=max(64, max(users))))
    out = {n: bench(eng, n, tokens, prompt_len, repeats)["decode_tps"] for n in users}
    return out, make_prompts(eng, max(users), prompt_len)


async def stream_one(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "ignore_eos": True, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    t0, times, seen = time.perf_counter(), [], 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if not chunk["choices"]:
                    continue
                # a chunk can carry several tokens (a front end behind the core merges deltas): the running usage
                # says how many; without it (a server that sends none) one token per chunk with text
                if (u := chunk.get("usage")) is not None:
                    n, seen = u["completion_tokens"] - seen, u["completion_tokens"]
                else:
                    n = 1 if chunk["choices"][0]["text"] else 0
                times += [time.perf_counter()] * n
    return {"start": t0, "times": times}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) and, recursively, of its live children."""
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    kids = [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]
    return own + sum(cpu_seconds(c) for c in kids)


def cpu_split(pid: int, url: str) -> tuple:
    """What each side has used so far: the API process, its engine core process(es), this client; the core's time
    inside steps (its dspark_step_seconds) and step count."""
    api = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    api_s = (int(api[11]) + int(api[12])) / os.sysconf("SC_CLK_TCK")
    m = scrape(url)
    return (api_s, cpu_seconds(pid) - api_s, time.process_time(), m.get("dspark_step_seconds_sum", 0.0),
            m.get("dspark_step_seconds_count", 0.0), time.perf_counter())


async def over_http(url: str, model: str, prompts: list[list[int]], tokens: int, pid: int) -> dict:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=len(prompts) + 4)) as client:
        await stream_one(client, url, model, prompts[0], 8)  # warm-up
        before = cpu_split(pid, url)
        runs = await asyncio.gather(*(stream_one(client, url, model, p, tokens) for p in prompts))
        split = [b - a for a, b in zip(before, cpu_split(pid, url))]
    firsts = [r["times"][0] for r in runs]
    lasts = [r["times"][-1] for r in runs]
    t0, t1 = max(firsts), max(lasts)
    window = sum(1 for r in runs for t in r["times"] if t0 < t <= t1)
    one = runs[0]["times"]
    return {"per_user": (len(one) - 1) / (one[-1] - one[0]), "total": window / (t1 - t0) if t1 > t0 else 0.0,
            "ttft_ms": statistics.median(1e3 * (r["times"][0] - r["start"]) for r in runs),
            "ttft_max_ms": max(1e3 * (r["times"][0] - r["start"]) for r in runs),
            "tokens": statistics.median(len(r["times"]) for r in runs),
            # CPU seconds over the run: API process, engine core, client; the core's seconds inside steps, steps, wall
            **dict(zip(("cpu_api", "cpu_core", "cpu_client", "step_s", "steps", "wall_s"), split))}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--users", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the in-process engine")
    ap.add_argument("--server-threads", type=int, nargs="+", default=[0],
                    help="the servers' --threads, one run each (0: the server's default)")
    ap.add_argument("--engine-core", nargs="+", default=["thread", "process"], choices=["thread", "process", "default"],
                    help="engine-core modes to serve with; `default` passes no flag (a checkout from before it)")
    ap.add_argument("--host-label", default="", help="names the machine in the report (e.g. its CPU and dtype)")
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    ap.add_argument("--section", default="http-overhead", help="the report section to write (one per setting)")
    args = ap.parse_args(argv)
    # the in-process engine at --threads, and at each server's own thread count (the like-for-like figure: what
    # HTTP costs the same engine, where the client and the front end share the machine's cores with it)
    bases = {}
    for t in sorted({args.threads, *(t for t in args.server_threads if t)}):
        bases[t], prompts = in_process(args.model, args.dtype, args.users, args.tokens, args.prompt_len,
                                       args.repeats, t)
        print(f"in-process decode tok/s, {t} threads: "
              + ", ".join(f"{n} requests {v:.0f}" for n, v in bases[t].items()))
    base = bases[args.threads]
    rows = []
    for mode, threads in [(m, n) for m in args.engine_core for n in args.server_threads]:
        flags = ([] if mode == "default" else ["--engine-core", mode]) + [
            "--dtype", args.dtype, "--speculative", "none", "--max-num-seqs", str(max(64, max(args.users)))]
        flags += ["--threads", str(threads)] if threads else []
        server = Server(flags + (["--model", args.model] if args.model else []))
        mode = f"{mode}, {threads or 'default'} threads"
        try:
            for n in args.users:
                runs = [asyncio.run(over_http(server.url, server.model, prompts[:n], args.tokens, server.proc.pid))
                        for _ in range(args.repeats)]
                r = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
                http = r["per_user"] if n == 1 else r["total"]
                same = bases[threads or args.threads][n]
                rows.append((mode, n, base[n], same, http, http / base[n], http / same, r["ttft_ms"],
                             r["ttft_max_ms"], r))
                print(f"{mode} {n:>3} users: in-process {base[n]:7.0f} tok/s ({same:.0f} at the server's threads), "
                      f"over HTTP {http:7.0f} tok/s ({'per user' if n == 1 else 'total'}), ratio {http / base[n]:.2f}x "
                      f"({http / same:.2f}x like for like), TTFT p50 {r['ttft_ms']:.0f} ms, max "
                      f"{r['ttft_max_ms']:.0f} ms")
                print(f"    CPU s over {r['wall_s']:.2f} s: API {r['cpu_api']:.2f}, core {r['cpu_core']:.2f}, client "
                      f"{r['cpu_client']:.2f}; the core inside steps {r['step_s']:.2f} s ({r['steps']:.0f} steps)")
        finally:
            server.stop()
    cmd = ("python -m dspark.loadtest.http_overhead " + (f"--model {args.model} " if args.model else "")
           + f"--users {' '.join(map(str, args.users))} --tokens {args.tokens} --prompt-len {args.prompt_len} "
           f"--dtype {args.dtype} --engine-core {' '.join(args.engine_core)} --repeats {args.repeats} --threads "
           f"{args.threads} --server-threads {' '.join(map(str, args.server_threads))}")
    import subprocess

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip() or "?"
    name = args.section
    lines = [f"<!-- bench:{name} -->", f"## What HTTP costs: streamed decode over the in-process engine ({name}, CPU)",
             "", f"Command: `{cmd}` at {commit}" + (f", on {args.host_label}" if args.host_label else "")
             + f". In-process: the engine stepped directly (decode only), at {args.threads} torch threads and at the "
             "server's own thread count (like for like). Over HTTP: a plain httpx client streaming from `dspark "
             "serve` on the same machine; 1 user: that user's decode tokens/s; N users: total tokens/s while all N "
             "decode. Medians of the repeats.", "",
             f"| server (engine core, torch threads) | users | in-process tok/s ({args.threads} threads / the "
             f"server's) | over HTTP tok/s | ratio ({args.threads} threads / like for like) | TTFT p50 / max (ms) | "
             "CPU s: API / core / client (wall s; core inside steps s) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {m} | {n} | {b:.0f} / {sb:.0f} | {h:.0f} ({'per user' if n == 1 else 'total'}) | {x:.2f}x / "
              f"{sx:.2f}x | {t:.0f} / {tm:.0f} | {r['cpu_api']:.2f} / {r['cpu_core']:.2f} / {r['cpu_client']:.2f} "
              f"({r['wall_s']:.2f}; {r['step_s']:.2f}) |" for m, n, b, sb, h, x, sx, t, tm, r in rows]
    lines.append(f"<!-- /bench:{name} -->")
    replace_section(Path(args.out), name, "\n".join(lines))


if __name__ == "__main__":
    main()
