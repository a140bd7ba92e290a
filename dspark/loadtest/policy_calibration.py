"""The adaptive draft policy's cost model at batch 1, predicted against measured: the start-up profile of a
target step over B tokens and of a drafting round (what the policy decides with), beside the same tables after
serving held-out prompts (refreshed online from real steps), and the tokens/s that adaptive, fixed-length
drafting and plain decoding reach on those prompts, taking turns per prompt.

Run: python -m dspark.loadtest.policy_calibration [--per-group 3 --max-tokens 96]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from dspark.engine.llm_engine import LLMEngine
from dspark.engine.report import replace_section
from dspark.engine.sampling import SamplingParams
from dspark.engine.settings import Settings
from dspark.engine.training.eval_drafter import heldout_prompts

POINTS = (1, 2, 4, 8)


def table(t) -> dict[int, float]:
    return {p: s * 1e3 for p, s in t.items() if p in POINTS}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-group", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--groups", default="code,math")
    p.add_argument("--write", default="docs/benchmarks.md")
    args = p.parse_args(argv)
    modes = {"dspark adaptive": ("dspark", "adaptive"), "dspark fixed (7)": ("dspark", "fixed"),
             "none": ("none", "fixed")}
    engs = {m: LLMEngine(Settings(dtype="auto", speculative=s, draft_policy=pol)) for m, (s, pol) in modes.items()}
    adaptive = engs["dspark adaptive"]
    start = (table(adaptive.cost.verify), table(adaptive.cost.draft))
    prompts = heldout_prompts(adaptive.tokenizer, args.per_group, seed=0)
    tally = {m: [0, 0.0] for m in engs}
    for g in args.groups.split(","):
        for i, ids in enumerate(prompts[g]):
            for m in list(engs)[i % 3:] + list(engs)[: i % 3]:
                t0 = time.perf_counter()
                s = engs[m].generate([ids], SamplingParams(temperature=0, max_tokens=args.max_tokens))[0]
                tally[m][1] += time.perf_counter() - t0
                tally[m][0] += s.num_output
    tps = {m: n / s for m, (n, s) in tally.items()}
    print("start-up", start, "tok/s", tps)
    rows = [("adaptive: start-up profile", *start), ("adaptive: after serving", table(adaptive.cost.verify),
                                                        table(adaptive.cost.draft)),
            ("fixed (7): after serving", table(engs["dspark fixed (7)"].cost.verify),
             table(engs["dspark fixed (7)"].cost.draft))]
    drafted = adaptive.stats["draft_rounds"] / max(adaptive.stats["steps"], 1)
    lines = ["<!-- bench:policy-calibration -->",
             "## Adaptive policy at batch 1: predicted vs measured step cost (CPU)", "",
             f"Command: `python -m dspark.loadtest.policy_calibration --per-group {args.per_group} --max-tokens "
             f"{args.max_tokens}` ({torch.get_num_threads()} torch threads, dtype auto = "
             f"{str(adaptive.model.lm_head.weight.dtype).removeprefix('torch.')}). Held-out {args.groups} prompts, "
             "greedy, one at a time, the three engines taking turns per prompt. Costs in ms: a target step over B "
             "batch tokens (a decode plus B - 1 draft tokens), and a drafting round for one request. The start-up "
             "profile is what the policy decides with until real steps refresh a bucket (a bucket no step visits "
             "keeps it).", "",
             "| cost table | step B=1 | B=2 | B=4 | B=8 | drafting round, 1 request |", "|---|---|---|---|---|---|"]
    for name, v, d in rows:
        cells = [f"{v[b]:.1f}" if b in v else "-" for b in POINTS]
        lines.append(f"| {name} | " + " | ".join(cells) + (f" | {d[1]:.1f} |" if 1 in d else " | - |"))
    lines += ["", "| mode | tok/s per user | vs none |", "|---|---|---|"]
    lines += [f"| {m} | {tps[m]:.1f} | {tps[m] / tps['none']:.2f}x |" for m in engs]
    lines += ["", f"The adaptive policy drafted in {100 * drafted:.0f}% of its steps.", "",
              "<!-- /bench:policy-calibration -->"]
    replace_section(Path(args.write), "policy-calibration", "\n".join(lines))


if __name__ == "__main__":
    main()
