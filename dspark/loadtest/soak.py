"""`dspark loadtest soak`: a time-bounded mix of good, bad, vanishing and cancelled requests against a server.

Each user loops over random actions: a greedy stream read to the end (its text must equal the solo answer taken
before the soak), a stream dropped after a few chunks, a request abandoned before its first token, a malformed
or invalid request (must get an OpenAI-shaped 4xx), and a sampled non-streaming request. Afterwards the server must
drain to no running or waiting request with every KV block free, and its RSS must not have grown beyond a bound.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path

import httpx

from dspark.loadtest.loadgen import CODE
from dspark.loadtest.sweep import parse_metrics

BAD_BODIES = [
    b"{not json",
    json.dumps({"prompt": "x", "max_tokens": 4}).encode(),  # no model
    json.dumps({"model": "{model}", "prompt": "x", "max_tokens": -3}).encode(),
    json.dumps({"model": "{model}", "prompt": "x", "temperature": 9}).encode(),
    json.dumps({"model": "{model}", "prompt": [], "max_tokens": 4}).encode(),
    json.dumps({"model": "{model}", "prompt": "x", "stop": [""] * 3}).encode(),
    "\udcff".encode("utf-8", "surrogateescape"),  # not UTF-8
]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _stream(client: httpx.AsyncClient, body: dict, max_chunks: int | None = None) -> tuple[int, str]:
    text = ""
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, ""
        n = 0
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return 500, ""
                text += "".join(c.get("text") or "" for c in chunk.get("choices") or [])
                n += 1
                if max_chunks is not None and n >= max_chunks:
                    return 499, text  # we hang up
    return 200, text


async def soak(url: str, model: str, seconds: float, users: int = 8, max_tokens: int = 32, seed: int = 0,
               pid: int | None = None) -> dict:
    rng = random.Random(seed)
    counts: dict[str, int] = {}
    problems: list[str] = []
    timeout = httpx.Timeout(120, connect=10)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=httpx.Limits(max_connections=users + 8)) as c:
        base = {"model": model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        solo = {}
        for p in CODE:  # reference answers, one at a time
            r = await c.post("/v1/completions", json={**base, "prompt": p})
            solo[p] = r.json()["choices"][0]["text"]
        rss0 = rss_kib(pid) if pid else 0
        end = time.monotonic() + seconds

        def count(kind: str) -> None:
            counts[kind] = counts.get(kind, 0) + 1

        async def user(u: int) -> None:
            urng = random.Random(rng.random())
            while time.monotonic() < end:
                action = urng.choices(["greedy", "drop", "abandon", "bad", "sampled"], [50, 15, 10, 15, 10])[0]
                p = urng.choice(CODE)
                try:
                    if action == "greedy":
                        status, text = await _stream(c, {**base, "prompt": p})
                        if status != 200 or text != solo[p]:
                            problems.append(f"greedy {p!r}: status {status}, equal {text == solo[p]}")
                    elif action == "drop":
                        await _stream(c, {**base, "prompt": p}, max_chunks=urng.randint(1, 4))
                    elif action == "abandon":
                        task = asyncio.create_task(c.post("/v1/completions", json={**base, "prompt": p}))
                        await asyncio.sleep(urng.random() * 0.02)
                        task.cancel()
                        await asyncio.gather(task, return_exceptions=True)
                    elif action == "bad":
                        raw = urng.choice(BAD_BODIES).replace(b"{model}", model.encode())
                        r = await c.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
                        err = r.json().get("error", {}) if r.headers.get("content-type", "").startswith(
                            "application/json") else {}
                        if not (400 <= r.status_code < 500 and err.get("message") and err.get("type")):
                            problems.append(f"bad request {raw[:40]!r}: {r.status_code} {r.text[:80]}")
                    else:
                        r = await c.post("/v1/completions", json={**base, "prompt": p, "temperature": 1.0,
                                                                  "seed": urng.randint(0, 99)})
                        if r.status_code != 200:
                            problems.append(f"sampled: {r.status_code}")
                    count(action)
                except httpx.HTTPError as e:
                    problems.append(f"{action}: {type(e).__name__}")

        await asyncio.gather(*(user(u) for u in range(users)))
        drained = await _drained(c)
        rss1 = rss_kib(pid) if pid else 0
    return {"seconds": seconds, "users": users, "requests": counts, "total": sum(counts.values()),
            "problems": problems, "drained": drained, "rss_kib_before": rss0, "rss_kib_after": rss1}


async def _drained(c: httpx.AsyncClient, wait: float = 30.0) -> dict:
    """Wait for no running or waiting request; then report the KV pool."""
    deadline = time.monotonic() + wait
    while True:
        m = parse_metrics((await c.get("/metrics")).text)
        idle = m.get("dspark_num_requests_running") == 0 and m.get("dspark_num_requests_waiting") == 0
        if (idle and m.get("dspark_kv_free_blocks") == m.get("dspark_kv_total_blocks")) or time.monotonic() > deadline:
            return {"running": m.get("dspark_num_requests_running"), "waiting": m.get("dspark_num_requests_waiting"),
                    "kv_free": m.get("dspark_kv_free_blocks"), "kv_total": m.get("dspark_kv_total_blocks")}
        await asyncio.sleep(0.2)


def run_soak(url: str, seconds: float, users: int = 8, pid: int | None = None, seed: int = 0) -> dict:
    model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
    return asyncio.run(soak(url, model, seconds, users, seed=seed, pid=pid))
