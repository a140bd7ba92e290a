"""The peers benchmark's pure parts: prompt parsing and selection, token recount, systems' commands, the table.
No peer server runs here (CI has neither llama.cpp nor the prompt packages); the figures come from the real run."""

import asyncio
import gzip
import io
import json
import random

import httpx

from dspark.loadtest import peers
from dspark.loadtest.loadgen import LoadConfig, Result, later_turns, one_request

CONVS = [{"id": "a", "conversations": [{"from": "human", "value": " Hello there, what is 1+1? "},
                                       {"from": "gpt", "value": "2"}]},
         {"id": "b", "conversations": [{"from": "gpt", "value": "I start"}, {"from": "human", "value": "no"}]},
         {"id": "c", "conversations": [{"from": "human", "value": "   "}]},
         {"id": "d", "conversations": []},
         {"id": "e", "conversations": [{"from": "human", "value": "Écris un poème « court » 🙂"}]}]


def test_json_array_items_across_chunks_and_a_cut_off_tail():
    text = json.dumps(CONVS, indent=2, ensure_ascii=False)
    for chunk in (1, 7, 64, 1 << 20):
        assert list(peers.iter_json_array(io.StringIO(text), chunk)) == CONVS
        cut = text[: text.index('"id": "e"') + 12]  # truncated inside the last item, as the shipped file is
        assert list(peers.iter_json_array(io.StringIO(cut), chunk)) == CONVS[:4]
    assert list(peers.iter_json_array(io.StringIO("[12, 345, 6]"), 2)) == [12, 345, 6]  # numbers split across chunks
    assert list(peers.iter_json_array(io.StringIO("  [ ]"), 1)) == []
    assert list(peers.iter_json_array(io.StringIO(""), 4)) == []


def test_sharegpt_first_human_turns():
    text = json.dumps(CONVS, ensure_ascii=False)
    first = ["Hello there, what is 1+1?", "Écris un poème « court » 🙂"]
    assert peers.sharegpt_first_turns(io.StringIO(text), 10) == first
    assert peers.sharegpt_first_turns(io.StringIO(text), 1) == ["Hello there, what is 1+1?"]


