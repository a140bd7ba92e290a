"""Decode speed of the serving engine on one model: batch-1 (and batch-N) greedy decode, and where a step goes.

    python -m dspark.loadtest.decode_profile --model /work/smollm2-hf [--dtype bfloat16] [--batch 1 8] [--profile]
        [--quantization int4]

Each request gets a ~`--prompt-len`-token prompt and generates exactly `--tokens` tokens (greedy, EOS ignored).
The engine is driven step by step (no HTTP): the first step (prefill + first token) is timed apart from the
decode steps, so "decode" figures are pure decode; "CPU" is the process's CPU time per step (all threads), which
a busy machine disturbs less than wall time. `--profile` prints a torch.profiler table of decode steps at batch 1
(or `--profile-batch`; the table's times cover all profiled steps) and the split of a step between the model
forward and the engine's own Python (scheduling, sampling, detokenising). `--check-hf N` compares greedy ids and
logits with HF transformers instead of timing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dspark.engine.llm_engine import LLMEngine
from dspark.engine.quantization import SCHEMES
from dspark.engine.sampling import SamplingParams
from dspark.engine.settings import Settings

TEXT = (
    "The history of computing is a story of abstraction. Early machines were programmed by rewiring panels; "
    "then came stored programs, assemblers, compilers and operating systems, each hiding the layer below. "
    "Today a developer writes a few lines of Python and the interpreter, the runtime, the kernel and the "
    "hardware cooperate to run them across many cores. Explain, step by step, how a modern language model "
    "server turns a prompt into tokens, what limits its speed on a small CPU, and how batching many requests "
    "together changes the cost of each token. Be concrete and give numbers where you can."
)


def make_prompts(engine: LLMEngine, batch: int, prompt_len: int) -> list[list[int]]:
    base = engine.tokenizer.encode(TEXT)
    while len(base) < prompt_len + batch:
        base = base + base
    return [base[i : i + prompt_len] for i in range(batch)]  # distinct prompts, same length


def run_once(engine: LLMEngine, prompts: list[list[int]], tokens: int) -> dict:
    """Add the requests, run to completion; returns wall seconds of the first step and of the decode steps."""
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    t0 = time.perf_counter()
    seqs = [engine.add_request(f"bench-{time.monotonic_ns()}-{i}", p, params) for i, p in enumerate(prompts)]
    while any(s.num_output == 0 for s in seqs):  # prefill (maybe chunked) up to every request's first token
        engine.step()
    t1, c1 = time.perf_counter(), time.process_time()
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    t2, c2 = time.perf_counter(), time.process_time()
    assert all(s.num_output == tokens for s in seqs), [s.num_output for s in seqs]
    decoded = sum(s.num_output - 1 for s in seqs)
    return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "decode_cpu_s": c2 - c1, "decode_steps": steps,
            "decoded": decoded, "total_s": t2 - t0, "generated": sum(s.num_output for s in seqs),
            "token_ids": [list(s.token_ids[len(s.prompt_ids):]) for s in seqs]}


def bench(engine: LLMEngine, batch: int, tokens: int, prompt_len: int, repeats: int) -> dict:
    prompts = make_prompts(engine, batch, prompt_len)
    run_once(engine, prompts, min(tokens, 8))  # warm-up
    runs = [run_once(engine, prompts, tokens) for _ in range(repeats)]
    dec = statistics.median(r["decode_s"] for r in runs)
    cpu = min(r["decode_cpu_s"] for r in runs)
    tot = statistics.median(r["total_s"] for r in runs)
    r0 = runs[0]
    return {
        "batch": batch,
        "decode_tps": r0["decoded"] / dec,  # all requests together
        "ms_per_step": 1000 * dec / r0["decode_steps"],
        "cpu_ms_per_step": 1000 * cpu / r0["decode_steps"],  # CPU time of all threads: robust to a busy machine
        "total_tps": r0["generated"] / tot,  # incl. prefill
        "prefill_ms": 1000 * statistics.median(r["prefill_s"] for r in runs),
        "runs_decode_tps": [r["decoded"] / r["decode_s"] for r in runs],
        "token_ids": r0["token_ids"],
    }


def profile_decode(engine: LLMEngine, prompt_len: int, steps: int = 20, row_limit: int = 30, batch: int = 1) -> None:
    from torch.profiler import ProfilerActivity, profile, record_function

    params = SamplingParams(temperature=0, max_tokens=2 * steps + 12, ignore_eos=True)
    for i, p in enumerate(make_prompts(engine, batch, prompt_len)):
        engine.add_request(f"prof-{time.monotonic_ns()}-{i}", p, params)
    for _ in range(6):  # prefill + a few warm decode steps
        engine.step()
    runner = engine.runner
    fwd_time = [0.0]
    orig = runner.forward

    def timed(*a, **k):
        t = time.perf_counter()
        with record_function("runner.forward"):
            out = orig(*a, **k)
        fwd_time[0] += time.perf_counter() - t
        return out

    runner.forward = timed
    try:
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall = time.perf_counter() - t0
        fwd_plain = fwd_time[0]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                with record_function("engine.step"):
                    engine.step()
    finally:
        runner.forward = orig
    while engine.has_unfinished():
        engine.step()
    print(f"\n== one batch-{batch} decode step, {steps} steps (unprofiled): {1000 * wall / steps:.2f} ms/step, "
          f"of which runner.forward {1000 * fwd_plain / steps:.2f} ms, engine Python outside it "
          f"{1000 * (wall - fwd_plain) / steps:.2f} ms")
    print(f"== torch.profiler over {steps} decode steps (divide totals by {steps} for one step), by self CPU time:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit))


def check_hf(engine: LLMEngine, n_prompts: int, tokens: int, prompt_len: int) -> None:
    """Greedy token ids of the engine (all prompts batched, and the first one alone) against HF transformers'
    generate() in float32 on the same weights, and the last prompt token's logits against HF's."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(engine.settings.model, dtype=torch.float32).eval()
    prompts = [p[: prompt_len - 7 * i] for i, p in enumerate(make_prompts(engine, n_prompts, prompt_len))]
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    batched = [s.output_ids for s in engine.generate(prompts, params)]
    solo = engine.generate(prompts[:1], params)[0].output_ids
    for i, p in enumerate(prompts):
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                              pad_token_id=0)[0, len(p):].tolist()
            ref_logits = hf(torch.tensor([p])).logits[0, -1]
        bm = engine.block_manager
        bm.allocate(-1, len(p))
        try:
            ours = engine.runner.forward([(p, 0)], bm, [-1], [len(p) - 1])[0][0]
        finally:
            bm.free(-1)
        same = next((j for j, (a, b) in enumerate(zip(ref, batched[i])) if a != b), len(ref))
        msg = f"prompt {i} ({len(p)} tokens): batched matches HF for {same}/{tokens} tokens"
        if i == 0:
            msg += f", alone {next((j for j, (a, b) in enumerate(zip(ref, solo)) if a != b), len(ref))}/{tokens}"
        d = (ours - ref_logits).abs().max().item()
        print(f"{msg}; last-token logits max |diff| {d:.2e} (HF logits span {ref_logits.abs().max().item():.1f}), "
              f"same argmax {int(ours.argmax()) == int(ref_logits.argmax())}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="HF model directory (default: the settings' model)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="concurrent requests, one run each")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quantization", default="none", choices=SCHEMES)
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of decode steps")
    ap.add_argument("--profile-batch", type=int, default=1, help="concurrent requests in the profiled steps")
    ap.add_argument("--profile-steps", type=int, default=20)
    ap.add_argument("--check-hf", type=int, default=0, metavar="N",
                    help="compare greedy ids and logits of N prompts with HF transformers (fp32) instead of timing")
    ap.add_argument("--save-ids", default=None, help="write the greedy token ids of each batch to this JSON file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    kw = {"model": args.model} if args.model else {}
    t0 = time.perf_counter()
    engine = LLMEngine(Settings(**kw, dtype=args.dtype, speculative="none", threads=args.threads,
                                quantization=args.quantization))
    print(f"engine built in {time.perf_counter() - t0:.1f} s: {engine.settings.model}, dtype {args.dtype}, "
          f"weights {engine.weights_summary}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    if args.check_hf:
        check_hf(engine, args.check_hf, args.tokens, args.prompt_len)
        return
    ids = {}
    for b in args.batch:
        r = bench(engine, b, args.tokens, args.prompt_len, args.repeats)
        ids[b] = r["token_ids"]
        per_user = r["decode_tps"] / b
        print(f"batch {b:>3}: decode {r['decode_tps']:7.1f} tok/s total ({per_user:6.1f} per user, "
              f"{r['ms_per_step']:6.1f} ms/step, CPU {r['cpu_ms_per_step']:6.1f} ms/step), "
              f"incl. prefill {r['total_tps']:7.1f} tok/s, prefill {r['prefill_ms']:.0f} ms; runs "
              + " ".join(f"{x:.1f}" for x in r["runs_decode_tps"]))
    if args.save_ids:
        import json

        with open(args.save_ids, "w") as f:
            json.dump({str(b): v for b, v in ids.items()}, f)
    if args.profile:
        profile_decode(engine, args.prompt_len, args.profile_steps, batch=args.profile_batch)


if __name__ == "__main__":
    main()
