"""Cache-aware routing, measured: replicas behind a real nginx, multi-turn ShareGPT chats replayed through it, once
round-robin and once with consistent hashing on a session header (deploy/nginx/nginx-session-affinity.conf).

Each conversation is one user sending its turns in order, each turn the whole history so far plus the next recorded
user turn, all conversations at once. The history's assistant turns (--history):
- generated (the default, what a chat client does): the answer the replica actually streamed back. A prefix cache
  that keeps blocks of generated tokens (ours does, as vLLM: dspark/scheduler/block_manager.py) then holds the whole
  previous turn. The two runs send different texts in general (each resends its own replicas' answers; a greedy
  answer to the same history can differ between runs with batching's float noise, and the histories then diverge).
  The chat template re-renders the returned text, whose tokens can differ from the generated ids near the end
  (a token the detokenizer drops, such as an end-of-turn token generated under ignore_eos, or a different BPE
  split of the text): the blocks from there on miss.
- recorded: ShareGPT's own assistant turns, so both runs send exactly the same requests; the previous answer is
  never cached (nobody generated it), only the prompts before it.
Round-robin is the project's deploy/nginx/nginx.conf with its `least_conn` taken out (nginx's default:
round-robin); affinity is the session-affinity recipe as shipped, each conversation its own X-Session-Id. Fresh
replicas per run, so no run inherits the other's cache, each warmed up with two unrelated requests first. Per run:
the prefix cache's hit rate over all replicas (prompt tokens found cached / looked up, from each replica's
/metrics), TTFT p50 / p90 at the client, and generated tokens/s over the run; and per replica, the regime: its
KV cache's capacity in tokens (blocks x block size), the cached blocks it evicted for room and the requests it
preempted over the run. Cache-aware routing pays most under cache pressure: round-robin makes every replica hold
every conversation, which halves the cache each conversation effectively has with 2 replicas; with ample KV
memory round-robin still finds most of a history cached on the other replica (evictions 0 says so).

Prints one JSON line last: {"round_robin": {...}, "consistent_hash": {...}}.
Run: dspark loadtest routing [--conversations 16 --max-tokens 32 --history generated --server-flag=--model=...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import tempfile
import time
from pathlib import Path

import httpx

from dspark.loadtest.loadgen import percentiles
from dspark.loadtest.nginx import Nginx
from dspark.loadtest.prefix_bench import multi_turn, replay
from dspark.loadtest.sweep import Server, _delta, scrape

SESSION_HEADER = "X-Session-Id"
MODES = {  # JSON key -> (nginx config, how it is edited, session header sent)
    "round_robin": ("nginx.conf", lambda text: text.replace("        least_conn;\n", ""), None),
    "consistent_hash": ("nginx-session-affinity.conf", None, SESSION_HEADER),
}


def conversations(model: str | None, count: int, max_history_tokens: int) -> list[list[dict]]:
    """`count` ShareGPT conversations (held out from the drafters' training), cut to fit the history budget in the
    served model's tokens."""
    from dspark.engine.settings import DEFAULT_MODEL, resolve_model
    from dspark.engine.tokenizer import Tokenizer
    from dspark.engine.training.prompts import sharegpt_heldout_dialogues

    tok = Tokenizer(resolve_model(model or DEFAULT_MODEL))
    return multi_turn(tok, sharegpt_heldout_dialogues(400, min_user_turns=3), count, max_history_tokens)


def warm_up(url: str, model: str) -> None:
    text = "Warm-up: describe a lighthouse at night in a few sentences. " * 20
    for n in (len(text) // 4, len(text)):
        httpx.post(url + "/v1/chat/completions", timeout=300, json={
            "model": model, "max_tokens": 8, "messages": [{"role": "user", "content": text[:n]}]}).raise_for_status()


def run_mode(mode: str, convs: list[list[dict]], args, workdir: Path) -> dict:
    conf, edit, header = MODES[mode]
    replicas, lb = [], None
    try:
        for _ in range(args.replicas):
            replicas.append(Server(args.server_flag, log_dir=workdir, ready_timeout=600))
        prefix = workdir / f"nginx-{mode}"
        # max_conns (bounded load) only where the recipe sets it: the round-robin upstream has no bound
        flags = "max_fails=2 fail_timeout=10s" + (f" max_conns={args.max_conns}" if header else "")
        lb = Nginx(prefix, [f"127.0.0.1:{s.port}" for s in replicas], conf, flags, edit)
        model = replicas[0].model
        for s in replicas:  # first requests pay one-off costs (allocations, kernel selection): not in the run
            warm_up(s.url, model)
        before = [scrape(s.url) for s in replicas]
        results, wall = asyncio.run(replay(lb.url, model, convs, args.max_tokens, args.history == "generated",
                                           header))
        after = [scrape(s.url) for s in replicas]
    finally:
        if lb is not None:
            lb.stop()
        for s in replicas:
            s.stop()
    queries = sum(_delta(a, b, "dspark_prefix_cache_queries_total") for a, b in zip(after, before))
    hits = sum(_delta(a, b, "dspark_prefix_cache_hits_total") for a, b in zip(after, before))
    per_replica = [int(_delta(a, b, "dspark_prompt_tokens_total")) for a, b in zip(after, before)]
    evictions = [int(_delta(a, b, "dspark_prefix_cache_evictions_total")) for a, b in zip(after, before)]
    preemptions = [int(_delta(a, b, "dspark_preemptions_total")) for a, b in zip(after, before)]
    ok = [r for r in results if r.ok]
    ttft = percentiles([r.ttft * 1000 for r in ok])
    return {"prefix_hit_rate": round(hits / queries, 3) if queries else 0.0, "ttft_p50_ms": round(ttft["p50"], 1),
            "ttft_p90_ms": round(ttft["p90"], 1), "total_tok_s": round(sum(r.tokens for r in ok) / wall, 1),
            "requests": len(results), "ok": len(ok), "wall_s": round(wall, 1),
            "prompt_tokens_per_replica": per_replica, "kv_cache_tokens_per_replica": [kv_tokens(a) for a in after],
            "evictions_per_replica": evictions, "preemptions_per_replica": preemptions}


def kv_tokens(page: dict[str, float]) -> int | None:
    """A replica's KV cache capacity in tokens: its pool's blocks times their size (the block size is a label of
    vllm:cache_config_info); None when the page lacks either."""
    blocks = page.get("dspark_kv_total_blocks")
    size = next((int(m.group(1)) for k in page if (m := re.match(r'vllm:cache_config_info\{.*block_size="(\d+)"', k))),
                None)
    return int(blocks) * size if blocks is not None and size is not None else None


def run(args) -> dict:
    model = next((f.split("=", 1)[1] for f in args.server_flag if f.startswith("--model=")), None)
    if not any(f.startswith("--threads") for f in args.server_flag):
        # the replicas share this machine's cores: torch threads beyond a replica's share spin against each other
        # (2 replicas x 2 threads on 2 cores ran the default replay 12x slower than 1 thread each)
        args.server_flag = [*args.server_flag, f"--threads={max(1, (os.cpu_count() or 1) // args.replicas)}"]
    convs = conversations(model, args.conversations, args.max_history)
    print(f"{len(convs)} conversations, {sum(len(c) // 2 for c in convs)} turns, {args.replicas} replicas, "
          f"{args.history} history", flush=True)
    out = {}
    with tempfile.TemporaryDirectory(prefix="dspark-routing-") as tmp:
        for mode in MODES:
            t0 = time.perf_counter()
            out[mode] = run_mode(mode, convs, args, Path(tmp))
            print(mode, json.dumps(out[mode]), f"({time.perf_counter() - t0:.0f} s with start-up)", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="dspark loadtest routing", description=__doc__.splitlines()[0])
    p.add_argument("--conversations", type=int, default=16, help="conversations replayed at once")
    p.add_argument("--max-history", type=int, default=1500, help="longest replayed history, in tokens")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per answer")
    p.add_argument("--history", choices=("generated", "recorded"), default="generated",
                   help="assistant turns resent: the replicas' answers (a chat client's) or ShareGPT's")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--max-conns", type=int, default=64, help="consistent hash: bounded load, requests per replica")
    p.add_argument("--server-flag", action="append", default=[],
                   help="a `dspark serve` flag for every replica, as --server-flag=--model=PATH (repeatable)")
    p.add_argument("--out", default="runs/routing.json")
    args = p.parse_args(argv)
    r = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(r, indent=1))
    keys = ("prefix_hit_rate", "ttft_p50_ms", "ttft_p90_ms", "total_tok_s", "kv_cache_tokens_per_replica",
            "evictions_per_replica")
    print(json.dumps({mode: {k: r[mode][k] for k in keys} for mode in r}))


if __name__ == "__main__":
    main()
