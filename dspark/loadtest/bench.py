"""`dspark bench`: generated tokens/s of our engine at batch 1 and N concurrent requests, against HF
transformers `generate()` on the same weights, measured in one run on this machine.

Every request generates exactly `tokens` tokens (greedy, EOS ignored), so the runs do the same work.
The engine is driven directly (no HTTP), as `generate()` is; the HTTP load test is `loadtest/`.
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import torch

from dspark.engine.drafters.suffix import SuffixCache
from dspark.engine.gguf_model import find_gguf
from dspark.engine.llm_engine import LLMEngine
from dspark.engine.report import replace_section
from dspark.engine.sampling import SamplingParams
from dspark.engine.settings import Settings

PROMPTS = [
    "def parse_args(argv):\n", "import os\nimport sys\n\n\ndef main():\n", "class LRUCache:\n    def __init__(self",
    "def read_file(path):\n    \"\"\"Return the contents of a file.\"\"\"\n", "for key, value in items:\n",
    "def merge(a, b):\n", "import json\n\n\ndef load(path):\n", "try:\n    import ssl\nexcept ImportError:\n",
]


def _prompt(i: int) -> str:
    return PROMPTS[i % len(PROMPTS)]


def bench_engine(engine: LLMEngine, batch: int, tokens: int, repeats: int) -> dict:
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    ids = [engine.tokenizer.encode(_prompt(i)) for i in range(batch)]
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        seqs = engine.generate(ids, params)
        dt = time.perf_counter() - t0
        assert all(s.num_output == tokens for s in seqs)
        runs.append(dt)
    dt = statistics.median(runs)
    return {"total_tps": batch * tokens / dt, "per_user_tps": tokens / dt, "seconds": dt}


def hf_load(model: str, dtype: torch.dtype = torch.float32):
    """transformers' model and tokenizer for an HF directory or a GGUF file (through its own GGUF loader)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf(model)
    where, kw = (gguf.parent, {"gguf_file": gguf.name}) if gguf else (model, {})
    return (AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kw).eval(),
            AutoTokenizer.from_pretrained(where, **kw))


def bench_hf(model_dir: str, batch: int, tokens: int, repeats: int, dtype: torch.dtype) -> dict:
    model, tok = hf_load(model_dir, dtype)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    enc = tok([_prompt(i) for i in range(batch)], return_tensors="pt", padding=True, add_special_tokens=False)
    kw = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    runs = []
    with torch.inference_mode():
        model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model.generate(**enc, **kw)
            runs.append(time.perf_counter() - t0)
    assert out.shape[1] - enc["input_ids"].shape[1] == tokens
    dt = statistics.median(runs)
    return {"total_tps": batch * tokens / dt, "per_user_tps": tokens / dt, "seconds": dt}


def run_bench(settings: Settings, tokens: int = 128, concurrency: int = 16, write: str = "docs/benchmarks.md",
              hf: bool = True, repeats: int = 3) -> list[dict]:
    torch.manual_seed(0)
    settings = settings.model_copy(update={"speculative": "none"})  # plain decoding vs plain generate()
    engine = LLMEngine(settings)
    engine.generate([engine.tokenizer.encode(_prompt(0))], SamplingParams(temperature=0, max_tokens=8))  # warm-up
    rows = []
    for batch in (1, concurrency):
        r = bench_engine(engine, batch, tokens, repeats)
        rows.append({"system": "dspark engine (torch paged attention)", "batch": batch, **r})
        print(f"dspark  batch {batch:>3}: {r['total_tps']:8.1f} tok/s total, {r['per_user_tps']:7.1f} tok/s per user")
    if hf:
        for batch in (1, concurrency):
            r = bench_hf(settings.model, batch, tokens, repeats, engine.model.lm_head.weight.dtype)
            rows.append({"system": "HF transformers generate()", "batch": batch, **r})
            print(f"HF      batch {batch:>3}: {r['total_tps']:8.1f} tok/s total, "
                  f"{r['per_user_tps']:7.1f} tok/s per user")
    ours = {r["batch"]: r for r in rows if r["system"].startswith("dspark")}
    ratios = {"batch_n_over_batch_1": ours[concurrency]["total_tps"] / ours[1]["total_tps"]}
    theirs = {r["batch"]: r for r in rows if r["system"].startswith("HF")}
    if theirs:
        ratios["batch_1_vs_hf"] = ours[1]["total_tps"] / theirs[1]["total_tps"]
        ratios[f"batch_{concurrency}_vs_hf"] = ours[concurrency]["total_tps"] / theirs[concurrency]["total_tps"]
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    if write:
        write_markdown(Path(write), settings, rows, ratios, tokens, concurrency)
    return rows


