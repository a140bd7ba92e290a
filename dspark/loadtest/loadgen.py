"""HTTP load generator: drives a running server over SSE, like real users do.

Closed loop: N users, each sending its next request as soon as the previous one finishes.
Open loop: requests arrive as a Poisson process at a given rate, whatever the server's state.
Per request it records TTFT (first content chunk), TPOT ((end - first token) / (tokens - 1)), the gaps between
chunks (ITL; with speculation one chunk can carry several tokens), and per-user tokens/s = 1 / TPOT, the speed
a reader of the stream sees. Goodput counts the requests per second whose tokens/s met their SLO.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

CODE = ["def parse_args(argv):\n", "import os\nimport sys\n\n\ndef main():\n", "class LRUCache:\n    def __init__(self",
        "def read_file(path):\n    \"\"\"Return the contents of a file.\"\"\"\n", "for key, value in items:\n",
        "def merge(a, b):\n", "import json\n\n\ndef load(path):\n", "try:\n    import ssl\nexcept ImportError:\n"]
CHAT = ["Explain lists in Python.", "How do I read a file line by line?", "What does the with statement do?",
        "Write a function that reverses a string.", "Explain exceptions in Python.", "What is a decorator?"]


def builtin_prompts(kind: str, n: int = 24, seed: int = 0) -> list[dict]:
    """Request bodies (without model/sampling fields) for 'code', 'math', 'chat' or 'mixed' (the tiny test model's
    kind of text), or 'heldout': the drafters' held-out real prompts (HumanEval, held-out ShareGPT, generated
    math; dspark/engine/training/prompts.py), interleaved, counted with the default model's tokenizer; or 'groups':
    `peers --by-group`'s five groups (group_prompts), interleaved: n = 5 * k gives its k prompts per group."""
    from dspark.engine.training.corpus import math_problem

    rng = random.Random(seed)
    if kind in ("heldout", "groups"):
        from dspark.engine.settings import DEFAULT_MODEL, resolve_model
        from dspark.engine.tokenizer import Tokenizer
        from dspark.engine.training.prompts import prompt_set

        tok = Tokenizer(resolve_model(DEFAULT_MODEL))
        count = lambda t: len(tok.encode(t))  # noqa: E731
        if kind == "groups":  # `peers --by-group`'s prompts, a request from each group in turn
            sets = list(group_prompts(count, -(-n // 5), seed=seed).values())
            return [sets[i % 5][i // 5] for i in range(n)]
        sets = list(prompt_set("heldout", -(-n // 3), count, seed=seed).values())
        return [{"messages": sets[i % 3][i // 3]} for i in range(n)]
    if kind == "mixed":
        sets = [builtin_prompts(k, n, seed) for k in ("code", "math", "chat")]
        return [sets[i % 3][i // 3] for i in range(n)]
    if kind == "code":
        return [{"prompt": CODE[i % len(CODE)]} for i in range(n)]
    if kind == "math":
        return [{"messages": [{"role": "user", "content": math_problem(rng)[0]}]} for _ in range(n)]
    if kind == "chat":
        return [{"messages": [{"role": "user", "content": CHAT[i % len(CHAT)]}]} for i in range(n)]
    raise ValueError(f"unknown prompt set {kind!r} (code, math, chat, mixed, heldout, groups)")


def group_prompts(count_tokens: Callable[[str], int], per_group: int, max_prompt_tokens: int = 512,
                  seed: int = 0, dialogues: list[list[dict]] | None = None) -> dict[str, list[dict]]:
    """Held-out chat bodies per group: HumanEval code, held-out ShareGPT chat, generated math (the drafters'
    evaluation prompts, dspark/engine/training/prompts.py, so no system saw them in training); edit (rewrite a given
    HumanEval solution: answers that copy their prompt); multiturn (held-out ShareGPT conversations up to a later
    user turn, the recorded answers in the history, so the answer can quote them)."""
    from dspark.engine.training.prompts import GROUPS, edit_prompts, prompt_set, sharegpt_heldout_dialogues

    sets = prompt_set("heldout", per_group, count_tokens, max_prompt_tokens, seed)
    out = {g: [{"messages": m} for m in sets[g]] for g in GROUPS}
    out["edit"] = [{"messages": m} for m in edit_prompts(per_group)]
    out["multiturn"] = [{"messages": m} for m in later_turns(
        sharegpt_heldout_dialogues(50 * per_group) if dialogues is None else dialogues, per_group, count_tokens,
        max_prompt_tokens)]
    return out


def later_turns(dialogues: list[list[dict]], n: int, count_tokens: Callable[[str], int],
                max_tokens: int) -> list[list[dict]]:
    """Up to n conversations cut after their last user turn (the second or later) whose history fits max_tokens
    (the messages' text, without the chat template)."""
    out = []
    for d in dialogues:
        best, total = None, 0
        for i, m in enumerate(d):
            total += count_tokens(m["content"])
            if total > max_tokens:
                break
            if m["role"] == "user" and i >= 2:
                best = d[: i + 1]
        if best is not None:
            out.append(best)
        if len(out) >= n:
            break
    return out


def file_prompts(path: str) -> list[dict]:
    """JSON lines, each {"prompt": str} or {"messages": [...]}."""
    out = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not out or not all(("prompt" in x) != ("messages" in x) for x in out):
        raise ValueError(f"{path}: every line needs exactly one of 'prompt' or 'messages'")
    return out


@dataclass
class Result:
    ok: bool
    status: int = 0
    error: str = ""
    start: float = 0.0
    ttft: float = 0.0
    last: float = 0.0  # time of the last content chunk, from the start
    latency: float = 0.0
    tokens: int = 0
    gaps: list[float] = field(default_factory=list)
    slo: float = 0.0
    request_id: str = ""  # the server's X-Request-Id (through a balancer: the replica that answered)
    finish_reason: str | None = None
    chunks: int = 0  # content chunks received
    usage: bool = False  # tokens come from the server's usage; False: the server sent none, tokens = chunks
    text: str = ""  # the generated text, kept only with LoadConfig.keep_text
    prompt: int = -1  # the index of its body in LoadConfig.prompts (closed_loop): pairs runs prompt by prompt

    @property
    def tpot(self) -> float:
        """Seconds per output token after the first, first to last content chunk."""
        return (self.last - self.ttft) / (self.tokens - 1) if self.tokens > 1 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.tpot if self.tpot > 0 else 0.0


@dataclass
class LoadConfig:
    url: str
    model: str
    prompts: list[dict]
    max_tokens: int = 64
    temperature: float = 0.0
    slo_tokens_per_s: float = 0.0  # sent per request; 0 = none
    timeout: float = 300.0
    api_key: str | None = None  # sent as Authorization: Bearer <key>
    ignore_eos: bool = True  # send ignore_eos (a vLLM-style extra; some servers reject unknown fields)
    keep_text: bool = False  # keep each request's generated text in its Result

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


async def one_request(client: httpx.AsyncClient, cfg: LoadConfig, body: dict,
                      headers: dict[str, str] | None = None) -> Result:
    chat = "messages" in body
    payload = {**body, "model": cfg.model, "max_tokens": cfg.max_tokens, "temperature": cfg.temperature,
               "stream": True, "stream_options": {"include_usage": True}}
    if cfg.ignore_eos:
        payload["ignore_eos"] = True
    if cfg.slo_tokens_per_s:
        payload["slo_tokens_per_s"] = cfg.slo_tokens_per_s
    r = Result(ok=False, start=time.perf_counter(), slo=cfg.slo_tokens_per_s)
    last = None
    try:
        path = "/v1/chat/completions" if chat else "/v1/completions"
        async with client.stream("POST", path, json=payload, timeout=cfg.timeout, headers=headers) as resp:
            r.status = resp.status_code
            r.request_id = resp.headers.get("x-request-id", "")
            if resp.status_code != 200:
                r.error = f"http {resp.status_code}"
                await resp.aread()
                return r
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    r.error = "in-stream error"
                    return r
                if chunk.get("usage"):
                    r.tokens, r.usage = chunk["usage"]["completion_tokens"], True
                choices = chunk.get("choices") or []
                r.finish_reason = next((c["finish_reason"] for c in choices if c.get("finish_reason")), r.finish_reason)
                text = "".join((c.get("delta") or {}).get("content") or c.get("text") or "" for c in choices)
                if text:
                    r.chunks += 1
                    if cfg.keep_text:
                        r.text += text
                    now = time.perf_counter()
                    if last is None:
                        r.ttft = now - r.start
                    else:
                        r.gaps.append(now - last)
                    last = now
        r.latency = time.perf_counter() - r.start
        r.last = (last - r.start) if last is not None else 0.0
        if not r.usage:  # no usage in the stream (e.g. llama-cpp-python): one token per content chunk
            r.tokens = r.chunks
        r.ok = r.tokens > 0
        if not r.ok:
            r.error = "no tokens"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        r.error = type(e).__name__
    return r


async def closed_loop(cfg: LoadConfig, users: int, requests_per_user: int) -> tuple[list[Result], float]:
    async with httpx.AsyncClient(base_url=cfg.url, limits=httpx.Limits(max_connections=users + 4),
                                 headers=cfg.headers()) as client:
        async def ask(i: int) -> Result:
            r = await one_request(client, cfg, cfg.prompts[i])
            r.prompt = i
            return r

        async def user(u: int) -> list[Result]:
            return [await ask((u * requests_per_user + i) % len(cfg.prompts)) for i in range(requests_per_user)]

        t0 = time.perf_counter()
        per_user = await asyncio.gather(*(user(u) for u in range(users)))
        return [r for rs in per_user for r in rs], time.perf_counter() - t0


def all_users_rate(results: list[Result], users: int) -> tuple[float, float]:
    """Tokens and seconds of a closed-loop run while every user was still active: from the first request's
    start until the first user received its last token (results in user order, as closed_loop returns them).

    A closed loop ends with a drain: the users that finished early leave, and the last ones run at a lower
    concurrency than the point claims. How long the drain lasts depends on how evenly the users progressed
    (with speculation, a user whose prompts draft well finishes first), not on the server's rate under load.
    Tokens are credited at their chunk's arrival (a chunk's share of the request's tokens)."""
    per = len(results) // users
    lanes = [results[u * per : (u + 1) * per] for u in range(users)]
    t0 = min(r.start for r in results)
    end = min(max(r.start + r.latency for r in lane) for lane in lanes)
    tokens = 0.0
    for r in results:
        if not r.ok or not r.chunks:
            continue
        t, n = r.start + r.ttft, 0
        for gap in [0.0, *r.gaps]:
            t += gap
            n += t <= end
        tokens += n * r.tokens / r.chunks
    return tokens, end - t0


async def open_loop(cfg: LoadConfig, rate: float, num_requests: int, seed: int = 0) -> tuple[list[Result], float]:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=cfg.url, limits=httpx.Limits(max_connections=1000),
                                 headers=cfg.headers()) as client:
        t0 = time.perf_counter()
        tasks = []
        for i in range(num_requests):
            tasks.append(asyncio.create_task(one_request(client, cfg, cfg.prompts[i % len(cfg.prompts)])))
            if i + 1 < num_requests:
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - t0


def percentiles(xs: list[float]) -> dict:
    if not xs:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0}
    xs = sorted(xs)
    pick = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}


def summarize(results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    with_slo = [r for r in ok if r.slo]
    met = [r for r in with_slo if r.tokens_per_s >= r.slo]
    return {
        "requests": len(results), "ok": len(ok), "errors": errors, "wall_s": wall,
        "total_tokens_per_s": sum(r.tokens for r in ok) / wall if wall > 0 else 0.0,
        "per_user_tokens_per_s": percentiles([r.tokens_per_s for r in ok]),
        "mean_per_user_tokens_per_s": statistics.fmean(r.tokens_per_s for r in ok) if ok else 0.0,
        "ttft_s": percentiles([r.ttft for r in ok]),
        "tpot_s": percentiles([r.tpot for r in ok]),
        "itl_s": percentiles([g for r in ok for g in r.gaps]),
        "goodput_rps": (len(met) / wall if wall > 0 else 0.0) if with_slo else None,
        "slo_attainment": len(met) / len(with_slo) if with_slo else None,
    }


def paired_speedup(rates: Iterable[tuple[int, float]], base: Iterable[tuple[int, float]]) -> dict | None:
    """Speed-up over a baseline prompt by prompt, from (prompt index, tokens/s) per request (Result.prompt and
    Result.tokens_per_s): per prompt, the median rate of its requests over the baseline's median on the same prompt;
    then the median of those ratios and their spread (min, p10, p90, max).

    Why not the ratio of two p50s: at batch 1 speculation's gain is a property of the text (1.0x on one prompt,
    2.5x on the next), so the p50 over a mix of prompts sits on whichever prompt lands in the middle: the sweep's
    held-out prompts read 1.22x that way in one run and 1.43x in the next (docs/benchmarks.md, sweep-agreement)."""
    def by_prompt(pairs: Iterable[tuple[int, float]]) -> dict[int, float]:
        out: dict[int, list[float]] = {}
        for i, rate in pairs:
            if i >= 0:
                out.setdefault(i, []).append(rate)
        return {i: statistics.median(v) for i, v in out.items()}

    a, b = by_prompt(rates), by_prompt(base)
    ratios = sorted(a[i] / b[i] for i in a.keys() & b.keys() if b[i] > 0)
    if not ratios:
        return None
    pick = lambda q: ratios[round(q * (len(ratios) - 1))]  # noqa: E731
    return {"median": statistics.median(ratios), "min": ratios[0], "p10": pick(0.1), "p90": pick(0.9),
            "max": ratios[-1], "prompts": len(ratios)}


def save_results(path: Path, summary: dict, results: list[Result]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"summary": summary, "requests": [asdict(r) for r in results]}, indent=1))
