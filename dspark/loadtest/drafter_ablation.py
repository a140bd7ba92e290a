"""The dspark drafter's shape as a measured trade-off: Markov head rank and block layers.

Each variant trains from scratch on the same data with the same budget (`train-drafter` over the draft
vocabulary, as the shipped drafter's last phase), then is scored on held-out greedy answers by teacher forcing:
a full block drafted after every generated position, tau = 1 + its tokens that match the target's greedy choice
before the first miss (what greedy verification of a 7-token draft commits); beside its size on disk and a
drafting round at batch 1 (propose 7 tokens after 200 tokens of context, T=0).

    python -m dspark.loadtest.drafter_ablation --variants l1r0,l1r64,l1r256,l2r64 --steps 450
    python -m dspark.loadtest.drafter_ablation --variants l1r0 --train-only      # one variant per core, then a report
"""

from __future__ import annotations

import argparse
import re
import statistics
from pathlib import Path

import torch
from safetensors.torch import load_file

from dspark.engine.drafters import load_drafter
from dspark.engine.drafters.vocab import FILE, DraftVocab
from dspark.engine.llm_engine import LLMEngine
from dspark.engine.model import load_model
from dspark.engine.report import replace_section
from dspark.engine.sampling import SamplingParams
from dspark.engine.settings import Settings
from dspark.engine.training.eval_drafter import heldout_prompts
from dspark.engine.training.prompts import GROUPS
from dspark.engine.training.train_drafter import (
    drafter_loss,
    make_batch,
    sample_anchors,
    target_features,
    target_stats,
    train_drafter,
)
from dspark.loadtest.draft_vocab_bench import round_ms

DATA = dict(num_prompts=2400, max_new=192, gen_limit=1280, taps=3, intermediate_size=768, batch=16, anchors=12)


def parse(variant: str) -> tuple[int, int]:
    m = re.fullmatch(r"l(\d+)r(\d+)", variant)
    if not m:
        raise ValueError(f"variant {variant!r}: expected l<layers>r<markov rank>, e.g. l1r64")
    return int(m[1]), int(m[2])


def train(model: str, variant: str, out: Path, steps: int, lr: float, vocab: int) -> None:
    layers, rank = parse(variant)
    cfg = out / "config.json"
    if cfg.exists() and f'"steps": {steps},' in cfg.read_text():
        return
    train_drafter(model, str(out), method="dspark", steps=steps, num_layers=layers, markov_rank=rank,
                  markov_factored=True, lr=lr, draft_vocab_size=vocab, threads=torch.get_num_threads(), **DATA)


