"""Tensor parallelism on this CPU: TP=1 with 2 threads against TP=2 with 1 thread per rank (gloo), per-user and
total generated tokens/s at batch 1 and batch N, and the resident memory of every rank.

    python -m dspark.loadtest.tp_bench [--model SmolLM2-135M-Instruct] [--speculative dspark] [--tokens 64]
                                       [--batch 8] [--per-group 2] [--dtype float32]

Each configuration runs in a fresh process (`--child`), so the resident memory it reports is its own: rank 0's
VmRSS / VmHWM (peak) from /proc, the workers' likewise, and the same process's RSS before the engine loaded
(torch and the libraries; a worker imports the same). The engine's figures include the KV cache's touched pages,
the tokenizer (rank 0) and, with a drafter, rank 0's whole embedding for it; so each rank's load is also
measured alone (`--rank`): RSS after the metadata, after the tensors (the bar: the rank's shard, not the model),
after the serving layout. Greedy, held-out prompts of every group; the outputs of the
two configurations are compared token for token.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def rss_kb(pid: int | str = "self") -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, kB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            k, v = line.split(":")
            fields[k] = int(v.split()[0])
    return fields.get("VmRSS", 0), fields.get("VmHWM", 0)


def child(args) -> dict:
    import torch

    from dspark.engine.llm_engine import LLMEngine
    from dspark.engine.sampling import SamplingParams
    from dspark.engine.settings import Settings
    from dspark.engine.training.eval_drafter import heldout_prompts

    base = rss_kb()[0]
    eng = LLMEngine(Settings(model=args.model, tensor_parallel_size=args.tp, threads=args.threads, dtype=args.dtype,
                             quantization="none", speculative=args.speculative, max_num_seqs=max(64, args.batch)))
    try:
        params_mb = sum(p.numel() * p.element_size() for p in eng.model.parameters()) / 2**20
        ranks = [("rank 0", *rss_kb())]
        if eng.tp is not None:
            ranks += [(f"rank {r}", *rss_kb(p.pid)) for r, p in enumerate(eng.tp.procs, 1)]
        prompts = [p for g in heldout_prompts(eng.tokenizer, args.per_group, seed=0).values() for p in g]
        greedy = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
        eng.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=8))  # warm-up
        outputs, t1, n1 = [], 0.0, 0
        for p in prompts:  # batch 1: one request at a time
            t0 = time.perf_counter()
            (s,) = eng.generate([p], greedy)
            t1 += time.perf_counter() - t0
            n1 += len(s.output_ids)
            outputs.append(s.output_ids)
        batch = (prompts * (-(-args.batch // len(prompts))))[: args.batch]
        t0 = time.perf_counter()
        seqs = eng.generate(batch, greedy)
        tb = time.perf_counter() - t0
        nb = sum(len(s.output_ids) for s in seqs)
        return {"tp": args.tp, "threads": args.threads, "torch_threads": torch.get_num_threads(),
                "batch1_tok_s": n1 / t1, "batchN_total_tok_s": nb / tb, "batchN_per_user_tok_s": nb / tb / len(batch),
                "batch": len(batch), "accepted": eng.stats["accepted_tokens"], "rounds": eng.stats["draft_rounds"],
                "params_mb_rank0": params_mb, "baseline_rss_mb": base / 1024,
                "ranks": [(n, rss / 1024, hwm / 1024) for n, rss, hwm in ranks], "outputs": outputs}
    finally:
        eng.close()


def load_stages(args) -> dict:
    """One rank's load alone (`--rank` r of 2, or -1: the whole model), resident memory after each stage: the
    checkpoint's metadata parsed, its tensors loaded (this rank's slices), the serving layout (fused; fp32 weights
    packed for oneDNN where MKL runs off Intel: a second copy by design, at TP=1 too)."""
    import torch

    from dspark.engine.model import load_model
    from dspark.engine.model_config import ModelConfig
    from dspark.engine.parallel import plan_shard
    from dspark.engine.settings import Settings

    torch.set_num_threads(1)
    path = Settings(model=args.model).model
    out = {"import": rss_kb()[0] / 1024}
    cfg = ModelConfig.from_dir(path)
    out["config"] = rss_kb()[0] / 1024
    shard = None if args.rank < 0 else plan_shard(cfg, args.rank, 2)
    model = load_model(path, dtype=getattr(torch, args.dtype), shard=shard)
    out["loaded"] = rss_kb()[0] / 1024
    out["params"] = sum(t.numel() * t.element_size() for t in model.parameters()) / 2**20
    out["norms"] = sum(t.numel() * t.element_size() for n, t in model.named_parameters() if "norm" in n) / 2**20
    model.fuse_()
    out["fused"] = rss_kb()[0] / 1024
    out["peak"] = rss_kb()[1] / 1024
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dspark.loadtest.tp_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--speculative", default="dspark")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--per-group", type=int, default=2)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rank is not None:
        print("RESULT " + json.dumps(load_stages(args)), flush=True)
        return
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    stages = {}
    for rank in (-1, 0, 1):
        out = subprocess.run([sys.executable, "-m", "dspark.loadtest.tp_bench", "--rank", str(rank), "--model",
                              args.model, "--dtype", args.dtype], capture_output=True, text=True)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"load of rank {rank} failed:\n{out.stderr[-3000:]}")
        stages[rank] = json.loads(line[len("RESULT "):])
    results = []
    for tp, threads in ((1, 2), (2, 1)):
        cmd = [sys.executable, "-m", "dspark.loadtest.tp_bench", "--child", "--tp", str(tp), "--threads",
               str(threads), "--model", args.model, "--speculative", args.speculative, "--dtype", args.dtype,
               "--tokens", str(args.tokens), "--batch", str(args.batch), "--per-group", str(args.per_group)]
        out = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, capture_output=True,
                             text=True)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"tp={tp} failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(line[len("RESULT "):]))
    print(f"model {args.model}, {args.dtype}, speculative {args.speculative}, greedy, {args.tokens} tokens a request")
    print(f"{'config':<22} {'batch 1 tok/s':>13} {f'batch {args.batch} per user':>18} {'total tok/s':>12} "
          f"{'accepted/rounds':>16}")
    for r in results:
        name = f"TP={r['tp']} x {r['threads']} thread{'s' if r['threads'] > 1 else ''}"
        print(f"{name:<22} {r['batch1_tok_s']:>13.1f} {r['batchN_per_user_tok_s']:>18.1f} "
              f"{r['batchN_total_tok_s']:>12.1f} {r['accepted']:>7}/{r['rounds']:<8}")
    print("\nresident memory per rank (MiB; RSS now / peak, and RSS before the engine loaded in the same process):")
    for r in results:
        for name, rss, hwm in r["ranks"]:
            print(f"  TP={r['tp']} {name}: {rss:.0f} / {hwm:.0f} peak (baseline {r['baseline_rss_mb']:.0f}: "
                  f"+{rss - r['baseline_rss_mb']:.0f})")
        print(f"  TP={r['tp']}: rank 0's model parameters {r['params_mb_rank0']:.0f} MiB")
    print("\nloading alone, resident memory (MiB) after: metadata parsed -> tensors loaded -> serving layout "
          "(peak); model parameters, of which norms:")
    for rank, st in stages.items():
        name = "whole model (TP=1)" if rank < 0 else f"TP=2 rank {rank}"
        print(f"  {name:<19} {st['config']:.0f} -> {st['loaded']:.0f} (+{st['loaded'] - st['config']:.0f}) -> "
              f"{st['fused']:.0f} ({st['peak']:.0f} peak); parameters {st['params']:.0f} MiB, norms {st['norms']:.2f}")
    same = results[0]["outputs"] == results[1]["outputs"]
    print(f"\ngreedy outputs TP=1 vs TP=2: {'identical' if same else 'DIFFER'}")


if __name__ == "__main__":
    main()
