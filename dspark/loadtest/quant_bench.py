"""Weight-only quantization on this host: speed, memory and quality of each `--quantization` scheme.

    python -m dspark.loadtest.quant_bench [--model SmolLM2-135M-Instruct] [--schemes none int8 int4]
        [--per-group 2] [--tokens 64] [--quality 8] [--skip kernels speed memory quality]

kernels: the decoder's projections alone at 1-16 rows, bf16 on oneDNN vs int8 vs int4 (the aten kernels).
speed: batch-1 greedy decode on held-out prompts of every group (code, chat, math), speculation off and on
(`--speculative`, default dspark+ngram), one engine per (scheme, speculation) built up front and the runs
alternating per prompt, so drift on a noisy machine falls on every scheme alike; then total tok/s of 8 concurrent
requests (speculation off). memory: resident set of a fresh process after it built the engine, per scheme.
quality: against the float32 model with no quantization (for a GGUF: its own dequantized weights), on held-out
ShareGPT and HumanEval text: perplexity, teacher-forced top-1 agreement over the reference's 128-token greedy
continuations, and the share of those continuations each scheme reproduces token for token before it first
differs.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from dspark.engine.llm_engine import LLMEngine
from dspark.engine.sampling import SamplingParams
from dspark.engine.settings import Settings
from dspark.engine.training.eval_drafter import heldout_prompts
from dspark.engine.training.prompts import prompt_set
from dspark.loadtest.decode_profile import bench

RSS_SNIPPET = """
import json, sys
from dspark.engine.llm_engine import LLMEngine
from dspark.engine.settings import Settings
e = LLMEngine(Settings(**json.loads(sys.argv[1])))
rss = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmRSS"))
print(json.dumps({"rss_mb": rss / 1024, "weights": e.weights_summary}))
"""


def median_ms(once) -> float:
    """Milliseconds a call of `once`: the median of 11 timed calls after 3 warm-up ones."""
    for _ in range(3):
        once()
    ts = []
    for _ in range(11):
        t0 = time.perf_counter()
        once()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[5] * 1e3


def kernels(base: Settings, rows=(1, 2, 4, 8, 16), layers: int | None = None) -> None:
    """The decoder's projections alone, per kernel: every layer's own (random) weights, so that each call streams
    its weight from memory as in a real step; milliseconds for all of them, per row count."""
    from dspark.engine.model_config import ModelConfig
    from dspark.engine.quantization import Int4Linear, Int8Linear, W4A8Linear, W8A8Linear, int4_codes
    from dspark.kernels import cpu_quant

    c = ModelConfig.from_dir(base.model)
    n_layers = layers or c.num_hidden_layers
    h, i, hd = c.hidden_size, c.intermediate_size, c.head_dim
    shapes = [((c.num_attention_heads + 2 * c.num_key_value_heads) * hd, h), (h, c.num_attention_heads * hd),
              (2 * i, h), (h, i)]
    kinds = {"bf16 oneDNN": lambda w: (lambda x, p=torch.ops.mkldnn._reorder_linear_weight(w.bfloat16()):
                                       torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")),
             "int8": Int8Linear, "int4 g32": lambda w: Int4Linear(int4_codes(w, 32), 32)}
    if not cpu_quant.unavailable():
        kinds["w4a8"] = lambda w: W4A8Linear(int4_codes(w, 32))
    torch.manual_seed(0)
    weights = [[torch.randn(n, k) * 0.02 for n, k in shapes] for _ in range(n_layers)]
    kinds["float32"] = lambda w: (lambda x, w=w: torch.nn.functional.linear(x, w))
    built = {}
    for name, make in list(kinds.items()):
        try:
            built[name] = [[make(w) for w in ws] for ws in weights]
        except RuntimeError as e:  # bf16 oneDNN needs AVX512 (or AVX-NE-CONVERT)
            print(f"({name}: not on this host: {str(e).splitlines()[0]})")
            del kinds[name]
    del weights
    print(f"\n== the decoder's {4 * n_layers} projections (q|k|v, o, gate|up, down x {n_layers} layers), bf16 "
          "activations (w4a8: float32, quantized to int8 in the kernel; float32: float32 weights, MKL): ms for all "
          "of them")
    print(f"{'rows':>4} " + " ".join(f"{name:>12}" for name in kinds))
    for r in rows:
        xs32 = {k: torch.randn(r, k) for _, k in shapes}
        cells = []
        for name in kinds:
            xs = {k: x if name in ("w4a8", "float32") else x.bfloat16() for k, x in xs32.items()}

            def once(name=name, xs=xs):
                for projs in built[name]:
                    for proj, (_, k) in zip(projs, shapes):
                        proj(xs[k])
            cells.append(median_ms(once))
        print(f"{r:4d} " + " ".join(f"{ms:12.2f}" for ms in cells))
    head = torch.randn(c.vocab_size, h) * 0.02
    heads = {"int8": Int8Linear(head)}
    if not cpu_quant.unavailable():
        heads["w8a8 (w4a8's)"] = W8A8Linear(head)
    print(f"\n== the LM head ({c.vocab_size} x {h}): ms a call")
    print(f"{'rows':>4} " + " ".join(f"{name:>14}" for name in heads))
    for r in rows:
        x = torch.randn(r, h)
        cells = []
        for name, proj in heads.items():
            xr = x.bfloat16() if name == "int8" else x
            cells.append(median_ms(lambda proj=proj, xr=xr: proj(xr)))
        print(f"{r:4d} " + " ".join(f"{ms:14.2f}" for ms in cells))


def scheme(name: str) -> dict:
    """Settings of a scheme name: "int4", or "int4+det" / "int4-det" for --deterministic on / off."""
    for mark, det in (("+det", "on"), ("-det", "off")):
        if name.endswith(mark):
            return {"quantization": name.removesuffix(mark), "deterministic": det}
    return {"quantization": name}


def speed(base: Settings, schemes: list[str], spec: str, per_group: int, tokens: int) -> None:
    engines = {(q, s): LLMEngine(base.model_copy(update={**scheme(q), "speculative": s}))
               for q in schemes for s in ("none", spec)}
    tok = next(iter(engines.values())).tokenizer
    prompts = [p for ps in heldout_prompts(tok, per_group, seed=0).values() for p in ps]
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    for eng in engines.values():  # warm-up
        eng.generate([prompts[0]], params)
    done = dict.fromkeys(engines, 0)
    secs = dict.fromkeys(engines, 0.0)
    same = dict.fromkeys(schemes, 0)
    for p in prompts:
        outs = {}
        for key, eng in engines.items():
            t0 = time.perf_counter()
            out = eng.generate([p], params)[0]
            secs[key] += time.perf_counter() - t0
            done[key] += out.num_output
            outs[key] = out.output_ids
        for q in schemes:
            same[q] += outs[(q, "none")] == outs[(q, spec)]
    print(f"\n== batch 1, greedy, {len(prompts)} held-out prompts ({per_group} per group), {tokens} tokens each "
          f"(prefill included): tok/s per user")
    print(f"{'scheme':8} {'spec none':>10} {spec:>14} {'spec/none':>10} {'x none':>8}  greedy text with = without")
    base_rate = done[(schemes[0], "none")] / secs[(schemes[0], "none")]
    for q in schemes:
        plain, fast = (done[(q, s)] / secs[(q, s)] for s in ("none", spec))
        print(f"{q:8} {plain:10.1f} {fast:14.1f} {fast / plain:10.2f} {plain / base_rate:8.2f}  "
              f"{same[q]}/{len(prompts)}")
    for q in schemes:  # acceptance of the drafts on each target: the drafter reads the quantized model's taps
        st = engines[(q, spec)].stats
        tau = 1 + st["accepted_tokens"] / st["draft_rounds"] if st["draft_rounds"] else float("nan")
        print(f"{q:8} with {spec}: {st['draft_rounds']} drafting rounds, {st['verified_tokens']} draft tokens "
              f"verified, {st['accepted_tokens']} accepted, tau {tau:.2f} tokens per round")
    for q in schemes:
        eng = engines[(q, "none")]
        r = bench(eng, 8, tokens, 60, 1)
        print(f"batch 8 ({q}): decode {r['decode_tps']:.1f} tok/s total")


def memory(base: Settings, schemes: list[str]) -> None:
    print("\n== resident memory after the engine is built (a fresh process per scheme, speculation off)")
    for q in schemes:
        for dtype in dict.fromkeys([base.dtype, "float32"]):
            cfg = base.model_copy(update={**scheme(q), "speculative": "none", "dtype": dtype})
            out = subprocess.run([sys.executable, "-c", RSS_SNIPPET, cfg.model_dump_json()], capture_output=True,
                                 text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{q:6} dtype {dtype:9} RSS {r['rss_mb']:7.0f} MB  ({r['weights']})")


@torch.inference_mode()
def quality(base: Settings, schemes: list[str], n_texts: int, tokens: int = 128) -> None:
    ref_eng = LLMEngine(base.model_copy(update={"quantization": "none", "speculative": "none", "dtype": "float32"}))
    tok = ref_eng.tokenizer
    sets = prompt_set("heldout", {"chat": n_texts // 2, "code": n_texts - n_texts // 2}, lambda t: len(tok.encode(t)))
    texts = [m[0]["content"] for g in ("chat", "code") for m in sets[g]]
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    prompts = [tok.encode_chat([{"role": "user", "content": t}]) for t in texts]
    refs = [o.output_ids for o in ref_eng.generate(prompts, params)]

    def scores(model) -> tuple[float, float]:
        nll = n = agree = total = 0.0
        for t, p, r in zip(texts, prompts, refs):
            ids = torch.tensor([tok.encode(t)])
            logits = model.logits(model(ids)[0])[0]
            nll += F.cross_entropy(logits[:-1].float(), ids[0, 1:], reduction="sum").item()
            n += ids.shape[1] - 1
            full = torch.tensor([p + r])
            pred = model.logits(model(full)[0])[0, len(p) - 1 : -1].argmax(-1)
            agree += (pred == torch.tensor(r)).sum().item()
            total += len(r)
        return math.exp(nll / n), agree / total

    print(f"\n== quality against the float32 model without quantization, {len(texts)} held-out texts "
          f"({len(sets['chat'])} ShareGPT, {len(sets['code'])} HumanEval), {tokens}-token greedy continuations")
    ref_ppl, _ = scores(ref_eng.model)
    print(f"{'scheme':14} {'perplexity':>10} {'vs ref':>8} {'top-1 agree':>12} {'identical prefix':>17}")
    print(f"{'float32 ref':14} {ref_ppl:10.3f} {1.0:8.4f} {1.0:12.4f} {1.0:17.4f}")
    del ref_eng
    for q in schemes:
        for dtype in dict.fromkeys([base.dtype, "float32"]):
            if q == "none" and dtype == "float32":
                continue
            eng = LLMEngine(base.model_copy(update={**scheme(q), "speculative": "none", "dtype": dtype}))
            ppl, agree = scores(eng.model)
            outs = [o.output_ids for o in eng.generate(prompts, params)]
            prefix = sum(next((i for i, (a, b) in enumerate(zip(o, r)) if a != b), len(r))
                         for o, r in zip(outs, refs)) / sum(len(r) for r in refs)
            label = f"{q} {str(eng.model.model.embed_tokens.weight.dtype).removeprefix('torch.')}"
            print(f"{label:14} {ppl:10.3f} {ppl / ref_ppl:8.4f} {agree:12.4f} {prefix:17.4f}")
            del eng


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--schemes", nargs="+", default=["none", "int8", "int4"],
                    help="none | int8 | int4 | w4a8, each optionally +det / -det (--deterministic on / off)")
    ap.add_argument("--speculative", default="dspark+ngram")
    ap.add_argument("--per-group", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--quality", type=int, default=8, help="held-out texts for the quality table")
    ap.add_argument("--deterministic", default="auto", choices=["auto", "on", "off"], help="every engine's")
    ap.add_argument("--skip", nargs="*", default=[], choices=["kernels", "speed", "memory", "quality"])
    ap.add_argument("--draft-policy", default="adaptive", choices=["adaptive", "fixed"])
    args = ap.parse_args(argv)
    base = Settings(model=args.model, dtype=args.dtype, draft_policy=args.draft_policy,
                    deterministic=args.deterministic)
    print(f"host: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, dtype {args.dtype} = {base.torch_dtype}"
          f", --deterministic {args.deterministic}")
    if "kernels" not in args.skip:
        kernels(base)
    if "speed" not in args.skip:
        speed(base, args.schemes, args.speculative, args.per_group, args.tokens)
    if "memory" not in args.skip:
        memory(base, args.schemes)
    if "quality" not in args.skip:
        quality(base, args.schemes, args.quality)


if __name__ == "__main__":
    main()
