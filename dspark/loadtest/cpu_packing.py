"""float32 projections on oneDNN's packed kernels vs at::linear (MKL) on this CPU: one projection per row count,
then the engine at batch 1 (greedy, held-out prompts of every group) without and with speculation.

    python -m dspark.loadtest.cpu_packing [--per-group 2] [--tokens 64] [--threads 2]

Where MKL runs off Intel (`engine.model.mkl_off_intel`) serving packs fp32 weights by default; this times both
ways in one process (engines built with the rule forced on and off, runs alternating per prompt), so the ratio is
what the rule buys on the machine it runs on.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

import dspark.engine.model as M
from dspark.engine.llm_engine import LLMEngine
from dspark.engine.sampling import SamplingParams
from dspark.engine.settings import Settings
from dspark.engine.training.eval_drafter import heldout_prompts


def median_us(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[reps // 2] * 1e6


def projections(rows=(1, 2, 4, 8, 16)) -> None:
    """gate|up, down and the LM head of SmolLM2-135M (random weights): packed vs at::linear, microseconds."""
    for out, inp in ((3072, 576), (576, 1536), (49152, 576)):
        w = torch.randn(out, inp)
        packed = torch.ops.mkldnn._reorder_linear_weight(w)
        reps = 20 if out > 10000 else 100
        for r in rows:
            x = torch.randn(r, inp)
            plain = median_us(lambda x=x, w=w: F.linear(x, w), reps)
            pk = median_us(lambda x=x, p=packed: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], ""), reps)
            print(f"W {out}x{inp} rows {r:2d}: at::linear {plain:8.1f} us, packed {pk:8.1f} us ({plain / pk:.2f}x)")


def engines_ab(per_group: int, tokens: int) -> None:
    base = Settings(model="SmolLM2-135M-Instruct", dtype="auto")
    rule = M.mkl_off_intel
    engines = {}
    try:
        for packed in (True, False):
            M.mkl_off_intel = lambda packed=packed: packed
            for spec in ("none", "dspark"):
                engines[(packed, spec)] = LLMEngine(base.model_copy(update={"speculative": spec,
                                                                            "draft_policy": "fixed"}))
    finally:
        M.mkl_off_intel = rule
    prompts = [p for ps in heldout_prompts(engines[(True, "none")].tokenizer, per_group, seed=0).values() for p in ps]
    for eng in engines.values():
        eng.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=8))  # warm-up
    keys, tally = list(engines), {k: [0, 0.0] for k in engines}
    for i, p in enumerate(prompts):
        for k in keys[i % len(keys):] + keys[: i % len(keys)]:
            t0 = time.perf_counter()
            s = engines[k].generate([p], SamplingParams(temperature=0, max_tokens=tokens))[0]
            tally[k][1] += time.perf_counter() - t0
            tally[k][0] += s.num_output
    tps = {k: n / sec for k, (n, sec) in tally.items()}
    for spec in ("none", "dspark"):
        print(f"{spec:>6} (dspark: fixed block of 7): packed {tps[(True, spec)]:5.1f} tok/s, at::linear "
              f"{tps[(False, spec)]:5.1f} tok/s ({tps[(True, spec)] / tps[(False, spec)]:.2f}x)")
    print(f"speculation over none: packed {tps[(True, 'dspark')] / tps[(True, 'none')]:.2f}x, at::linear "
          f"{tps[(False, 'dspark')] / tps[(False, 'none')]:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-group", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"{platform.processor() or platform.machine()}, MKL off Intel: {M.mkl_off_intel()}, "
          f"{a.threads} threads, torch {torch.__version__}")
    projections()
    engines_ab(a.per_group, a.tokens)


if __name__ == "__main__":
    main()
