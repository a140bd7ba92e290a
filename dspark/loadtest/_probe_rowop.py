"""Probe (not committed): row_op on vs off, alternating in one process, w4a8 float32, batch 1 greedy."""
import sys
import time

import dspark.kernels as K
from dspark.engine.llm_engine import LLMEngine
from dspark.engine.sampling import SamplingParams
from dspark.engine.settings import Settings
from dspark.engine.training.eval_drafter import heldout_prompts
from dspark.loadtest.decode_profile import bench

per_group, tokens = int(sys.argv[1]), int(sys.argv[2])
specs = sys.argv[3:] or ["none", "dspark+ngram"]
base = Settings(dtype="float32", quantization="w4a8", threads=2)
real = K.cpu_rows_op
engines = {}
for op in (False, True):
    K.cpu_rows_op = (lambda: False) if not op else real
    for s in specs:
        t0 = time.perf_counter()
        engines[(op, s)] = LLMEngine(base.model_copy(update={"speculative": s}))
        print(f"built row_op={op} spec={s} in {time.perf_counter() - t0:.0f} s, backend row_op "
              f"{engines[(op, s)].runner.backend.row_op}, compiled rows {engines[(op, s)].runner.compiled.max_rows}",
              flush=True)
K.cpu_rows_op = real
tok = next(iter(engines.values())).tokenizer
prompts = [p for ps in heldout_prompts(tok, per_group, seed=0).values() for p in ps]
params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
for eng in engines.values():
    eng.generate([prompts[0]], params)
done, secs, outs = dict.fromkeys(engines, 0), dict.fromkeys(engines, 0.0), {k: [] for k in engines}
for p in prompts:
    for key, eng in engines.items():
        t0 = time.perf_counter()
        out = eng.generate([p], params)[0]
        secs[key] += time.perf_counter() - t0
        done[key] += out.num_output
        outs[key].append(out.output_ids)
ref = outs[(False, "none")]
for key in engines:
    st = engines[key].stats
    tau = 1 + st["accepted_tokens"] / st["draft_rounds"] if st["draft_rounds"] else float("nan")
    same = sum(a == b for a, b in zip(outs[key], ref))
    print(f"row_op={key[0]!s:5} spec={key[1]:14} {done[key] / secs[key]:6.1f} tok/s  rounds {st['draft_rounds']:4d} "
          f"tau {tau:.2f}  same text as row_op=False none: {same}/{len(prompts)}")
for op in (False, True):
    r = bench(engines[(op, "none")], 8, tokens, 60, 1)
    print(f"batch 8 row_op={op}: decode {r['decode_tps']:.1f} tok/s total")