def write_markdown(path: Path, settings: Settings, rows, ratios, tokens, concurrency) -> None:
    cmd = f"dspark bench --tokens {tokens} --concurrency {concurrency}"
    if settings.threads:
        cmd += f" --threads {settings.threads}"
    lines = [
        "<!-- bench:serving-core -->",
        "## Serving core: generated tokens/s vs HF transformers (CPU)",
        "",
        f"Command: `{cmd}` (model `{settings.model_name}`, dtype {settings.dtype}, "
        f"{torch.get_num_threads()} torch threads, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}). Each request generates exactly {tokens} tokens, greedy; median of 3 runs.",
        "",
        "| system | concurrent requests | total tok/s | per-user tok/s |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['system']} | {r['batch']} | {r['total_tps']:.1f} | {r['per_user_tps']:.1f} |" for r in rows]
    lines += ["", "Ratios (same run): " + ", ".join(f"{k} = {v:.2f}x" for k, v in ratios.items()), "",
              "<!-- /bench:serving-core -->"]
    replace_section(path, "serving-core", "\n".join(lines))


def bench_hf_speculative(model_dir: str, prompts: dict, tokens: int, lookup: int = 10) -> list[dict]:
    """HF transformers generate() at batch 1, plain and with prompt-lookup decoding (its model-free speculation,
    `prompt_lookup_num_tokens`), per group and temperature, on the same prompts and weights (float32)."""
    target = hf_load(model_dir)[0]
    rows = []
    for name, kw in [("HF generate()", {}), (f"HF generate(prompt_lookup_num_tokens={lookup})",
                                             {"prompt_lookup_num_tokens": lookup})]:
        for temp in (0.0, 1.0):
            for g, group in prompts.items():
                n_tok, secs = 0, 0.0
                for i, p in enumerate(group):
                    torch.manual_seed(i)
                    ids = torch.tensor([p])
                    sample = {"do_sample": True, "temperature": temp, "top_k": 0} if temp else {"do_sample": False}
                    t0 = time.perf_counter()
                    with torch.inference_mode():
                        out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                              **sample, **kw)
                    secs += time.perf_counter() - t0
                    n_tok += out.shape[1] - ids.shape[1]
                rows.append({"method": name, "temperature": temp, "group": g, "tps": n_tok / secs,
                             "tau": float("nan"), "tokens": n_tok})
                print(f"{name} T={temp} {g}: {n_tok / secs:7.1f} tok/s per user (batch 1)")
    return rows