@torch.inference_mode()
def teacher_forced_tau(drafter, target, answers: dict, vocab: DraftVocab, pad: int) -> dict[str, float]:
    """Per group: 1 + mean leading run of slot hits over every anchor of every answer."""
    out = {}
    for g, (items, feats) in answers.items():
        runs = []
        for item, f in zip(items, feats):
            ids, gm, taps, final, lse, amax = make_batch([item], pad, [f])
            anc, valid = sample_anchors(gm, gm.shape[1], torch.Generator().manual_seed(0))  # all of them
            hits: list = []
            with torch.autocast("cpu", dtype=torch.bfloat16):
                drafter_loss(drafter, target, ids, gm, anc, valid, "dspark", taps, final, vocab, lse, amax, hits)
            runs.append(hits[0][0][valid[0]].long().cumprod(-1).sum(-1))
        out[g] = 1 + torch.cat(runs).float().mean().item()
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--variants", default="l1r0,l1r64,l1r256,l2r64")
    p.add_argument("--steps", type=int, default=450)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--draft-vocab-size", type=int, default=8192)
    p.add_argument("--per-group", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--train-only", action="store_true")
    p.add_argument("--write", default="docs/benchmarks.md")
    args = p.parse_args(argv)
    model = str(Settings(model=args.model).model)
    variants = args.variants.split(",")
    for v in variants:
        train(model, v, Path(args.out) / v, args.steps, args.lr, args.draft_vocab_size)
    if args.train_only:
        return
    eng = LLMEngine(Settings(model=args.model, dtype="auto", speculative="none"))
    pad = eng.model_config.eos_token_id[0]
    prompts = heldout_prompts(eng.tokenizer, args.per_group, seed=0)
    target = load_model(model).eval()
    amp = eng.settings.torch_dtype == torch.bfloat16
    drafters = {v: load_drafter(Path(args.out) / v, target).eval() for v in variants}
    taps = {tuple(d.cfg.target_layer_ids) for d in drafters.values()}
    assert len(taps) == 1, f"the variants tap different target layers {taps}: one feature pass cannot score them"
    tapped = list(taps.pop())
    answers = {}
    for g in GROUPS:
        seqs = eng.generate(prompts[g], SamplingParams(temperature=0, max_tokens=args.max_tokens))
        items = [{"ids": s.prompt_ids + s.output_ids, "prompt_len": len(s.prompt_ids)} for s in seqs]
        feats = target_features(eng.model, items, tapped, pad)
        answers[g] = (items, [(*f, *st) for f, st in zip(feats, target_stats(target, feats, amp))])
    rows = []
    for v in variants:
        d, drafter = Path(args.out) / v, drafters[v]
        ranking = load_file(str(d / FILE))["ranking"]
        vocab = DraftVocab.top(ranking, args.draft_vocab_size, target.config.vocab_size, target.config.eos_token_id)
        tau = teacher_forced_tau(drafter, target, answers, vocab, pad)
        spec = LLMEngine(Settings(model=args.model, dtype="auto", speculative="dspark", drafter=str(d),
                                  draft_policy="fixed", draft_vocab_size=args.draft_vocab_size))
        ms = statistics.median(round_ms(spec, 1, 0.0) for _ in range(3))
        size = (d / "model.safetensors").stat().st_size / 2**20
        rows.append((v, *parse(v), tau, size, ms))
        print(v, {g: round(t, 3) for g, t in tau.items()}, f"{size:.1f} MiB", f"{ms:.1f} ms", flush=True)
    lines = ["<!-- bench:drafter-ablation -->", "## dspark drafter shape: Markov rank and layers (CPU)", "",
             f"Command: `python -m dspark.loadtest.drafter_ablation --variants {args.variants} --steps {args.steps}` "
             f"({torch.get_num_threads()} torch threads). Each variant: trained from scratch, {args.steps} steps x 16 "
             f"sequences x 12 blocks, lr {args.lr}, over the {args.draft_vocab_size}-token draft vocabulary, on the "
             f"shipped drafter's data (MLP width 768, target layers {' / '.join(map(str, tapped))}, Markov head "
             "factored through the "
             f"target's embedding and LM head). Scored on the target's greedy answers to {args.per_group} held-out "
             f"prompts per group ({args.max_tokens} tokens) by teacher forcing: a 7-token block after every "
             "generated position; tau = 1 + its tokens matching the target before the first miss (what greedy "
             "verification of a full block commits). Round: one drafting round at batch 1 (7 tokens after 200 of "
             "context, T=0), median of 3 means of 5.", "",
             "| variant | layers | Markov rank | tau code | tau chat | tau math | tau macro | size MiB | round ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for v, layers, rank, tau, size, ms in rows:
        macro = sum(tau.values()) / len(tau)
        lines.append(f"| {v} | {layers} | {rank} | " + " | ".join(f"{tau[g]:.3f}" for g in GROUPS)
                     + f" | {macro:.3f} | {size:.1f} | {ms:.1f} |")
    lines += ["", "<!-- /bench:drafter-ablation -->"]
    if args.write:
        replace_section(Path(args.write), "drafter-ablation", "\n".join(lines))


if __name__ == "__main__":
    main()
