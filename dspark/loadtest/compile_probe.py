"""Does torch.compile (Inductor) cut the per-op overhead of a CPU decode step? Eager against compiled, one process.

    python -m dspark.loadtest.compile_probe [--model SmolLM2-135M-Instruct] [--tokens 64] [--rounds 3] [--cpp-wrapper]

The int4 model's decoder layer is rewritten as two functions of tensors only (input norm + q|k|v projection +
RoPE; o projection + residual + norm + gate|up + SiLU + down + residual), the same two for every layer so that
one compiled graph serves all of them (dynamic shapes; the paged attention between them stays eager). Greedy
decode of one request then alternates between the model's own eager forward and the compiled functions, and
prints tok/s for each round: what the engine would gain by compiling its decode forward on this host.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from dspark.engine import model as M
from dspark.engine.llm_engine import LLMEngine
from dspark.engine.sampling import SamplingParams
from dspark.engine.settings import Settings

int4_mm = torch.ops.aten._weight_int4pack_mm_for_cpu


def _norm(x, w, eps: float):
    return w * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


def _pre(x, nw, eps: float, packed, sz, group: int, cos, sin_signed, h: int, hkv: int, d: int):
    xn = _norm(x, nw, eps).to(torch.bfloat16)
    qkv = int4_mm(xn, packed, group, sz).to(x.dtype).view(x.shape[0], h + 2 * hkv, d)
    qk = M.rope_swapped(qkv[:, : h + hkv], cos, sin_signed)
    return qk[:, :h], qk[:, h:], qkv[:, h + hkv :]


def _post(x, o, op, osz, nw, eps: float, gp, gsz, dp, dsz, group: int):
    x = x + int4_mm(o.to(torch.bfloat16), op, group, osz).to(x.dtype)
    gate, up = int4_mm(_norm(x, nw, eps).to(torch.bfloat16), gp, group, gsz).chunk(2, dim=-1)
    return x + int4_mm((F.silu(gate) * up).to(torch.bfloat16), dp, group, dsz).to(x.dtype)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cpp-wrapper", action="store_true", help="Inductor's C++ wrapper (no Python between kernels)")
    args = ap.parse_args(argv)
    eng = LLMEngine(Settings(model=args.model, dtype="auto", quantization="int4", speculative="none"))
    opts = {"cpp_wrapper": True} if args.cpp_wrapper else {}
    pre = torch.compile(_pre, dynamic=True, options=opts)
    post = torch.compile(_post, dynamic=True, options=opts)

    def compiled_layer(self, x, cos, sin, backend, kv_cache, sin_signed=None):
        a, m, n1, n2 = self.self_attn, self.mlp, self.input_layernorm, self.post_attention_layernorm
        g = a.qkv.group_size
        q, k, v = pre(x, n1.weight, n1.eps, a.qkv.packed, a.qkv.scales_zeros, g, cos, sin_signed, a.n_heads, a.n_kv,
                      a.head_dim)
        o = backend.forward(a.layer_idx, q, k, v, kv_cache, a.scale).reshape(x.shape[0], -1)
        return post(x, o, a.o.packed, a.o.scales_zeros, n2.weight, n2.eps, m.gate_up.packed, m.gate_up.scales_zeros,
                    m.down.packed, m.down.scales_zeros, g)

    eager_layer = M.DecoderLayer.forward
    prompt = eng.tokenizer.encode("def fibonacci(n):")
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)

    def run(layer) -> tuple[float, list[int]]:
        M.DecoderLayer.forward = layer
        t0 = time.perf_counter()
        out = eng.generate([prompt], params)[0].output_ids
        return len(out) / (time.perf_counter() - t0), out

    try:
        _, want = run(eager_layer)
        t0 = time.perf_counter()
        _, got = run(compiled_layer)  # compiles (prefill and decode shapes)
        print(f"compile + first run {time.perf_counter() - t0:.1f} s; same greedy text as eager: {got == want}")
        for r in range(args.rounds):
            e, _ = run(eager_layer)
            c, _ = run(compiled_layer)
            print(f"round {r}: eager {e:6.1f} tok/s, compiled{' (cpp wrapper)' if args.cpp_wrapper else ''} "
                  f"{c:6.1f} tok/s ({c / e:.2f}x)")
    finally:
        M.DecoderLayer.forward = eager_layer


if __name__ == "__main__":
    main()
