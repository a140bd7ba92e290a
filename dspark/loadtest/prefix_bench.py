"""Prefix-caching benchmark over HTTP on the default model, cache on vs off (one server each, same requests):

(a) shared system prompt: requests whose ~1,000-token system prompt is the same and whose user turns differ
    (held-out ShareGPT questions), sent by a few concurrent users;
(b) multi-turn replay: held-out ShareGPT conversations, one per user, each turn resending the whole history: the
    recorded one (ShareGPT's assistant turns), and again with the server's own answers as a chat client sends them.

Per mode: TTFT p50 / p90, total generated tokens/s, and the prefix cache's hit rate (from /metrics).
Run: python -m dspark.loadtest.prefix_bench [--requests 32 --users 4 --conversations 8 --max-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import httpx

from dspark.engine.report import replace_section
from dspark.loadtest.loadgen import LoadConfig, Result, closed_loop, one_request, percentiles
from dspark.loadtest.sweep import Server, _delta, scrape


def system_prompt(count_tokens, target: int, texts: list[str]) -> str:
    """An instruction and reference text from held-out ShareGPT answers, about `target` tokens long."""
    head = "You are a helpful assistant. Answer using the reference notes below when they apply.\n\nNotes:\n"
    body = []
    for t in texts:
        if count_tokens(head + "\n\n".join(body)) >= target:
            break
        body.append(t)
    text = head + "\n\n".join(body)
    while count_tokens(text) > target:  # trim to about `target`
        text = text[: int(len(text) * 0.97)]
    return text


def workloads(requests: int, conversations: int, system_tokens: int, max_history_tokens: int):
    from dspark.engine.settings import DEFAULT_MODEL, resolve_model
    from dspark.engine.tokenizer import Tokenizer
    from dspark.engine.training.prompts import heldout_text, sharegpt_heldout_dialogues, sharegpt_prompts

    tok = Tokenizer(resolve_model(DEFAULT_MODEL))
    count = lambda t: len(tok.encode(t))  # noqa: E731
    dialogues = sharegpt_heldout_dialogues(400, min_user_turns=3)
    notes = [m["content"] for d in dialogues[200:] for m in d if m["role"] == "assistant"]
    system = system_prompt(count, system_tokens, notes)
    questions = [t for t in sharegpt_prompts(3000) if heldout_text(t) and 4 <= count(t) <= 64][:requests]
    shared = [{"messages": [{"role": "system", "content": system}, {"role": "user", "content": q}]}
              for q in questions]
    return shared, multi_turn(tok, dialogues[:200], conversations, max_history_tokens), count(system)


def multi_turn(tok, dialogues: list[list[dict]], conversations: int, max_history_tokens: int) -> list[list[dict]]:
    """Up to `conversations` dialogues of at least 3 turns, each cut to its whole turns whose history (chat
    template applied, `tok`'s tokens) fits in `max_history_tokens`."""
    convs = []
    for d in dialogues:
        keep = []
        for i in range(0, len(d), 2):
            if len(tok.encode(tok.apply_chat_template(d[: i + 2]))) > max_history_tokens:
                break
            keep = d[: i + 2]
        if len(keep) >= 6:
            convs.append(keep)
        if len(convs) >= conversations:
            break
    return convs


async def replay(url: str, model: str, convs: list[list[dict]], max_tokens: int,
                 served: bool, session_header: str | None = None) -> tuple[list[Result], float]:
    """Each user replays one conversation, turn by turn, each turn sending the whole history and waiting for the
    answer. The history's assistant turns are the recorded ones (ShareGPT's), or with `served` the server's own
    answers, as a chat client sends them. With `session_header`, each request carries it, one value per
    conversation (what a balancer's session affinity keys on)."""
    cfg = LoadConfig(url, model, [], max_tokens=max_tokens, keep_text=served)
    async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=len(convs) + 4)) as client:
        async def user(i, conv):
            headers = {session_header: f"conversation-{i}"} if session_header else None
            results = []
            history: list[dict] = []
            for t in range(0, len(conv), 2):
                history.append(conv[t])
                results.append(await one_request(client, cfg, {"messages": list(history)}, headers))
                history.append({"role": "assistant", "content": results[-1].text} if served else conv[t + 1])
            return results

        t0 = time.perf_counter()
        per_user = await asyncio.gather(*(user(i, c) for i, c in enumerate(convs)))
        return [r for rs in per_user for r in rs], time.perf_counter() - t0