def bench_speculative(settings: Settings, methods: list[str], tokens: int = 128, write: str = "docs/benchmarks.md",
                      per_group: int = 8, hf: bool = False) -> list[dict]:
    """Per-user tokens/s at batch 1 for each speculation method, per held-out group (code, chat, math, and
    edit: rewrite a given HumanEval solution) and temperature (0 and 1). Every method's engine is loaded first
    and the methods take turns on each prompt (the first to run rotates), so a slow drift of this machine's speed
    falls on all of them alike."""
    from dspark.engine.training.eval_drafter import heldout_prompts
    from dspark.engine.training.prompts import edit_prompts

    engines = {}
    for method in methods:  # "dspark" (the settings' draft policy), or "dspark:fixed" / "dspark:adaptive"
        name, _, policy = method.partition(":")
        policy = policy or settings.draft_policy
        engines[method] = eng = LLMEngine(settings.model_copy(update={"speculative": name, "draft_policy": policy}))
    tokenizer = next(iter(engines.values())).tokenizer
    prompts = heldout_prompts(tokenizer, per_group, seed=0)
    prompts["edit"] = [tokenizer.encode_chat(m) for m in edit_prompts(per_group)]
    for eng in engines.values():
        eng.generate([prompts["code"][0]], SamplingParams(temperature=0, max_tokens=8))  # warm-up
    rows = []
    for temp in (0.0, 1.0):
        for eng in engines.values():  # suffix decoding's store of finished outputs starts empty at each temperature:
            if eng.suffix is not None:  # it must not hold these very prompts' answers from the other temperature
                eng.suffix.cache = SuffixCache(eng.settings.suffix_max_cached_requests,
                                               eng.settings.suffix_max_cached_tokens)
        for g, group in prompts.items():
            tally = {m: [0, 0.0, 0, 0] for m in methods}  # tokens, seconds, rounds, accepted
            for i, p in enumerate(group):
                for m in methods[i % len(methods):] + methods[: i % len(methods)]:
                    eng, t = engines[m], tally[m]
                    rounds0, acc0 = eng.stats["draft_rounds"], eng.stats["accepted_tokens"]
                    t0 = time.perf_counter()
                    s = eng.generate([p], SamplingParams(temperature=temp, max_tokens=tokens, seed=i))[0]
                    t[1] += time.perf_counter() - t0
                    t[0] += s.num_output
                    t[2] += eng.stats["draft_rounds"] - rounds0
                    t[3] += eng.stats["accepted_tokens"] - acc0
            for m, (n_tok, secs, rounds, acc) in tally.items():
                tau = (acc + rounds) / rounds if rounds else float("nan")
                rows.append({"method": m, "temperature": temp, "group": g, "tps": n_tok / secs, "tau": tau,
                             "tokens": n_tok})
                print(f"{m:>16} T={temp} {g}: {n_tok / secs:7.1f} tok/s per user (batch 1), tau {tau:.2f}")
    del engines
    if hf and prompts is not None:
        rows += bench_hf_speculative(settings.model, prompts, tokens)
    base = {(r["temperature"], r["group"]): r["tps"] for r in rows if r["method"] == "none"}
    for r in rows:
        r["speedup"] = r["tps"] / base.get((r["temperature"], r["group"]), float("nan"))
    if write:
        groups = list(prompts) if prompts else []
        lines = ["<!-- bench:speculative -->", "## Speculative decoding: per-user tokens/s at batch 1 (CPU)", "",
                 f"Command: `dspark bench --speculative-methods {','.join(methods)} --tokens {tokens} --per-group "
                 f"{per_group}{' --hf' if hf else ''}` ({torch.get_num_threads()} torch threads, dtype "
                 f"{settings.dtype}). {per_group} held-out prompts per group (code: HumanEval, chat: held-out "
                 f"ShareGPT, math: generated, edit: rewrite a given HumanEval solution), up to {tokens} new "
                 "tokens each, one at a time; cells are tok/s per "
                 "user (speed-up vs none; tau = committed tokens per verification round incl. the bonus). "
                 "`:fixed` drafts the full block (7) every step; `:adaptive` lets the scheduler choose who drafts "
                 "and how much is verified. The engines take turns on each prompt (so a drift of the machine's "
                 "speed falls on all alike); the HF rows run after them.", "",
                 "| method | T | " + " | ".join(groups) + " |", "|---|---|" + "---|" * len(groups)]
        for (m, t) in dict.fromkeys((r["method"], r["temperature"]) for r in rows):
            cells = []
            for g in groups:
                r = next(x for x in rows if (x["method"], x["temperature"], x["group"]) == (m, t, g))
                cells.append(f"{r['tps']:.1f} ({r['speedup']:.2f}x" + ("" if r["tau"] != r["tau"]
                                                                     else f", tau {r['tau']:.2f}") + ")")
            lines.append(f"| {m} | {t} | " + " | ".join(cells) + " |")
        lines += ["", "<!-- /bench:speculative -->"]
        replace_section(Path(write), "speculative", "\n".join(lines))
    return rows
