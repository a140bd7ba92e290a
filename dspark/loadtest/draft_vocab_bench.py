"""The reduced draft vocabulary on the default model: a drafting round's time (the shipped dspark drafter's
propose, 7 positions, 200 tokens of context) at draft vocabulary sizes K, and the share of the target's own greedy
tokens on held-out prompts that the top K cover (what the drafter could still guess).

Run: python -m dspark.loadtest.draft_vocab_bench [--sizes 0,4096,8192,16384]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from dspark.engine.drafters.vocab import FILE
from dspark.engine.llm_engine import LLMEngine
from dspark.engine.report import replace_section
from dspark.engine.sampling import SamplingParams, make_generator
from dspark.engine.settings import Settings
from dspark.engine.training.eval_drafter import heldout_prompts
from dspark.engine.training.prompts import GROUPS


def round_ms(eng: LLMEngine, r: int, temperature: float, reps: int = 5) -> float:
    ctx = eng._scratch_context(200)
    d = eng.drafter

    def once():
        d.propose(eng.model.model.embed_tokens, eng.model.lm_head, [5] * r, [ctx] * r, [7] * r,
                  [SamplingParams(temperature=temperature, top_k=50 if temperature else 0)] * r,
                  [make_generator(i) for i in range(r)], 0.0)

    once()
    t0 = time.perf_counter()
    for _ in range(reps):
        once()
    return (time.perf_counter() - t0) / reps * 1e3


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="0,4096,8192,16384")
    p.add_argument("--per-group", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--write", default="docs/benchmarks.md")
    args = p.parse_args(argv)
    sizes = [int(k) for k in args.sizes.split(",")]
    plain = LLMEngine(Settings(speculative="none"))
    prompts = heldout_prompts(plain.tokenizer, args.per_group, seed=0)
    answers = {g: [t for s in plain.generate(prompts[g], SamplingParams(temperature=0, max_tokens=args.max_tokens))
                   for t in s.output_ids] for g in GROUPS}
    del plain
    rows = []
    for k in sizes:
        eng = LLMEngine(Settings(speculative="dspark", draft_policy="fixed", draft_vocab_size=k))
        vocab = eng.drafter.vocab
        allowed = None if vocab is None else set(vocab.ids.tolist())
        cover = {g: 1.0 if allowed is None else sum(t in allowed for t in ts) / len(ts) for g, ts in answers.items()}
        row = {"k": len(allowed) if allowed else eng.model_config.vocab_size, "asked": k, "cover": cover,
               "ms": {(r, t): round_ms(eng, r, t) for r in (1, 8) for t in (0.0, 1.0)}}
        print(row)
        rows.append(row)
    ranked = len(load_file(str(Path(Settings(speculative="dspark").drafter_path) / FILE))["ranking"])
    lines = ["<!-- bench:draft-vocab -->", "## Reduced draft vocabulary (FR-Spec): drafting cost and coverage (CPU)",
             "", f"Command: `python -m dspark.loadtest.draft_vocab_bench --sizes {args.sizes}` "
             f"({torch.get_num_threads()} "
             "torch threads, default model and dtype, the shipped dspark drafter). A drafting round: propose 7 "
             "tokens after 200 tokens of context for R requests (T=1 with top-k 50), mean of 5. Coverage: share "
             f"of the target's greedy tokens on {args.per_group} held-out prompts per group ({args.max_tokens} "
             "tokens each) inside the subset. The ranking counts the target's answers to the drafter's training "
             f"prompts: {ranked} distinct tokens appear there (K includes the end-of-sequence tokens).", "",
             "| K (of 49,152) | round ms, R=1 T=0 | R=1 T=1 | R=8 T=0 | R=8 T=1 | coverage code / chat / math |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ms = r["ms"]
        cov = " / ".join(f"{100 * r['cover'][g]:.1f}%" for g in GROUPS)
        lines.append(f"| {r['k'] if r['asked'] else 'all (0)'} | {ms[1, 0.0]:.1f} | {ms[1, 1.0]:.1f} | "
                     f"{ms[8, 0.0]:.1f} | {ms[8, 1.0]:.1f} | {cov} |")
    lines += ["", "<!-- /bench:draft-vocab -->"]
    replace_section(Path(args.write), "draft-vocab", "\n".join(lines))


if __name__ == "__main__":
    main()