def summary(results: list[Result], wall: float, before: dict, after: dict) -> dict:
    ok = [r for r in results if r.ok]
    queries = _delta(after, before, "dspark_prefix_cache_queries_total")
    return {"requests": len(results), "ok": len(ok), "wall_s": round(wall, 1),
            "ttft_s": {k: round(v, 3) for k, v in percentiles([r.ttft for r in ok]).items()},
            "total_tokens_per_s": round(sum(r.tokens for r in ok) / wall, 1),
            "prompt_tokens": queries,
            "hit_rate": round(_delta(after, before, "dspark_prefix_cache_hits_total") / queries, 3) if queries else 0}


def run(args) -> dict:
    shared, convs, sys_tokens = workloads(args.requests, args.conversations, args.system_tokens, args.max_history)
    out = {"system_tokens": sys_tokens, "conversations": len(convs), "turns": sum(len(c) // 2 for c in convs)}
    for mode in ("on", "off"):
        server = Server(["--enable-prefix-caching", "true" if mode == "on" else "false", *args.server_flag])
        try:
            model = server.model
            cfg = LoadConfig(server.url, model, shared, max_tokens=args.max_tokens)
            before = scrape(server.url)
            results, wall = asyncio.run(closed_loop(cfg, args.users, -(-len(shared) // args.users)))
            a = summary(results, wall, before, scrape(server.url))
            out[mode] = {"shared_system_prompt": a}
            for key, served in (("multi_turn", False), ("multi_turn_served", True)):
                before = scrape(server.url)
                results, wall = asyncio.run(replay(server.url, model, convs, args.max_tokens, served))
                out[mode][key] = summary(results, wall, before, scrape(server.url))
        finally:
            server.stop()
        print(mode, json.dumps(out[mode]))
    return out


def markdown(r: dict, args) -> str:
    rows = []
    for key, name in (("shared_system_prompt", f"(a) {args.requests} requests, {r['system_tokens']}-token shared "
                       f"system prompt, {args.users} users"),
                      ("multi_turn", f"(b) multi-turn ShareGPT replay, recorded history: {r['conversations']} users, "
                       f"{r['turns']} turns"),
                      ("multi_turn_served", "(b') the same turns, history = the server's own answers")):
        on, off = r["on"][key], r["off"][key]
        rows.append(f"| {name} | {on['ttft_s']['p50']:.2f} / {off['ttft_s']['p50']:.2f} "
                    f"({on['ttft_s']['p50'] / off['ttft_s']['p50']:.2f}x) | {on['ttft_s']['p90']:.2f} / "
                    f"{off['ttft_s']['p90']:.2f} | {on['total_tokens_per_s']:.1f} / {off['total_tokens_per_s']:.1f} "
                    f"({on['total_tokens_per_s'] / off['total_tokens_per_s']:.2f}x) | {on['hit_rate']:.0%} | "
                    f"{on['ok']}/{on['requests']}, {off['ok']}/{off['requests']} |")
    flags = " ".join(args.server_flag)
    return "\n".join([
        "<!-- bench:prefix-cache -->", "## Prefix caching: shared system prompts and multi-turn chats (CPU)", "",
        f"Command: `python -m dspark.loadtest.prefix_bench --requests {args.requests} --users {args.users} "
        "--conversations "
        f"{args.conversations} --max-tokens {args.max_tokens}{' --server-flag ' + flags if flags else ''}`. "
        "Two servers of the default model (`dspark serve`, its default speculation), `--enable-prefix-caching "
        "true` and `false`, the same requests in one run; streamed, greedy, "
        f"{args.max_tokens} tokens per answer. Cells: cache on / off.", "",
        "| workload | TTFT p50, s (on/off) | TTFT p90, s | total tokens/s | hit rate (tokens) | ok |",
        "|---|---|---|---|---|---|", *rows, "", "<!-- /bench:prefix-cache -->"])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--users", type=int, default=4)
    p.add_argument("--system-tokens", type=int, default=1000)
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--max-history", type=int, default=1500, help="longest replayed history, in tokens")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--server-flag", action="append", default=[], help="extra `dspark serve` flag (repeatable)")
    p.add_argument("--out", default="runs/prefix_bench.json")
    p.add_argument("--write", default="docs/benchmarks.md")
    args = p.parse_args(argv)
    r = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(r, indent=1))
    if args.write:
        replace_section(Path(args.write), "prefix-cache", markdown(r, args))


if __name__ == "__main__":
    main()
