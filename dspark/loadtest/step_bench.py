"""Engine step time at 1..64 requests while every request speculates and samples, and what a step copies to the host.

    python -m dspark.loadtest.step_bench --requests 1 8 32 64 [--draft-len 3] [--temperature 1.0] [--top-k 50]
        [--top-p 1.0]

Each request gets a distinct 64-token prompt; after the prefill, `--steps` decode steps are timed one by one (the
median is reported), with the dspark drafter at a fixed draft length and sampled requests (the path where
verification did the most per-request work). `bytes_to_host` is the engine's own count (`stats["bytes_to_host"]`,
also exported as `dspark_step_bytes_to_host`); a checkout without it reports "-". `--label` names the code under
test, so that two checkouts can be run in turn and written side by side. Each step's time outside the target's
forward and the drafter's (propose, folding features into its context) is the engine's host work (`--plain`:
decode steps without speculation).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dspark.engine import llm_engine
from dspark.engine.llm_engine import LLMEngine
from dspark.engine.sampling import SamplingParams
from dspark.engine.settings import Settings
from dspark.loadtest.decode_profile import make_prompts


def time_forwards(eng: LLMEngine) -> dict[str, float]:
    """Wrap the target's and the drafter's forwards (propose, and folding features into the drafter's context) so
    that their seconds add up in "s": the rest of a step is the engine's host work. Verification (acceptance and
    sampling over the logits: on a GPU device work, on a CPU host work) adds up in "verify"."""
    spent = {"s": 0.0, "verify": 0.0}

    def timed(obj, name, key="s"):
        fn = getattr(obj, name)

        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t0

        setattr(obj, name, wrapper)

    timed(eng.runner, "forward")
    if eng.drafter is not None:
        timed(eng.drafter, "propose")
        if not eng.model_free:
            timed(eng.drafter, "extend_contexts")
    timed(llm_engine, "verify_step", "verify")
    return spent


def step_times(requests: list[int], draft_len: int, temperature: float, steps: int, model: str | None,
               top_k: int = 50, top_p: float = 1.0, plain: bool = False) -> list[dict]:
    kw = {"model": model} if model else {}
    spec = {"speculative": "none"} if plain else {"speculative": "dspark", "draft_policy": "fixed",
                                                  "draft_len": draft_len}
    eng = LLMEngine(Settings(**spec, max_num_seqs=max(requests), max_num_batched_tokens=8192, **kw))
    forwards = time_forwards(eng)
    rows = []
    for r in requests:
        params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=i, ignore_eos=True,
                                 max_tokens=(steps + 4) * (draft_len + 1)) for i in range(r)]
        seqs = [eng.add_request(f"step-{r}-{i}", p, sp) for i, (p, sp) in enumerate(zip(make_prompts(eng, r, 64),
                                                                                       params))]
        while any(s.num_output == 0 for s in seqs):
            eng.step()
        before = eng.stats.get("bytes_to_host")
        times, host, verify = [], [], []
        for _ in range(steps):
            forwards["s"] = forwards["verify"] = 0.0
            t0 = time.perf_counter()
            eng.step()
            times.append(time.perf_counter() - t0)
            host.append(times[-1] - forwards["s"])
            verify.append(forwards["verify"])
        copied = None if before is None else (eng.stats["bytes_to_host"] - before) / steps
        for s in seqs:
            eng.abort_request(s.request_id)
        rows.append({"requests": r, "step_ms": 1e3 * statistics.median(times), "bytes_to_host": copied,
                     "host_ms": 1e3 * statistics.median(host), "verify_ms": 1e3 * statistics.median(verify),
                     "rest_ms": 1e3 * statistics.median([h - v for h, v in zip(host, verify)])})
        row = rows[-1]
        print(f"R={r:>3}: {row['step_ms']:8.1f} ms/step, {row['host_ms']:6.1f} ms of it outside the target's and "
              f"the drafter's forwards ({row['verify_ms']:.1f} ms verification, {row['rest_ms']:.1f} ms the rest), "
              f"{'-' if copied is None else f'{copied:.0f}'} B to host per step",
              flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--requests", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--draft-len", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plain", action="store_true", help="no speculation: plain decode steps")
    ap.add_argument("--label", default="this checkout")
    ap.add_argument("--json", default=None, help="append this run's rows, labelled, to a JSON file")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = step_times(a.requests, a.draft_len, a.temperature, a.steps, a.model, a.top_k, a.top_p, a.plain)
    if a.json:
        import json
        from pathlib import Path

        path = Path(a.json)
        runs = json.loads(path.read_text()) if path.exists() else {}
        runs[a.label] = rows
        path.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