def test_humaneval_prompts_from_the_gzipped_jsonl(tmp_path):
    path = tmp_path / "HumanEval.jsonl.gz"
    rows = [{"task_id": f"HumanEval/{i}", "prompt": f"def f{i}(x):\n    \"\"\"doc\"\"\"\n"} for i in range(3)]
    with gzip.open(path, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    assert peers.humaneval_prompts(path) == [r["prompt"] for r in rows]


def test_prompts_are_capped_seeded_alternating_chat_bodies():
    words = lambda t: len(t.split())  # noqa: E731  (a stand-in tokenizer)
    code = [f"def f{i}(" + " x" * i + "):" for i in range(40)]
    chat = [f"question {i}" + " word" * (3 * i) for i in range(40)]
    a = peers.build_prompts(10, words, max_prompt_tokens=30, min_prompt_tokens=4, seed=1, humaneval=code, sharegpt=chat)
    assert a == peers.build_prompts(10, words, max_prompt_tokens=30, min_prompt_tokens=4, seed=1, humaneval=code,
                              sharegpt=chat)
    assert a != peers.build_prompts(10, words, max_prompt_tokens=30, min_prompt_tokens=4, seed=2, humaneval=code,
                              sharegpt=chat)
    texts = [b["messages"][0]["content"] for b in a]
    assert len(a) == 10 and all(set(b) == {"messages"} and b["messages"][0]["role"] == "user" for b in a)
    assert all(4 <= words(t) <= 30 for t in texts)
    assert [t.startswith("Complete this Python function") for t in texts] == [True, False] * 5
    # fewer qualify than asked: all of them, the rest from the other set
    assert len(peers.pick(chat, 99, words, 10, 0, random.Random(0))) == 3
    b = peers.build_prompts(8, words, max_prompt_tokens=10, min_prompt_tokens=0, humaneval=code, sharegpt=chat)
    assert len(b) == 7 and sum("question" in x["messages"][0]["content"] for x in b) == 3


def test_recount_only_where_the_server_sent_no_usage():
    count = lambda t: len(t.split())  # noqa: E731
    rs = [Result(ok=True, tokens=3, chunks=3, usage=True, text="a b c d e"),
          Result(ok=True, tokens=2, chunks=2, text="one two three"),
          Result(ok=True, tokens=4, chunks=4, text="x"),
          Result(ok=False, chunks=0, text="")]
    peers.recount_tokens(rs, count)
    assert [r.tokens for r in rs] == [3, 3, 4, 0]
    rs[1].tokens = 0
    peers.recount_tokens(rs, count, cap=2)  # never more than max_tokens
    assert [r.tokens for r in rs] == [3, 2, 2, 0]


def test_client_counts_chunks_and_keeps_text_without_usage():
    """A llama-cpp-python-like stream (no usage chunk) and no ignore_eos in the body when it is turned off."""
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.update(json.loads(request.content))
        events = [{"choices": [{"delta": {"role": "assistant"}, "finish_reason": None}]}]
        events += [{"choices": [{"delta": {"content": w}, "finish_reason": None}]} for w in ("Hel", "lo", " you")]
        events += [{"choices": [{"delta": {}, "finish_reason": "stop"}]}]
        body = ": ping\n\n" + "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        return httpx.Response(200, content=body.encode(), headers={"content-type": "text/event-stream"})

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://x") as client:
            cfg = LoadConfig("http://x", "m", [], max_tokens=5, ignore_eos=False, keep_text=True)
            return await one_request(client, cfg, {"messages": [{"role": "user", "content": "hi"}]})

    r = asyncio.run(go())
    assert r.ok and r.tokens == r.chunks == 3 and not r.usage and r.text == "Hello you" and r.finish_reason == "stop"
    assert "ignore_eos" not in seen and seen["max_tokens"] == 5 and seen["stream"] is True


def test_systems_commands():
    out = peers.systems("/m.gguf", "/m.gguf", "/hf", "/peers/bin/python", threads=2, pld_tokens=6)
    names = [s.name for s in out]
    assert names[0] == "dspark" and len(out) == 4
    cmd = {s.name: s.command() for s in out}
    assert "serve --model /m.gguf --speculative none --threads 2 --port P" in cmd["dspark"]
    assert out[0].flags == ["--model", "/m.gguf", "--speculative", "none", "--threads", "2"]
    llama = cmd["llama.cpp"]
    assert llama.startswith("/peers/bin/python -m llama_cpp.server --model /m.gguf") and "--n_threads 2" in llama
    assert "--interrupt_requests False" in llama and "draft_model" not in llama
    assert "--draft_model prompt-lookup-decoding --draft_model_num_pred_tokens 6" in cmd["llama.cpp + prompt lookup"]
    tf = [s for s in out if s.kind == "transformers"][0]
    assert tf.command().startswith("OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 /peers/bin/transformers serve /hf "
                                   "--continuous-batching")
    assert [s.name for s in peers.systems("a", "b", "c", "d", which=["llama.cpp"])] == names[1:3]
    assert [s.name for s in peers.systems("a", "b", "c", "d", which=["dspark", "transformers"])] == [names[0], names[3]]


def _point(users, per_user, total, ttft, ok=4):
    return {"users": users, "ok": ok, "requests": 4, "errors": {} if ok else {"ConnectError": 4},
            "per_user_tokens_per_s": {"p50": per_user, "p90": per_user, "p99": per_user},
            "total_tokens_per_s": total, "ttft_s": {"p50": ttft, "p90": ttft, "p99": ttft}, "mean_tokens": 100.0}


def test_table_ratios_to_this_server_and_failed_systems():
    data = {"config": {"users": [1, 8, 32], "command": "python -m dspark.loadtest.peers --users 1,8,32",
                       "gguf": "/x/m.gguf",
                       "model": "/x/m.gguf", "threads": 2, "cpu": "cpu", "requests": 32, "num_prompts": 64,
                       "max_prompt_tokens": 512, "seed": 0, "max_tokens": 128},
            "versions": {"dspark": "0.1.0", "peers llama_cpp_python": "0.3.36", "llama.cpp system_info": "AVX2 = 1"},
            "systems": {
                "dspark": {"version": "dspark 0.1.0", "command": "dspark serve", "error": None,
                           "points": [_point(1, 20.0, 19.0, 0.1), _point(8, 10.0, 80.0, 0.2),
                                      _point(32, 5.0, 100.0, 0.5)]},
                "llama.cpp": {"version": "llama-cpp-python 0.3.36", "command": "python -m llama_cpp.server",
                              "error": "RuntimeError: server exited with -4 during the 32-user point",
                              "points": [_point(1, 40.0, 38.0, 0.05), _point(8, 40.0, 40.0, 2.0),
                                         _point(32, 0.0, 0.0, 0.0, ok=0)]},
                "transformers serve --continuous-batching": {"version": "transformers 5", "command": "transformers",
                                                             "error": "RuntimeError: not ready", "points": []}}}
    rows = {r["system"]: r for r in peers.table_rows(data)}
    assert rows["dspark"]["ratio"] == [1.0, 1.0, 1.0]
    assert rows["llama.cpp"]["figures"] == [40.0, 40.0, None] and rows["llama.cpp"]["ratio"][:2] == [2.0, 0.5]
    assert rows["llama.cpp"]["ratio"][2] is None and rows["llama.cpp"]["errors"] == 0
    md = peers.markdown(data, "peers-test")
    assert md.startswith("<!-- bench:peers-test -->") and md.endswith("<!-- /bench:peers-test -->")
    assert "Command: `python -m dspark.loadtest.peers --users 1,8,32`" in md
    assert "| per-user tok/s @1 | total tok/s @8 | total tok/s @32 | TTFT p50 ms @1 / @8 / @32 |" in md
    assert ("| dspark | dspark 0.1.0 | 20.0 | 80.0 | 100.0 | 100 / 200 / 500 | 100 / 100 / 100 | "
            "1.00x / 1.00x / 1.00x | 0 |") in md
    assert "| llama.cpp | llama-cpp-python 0.3.36 | 40.0 | 40.0 | - | 50 / 2000 / - |" in md
    assert "2.00x / 0.50x / -" in md
    assert "| transformers serve --continuous-batching | transformers 5 | - | - | - | - | - | - | failed: " in md
    assert "llama.cpp built for: `AVX2 = 1`" in md and "peers llama_cpp_python 0.3.36" in md


def test_default_chat_prompts_are_the_drafters_held_out_ones(monkeypatch):
    texts = [f"question number {i} about something" for i in range(200)]
    monkeypatch.setattr(peers, "sharegpt_prompts", lambda limit=None: texts)
    words = lambda t: len(t.split())  # noqa: E731
    chat = [b["messages"][0]["content"] for b in peers.build_prompts(20, words, humaneval=[])]
    held = [t for t in texts if peers.heldout_text(t)]
    assert len(chat) == 10 and set(chat) <= set(held)  # n // 2 chat turns, each held out


def test_later_turns_cut_after_the_last_user_turn_that_fits():
    words = lambda t: len(t.split())  # noqa: E731
    u, a = (lambda t: {"role": "user", "content": t}), (lambda t: {"role": "assistant", "content": t})
    long = [u("one two"), a("three four five"), u("six"), a("seven eight"), u("nine ten eleven twelve")]
    short = [u("hi"), a("hello there")]  # one user turn: not a later turn
    assert later_turns([short, long], 5, words, max_tokens=8) == [long[:3]]
    assert later_turns([short, long], 5, words, max_tokens=99) == [long]
    assert later_turns([long, long], 1, words, max_tokens=99) == [long]


def test_decode_rate_is_tokens_past_the_first_over_the_time_they_added(monkeypatch):
    import time as _time
    from types import SimpleNamespace

    def fake_post(url, timeout, json):  # a server that takes 10 ms a token, prompt cached or not
        n = min(json["max_tokens"], 41)
        _time.sleep(0.01 * n)
        return SimpleNamespace(raise_for_status=lambda: None, json=lambda: {"usage": {"completion_tokens": n}})

    monkeypatch.setattr(peers.httpx, "post", fake_post)
    server = SimpleNamespace(url="http://x", model="m")
    s = peers.System("dspark", "dspark", [])
    groups = {"code": [{"messages": []}], "chat": [{"messages": []}]}
    points = peers.measure_decode_rate(server, s, groups, 64, [])
    assert [p["group"] for p in points] == ["code", "chat"]
    assert all(70 < p["median"] < 101 for p in points)  # 40 tokens in 0.40 s: 100 tok/s less the sleeps' overshoot
    md = peers.decode_rate_markdown({"config": {"per_group": 1, "max_tokens": 64, "threads": 2, "command": "c",
                                                "cpu": "cpu"}, "systems": {"dspark": {"points": points,
                                                                                      "command": "x"}}}, "dr")
    assert "| dspark | " in md and md.startswith("<!-- bench:dr -->")


def test_by_group_systems_take_turns_prompt_by_prompt_and_pair_their_ratios(monkeypatch):
    """measure_groups with every system up: prompt i goes to each system in turn, the first system rotating from
    prompt to prompt, `repeats` times over the group; each point keeps (prompt, tok/s) per request, and the table
    gives the median of the per-prompt ratios to `--speculative none` with their min-max."""
    sent = []

    async def fake_loop(cfg, users, per_user):
        sent.append((cfg.url, cfg.prompts[0]["messages"][0]["content"], cfg.temperature))
        rate = {"none": 10.0, "spec": {"a": 30.0, "b": 10.0, "c": 20.0}}
        r = Result(ok=True, tokens=4, chunks=4, usage=True, latency=1.0, text="x")
        tps = rate["none"] if cfg.url == "none" else rate["spec"][cfg.prompts[0]["messages"][0]["content"]]
        r.ttft, r.last = 0.1, 0.1 + 3 / tps  # tokens_per_s = (tokens - 1) / (last - ttft) = tps
        return [r], 1.0

    class Up:
        def __init__(self, url):
            self.url, self.model, self.proc = url, "m", type("P", (), {"poll": lambda self: None})()

    monkeypatch.setattr(peers, "closed_loop", fake_loop)
    system = lambda n: peers.System(n, "dspark", ["dspark", "serve"], flags=[])  # noqa: E731
    up = {"dspark --speculative none": (system("dspark --speculative none"), Up("none")),
          "dspark (defaults)": (system("dspark (defaults)"), Up("spec"))}
    data = {"systems": {n: {"points": [], "error": None, "version": "v", "command": n} for n in up},
            "config": {"command": "c", "per_group": 3, "max_tokens": 4, "threads": 2, "cpu": "cpu",
                       "temperatures": [0.0], "repeats": 2},
            "prompts": {"chat": [{"messages": [{"role": "user", "content": c}]} for c in "abc"]}}
    peers.measure_groups(up, data["prompts"], [0.0], 4, len, data, repeats=2)
    timed = sent[2:]  # after a warm-up call per system
    assert [(u, p) for u, p, _ in timed] == [("none", "a"), ("spec", "a"), ("spec", "b"), ("none", "b"),
                                              ("none", "c"), ("spec", "c"), ("spec", "a"), ("none", "a"),
                                              ("none", "b"), ("spec", "b"), ("spec", "c"), ("none", "c")]
    p = data["systems"]["dspark (defaults)"]["points"][0]
    assert p["requests_prompt"] == [0, 1, 2, 0, 1, 2] and p["group"] == "chat"
    md = peers.groups_markdown(data, "g")
    assert "| dspark (defaults) | 20.0 (2.00x, 1.00-3.00) |" in md  # per prompt 3x, 1x, 2x; p50 20 vs 10


def test_sweep_groups_prompts_are_peers_by_group_prompts():
    """`dspark loadtest sweep --prompts groups --requests 15` sends `peers --by-group 3`'s prompts, a group at a
    time in turn (so the two tools can be compared on the same prompts)."""
    from dspark.engine.settings import DEFAULT_MODEL, resolve_model
    from dspark.engine.tokenizer import Tokenizer
    from dspark.loadtest.loadgen import builtin_prompts, group_prompts

    tok = Tokenizer(resolve_model(DEFAULT_MODEL))
    groups = group_prompts(lambda t: len(tok.encode(t)), 3)
    assert list(groups) == ["code", "chat", "math", "edit", "multiturn"]
    assert builtin_prompts("groups", 15) == [groups[g][i] for i in range(3) for g in groups]


def test_by_group_a_system_that_dies_keeps_its_figures_and_the_others_go_on(monkeypatch):
    async def fake_loop(cfg, users, per_user):
        r = Result(ok=True, tokens=4, chunks=4, usage=True, latency=1.0, text="x", ttft=0.1, last=0.4)
        return [r], 1.0

    class Up:
        def __init__(self, url, dies_after=None):
            self.url, self.model, self.calls, self.dies_after, self.returncode = url, "m", 0, dies_after, 1
            self.proc = self

        def poll(self):
            self.calls += 1
            return 1 if self.dies_after is not None and self.calls > self.dies_after else None

    monkeypatch.setattr(peers, "closed_loop", fake_loop)
    system = lambda n: peers.System(n, "dspark", ["dspark", "serve"], flags=[])  # noqa: E731
    up = {"a": (system("a"), Up("a")), "b": (system("b"), Up("b", dies_after=1))}
    data = {"systems": {n: {"points": [], "error": None} for n in up}}
    groups = {g: [{"messages": [{"role": "user", "content": c}]} for c in "xyz"] for g in ("chat", "code")}
    peers.measure_groups(up, groups, [0.0], 4, len, data)
    assert [(p["group"], p["requests"]) for p in data["systems"]["a"]["points"]] == [("chat", 3), ("code", 3)]
    assert [(p["group"], p["requests"]) for p in data["systems"]["b"]["points"]] == [("chat", 1)]
    assert data["systems"]["b"]["error"] == "RuntimeError: server exited with 1"
