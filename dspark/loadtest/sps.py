"""`dspark bench --sps`: verification-step time vs batch tokens, against the memory-bandwidth floor.

A Qwen3-8B-shaped target (36 layers, hidden 4096, 32 query / 8 KV heads, vocab 151936) with RANDOM weights in bf16
(timing does not depend on the values), R requests each holding `context` tokens of KV, each verifying k + 1
query tokens (B = R * (k + 1) batch tokens), through the real runner and attention backend, then the engine's
batched verification (greedy) and its copy of the results to the host: the step as the engine runs it. The floor
is what the step must read, (weight bytes + KV bytes) / the copy bandwidth measured on the same device.
"""

from __future__ import annotations

import time

import torch

from dspark.engine.model import CausalLM, rope_inv_freq
from dspark.engine.model_config import ModelConfig
from dspark.engine.runner import ModelRunner, kv_bytes_per_token
from dspark.engine.sampling import SamplingParams
from dspark.engine.verify import Verify, verify_step
from dspark.kernels import make_backend
from dspark.scheduler.block_manager import BlockManager

QWEN3_8B = dict(architectures=["Qwen3ForCausalLM"], vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                max_position_embeddings=40960, rope_theta=1000000.0, tie_word_embeddings=False)
TINY = dict(architectures=["Qwen3ForCausalLM"], vocab_size=512, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=4096)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth(device: str, mib: int = 1024, repeats: int = 5) -> float:
    """Bytes moved per second (read + write) by a large device-to-device copy, best of `repeats`."""
    n = mib * 2**20 // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 2 / best


def profile_step(step, device: str, step_s: float) -> tuple[int | None, float | None]:
    """One step under torch.profiler on CUDA: the kernel launches the host made (a graph replay is one launch) and
    the share of `step_s` (the unprofiled step time) the GPU spent running kernels and copies. (None, None) on
    the CPU, or where the profiler fails (printed; the bench goes on)."""
    if not device.startswith("cuda"):
        return None, None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    try:
        _sync(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            _sync(device)
        events = prof.events()
        launch_apis = ("cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch")
        launches = sum(1 for e in events if e.name.startswith(launch_apis))
        spans = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA)
        return launches, busy_us(spans) * 1e-6 / step_s
    except Exception as e:  # a diagnostic column; the step times stand without it
        print(f"profiler failed: {e!r}", flush=True)
        return None, None


def busy_us(spans: list[tuple[float, float]]) -> float:
    """Length of the union of sorted (start, end) spans: kernels that overlap (programmatic dependent launch)
    count once."""
    total, end = 0.0, float("-inf")
    for a, b in spans:
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def random_model(shape: dict, device: str, dtype: torch.dtype) -> CausalLM:
    cfg = ModelConfig.from_dict(shape)
    with torch.device(device):
        model = CausalLM(cfg).to(dtype)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    model.model.rotary_emb.inv_freq = rope_inv_freq(cfg).to(device)
    return model.eval()


def sps_curve(shape: dict = QWEN3_8B, device: str = "cuda", backend: str = "flashinfer", context: int = 1024,
              draft: int = 3, requests: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64), repeats: int = 10,
              dtype: torch.dtype = torch.bfloat16, graphs: bool = False) -> list[dict]:
    """`graphs`: the steps replay CUDA graphs, captured before timing (every request count here fills its bucket
    exactly: R requests x (draft + 1) rows)."""
    model = random_model(shape, device, dtype)
    cfg = model.config
    bs = 16
    per_req = -(-(context + draft + 1) // bs)
    bm = BlockManager(per_req * max(requests) + 1, bs)
    runner = ModelRunner(model, make_backend(backend, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                                             device, dtype), bm.num_blocks, bs, device, dtype)
    if graphs:
        runner.enable_graphs(draft + 1, max(requests), max(requests) * (draft + 1), per_req * bs)
    bw = copy_bandwidth(device, 1024 if device.startswith("cuda") else 128)
    # a step reads every weight once, except the embedding table (only the rows of its tokens)
    emb = model.model.embed_tokens.weight
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p is not emb)
    if model.lm_head.weight is emb:  # tied: the LM head reads it whole
        weight_bytes += emb.numel() * emb.element_size()
    rows = []
    for r in requests:
        for sid in range(r):
            bm.allocate(sid, context + draft + 1)
        q = draft + 1
        chunks = [([1] * q, context) for _ in range(r)]
        logits_index = list(range(r * q))
        reqs = [Verify([1] * draft, SamplingParams(temperature=0), None) for _ in range(r)]

        step = (chunks, bm, list(range(r)), logits_index)
        verify_step(runner.forward(*step)[0], reqs)  # warm-up (and FlashInfer JIT)
        _sync(device)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            to_host = verify_step(runner.forward(*step)[0], reqs).bytes_to_host  # ends with the host copy
            times.append(time.perf_counter() - t0)
        med = sorted(times)[len(times) // 2]
        launches, busy = profile_step(lambda s=step, v=reqs: verify_step(runner.forward(*s)[0], v), device, med)
        for sid in range(r):
            bm.free(sid)
        kv_bytes = r * (context + q) * kv_bytes_per_token(model, dtype)
        floor = (weight_bytes + kv_bytes) / bw
        rows.append({"requests": r, "batch_tokens": r * q, "step_ms": med * 1e3, "sps": 1 / med,
                     "floor_ms": floor * 1e3, "floor_ratio": med / floor, "bytes_to_host": to_host,
                     "launches": launches, "gpu_busy": busy})
        prof = f"  {launches} launches, GPU busy {busy:.0%}" if busy is not None else ""
        print(f"R={r:>3} B={r * q:>4}: {med * 1e3:8.2f} ms/step  {1 / med:7.1f} steps/s  floor {floor * 1e3:7.2f} ms "
              f"({med / floor:.2f}x)  {to_host} B to host{prof}", flush=True)
    rows.append({"copy_bandwidth_gb_s": bw / 1e9, "weight_gb": weight_bytes / 1e9})
    return rows


def write_sps(path: str, rows: list[dict], cmd: str, device: str, backend: str, context: int, draft: int,
              graphs: bool = False) -> None:
    from pathlib import Path

    from dspark.engine.report import replace_section

    dev = torch.cuda.get_device_name() if device.startswith("cuda") else device
    meta = rows[-1]
    # one section per setting: the defaults (context 1024, 3 drafts) keep the short name
    name = (f"sps-{backend}" + ("-graphs" if graphs else "") + (f"-ctx{context}" if context != 1024 else "")
            + (f"-k{draft}" if draft != 3 else ""))
    title = f"{backend}, CUDA graphs" if graphs else backend
    lines = [f"<!-- bench:{name} -->", f"## Verification step time vs batch tokens ({dev}, {title})", "",
             f"Command: `{cmd}`. Qwen3-8B-shaped target with random bf16 weights ({meta['weight_gb']:.1f} GB; "
             f"timing does not depend on the values); each request holds {context} tokens of KV and verifies "
             f"{draft} draft tokens + 1. Floor = (weight bytes + KV bytes read) / measured copy bandwidth "
             f"({meta['copy_bandwidth_gb_s']:.0f} GB/s, read + write). A step is the forward, the batched greedy "
             "verification on the device and the copy of its results to the host. Median of 10 steps. Launches: "
             "kernel launches the host made in one more step, under torch.profiler (a graph replay is one); GPU "
             "busy: that step's kernel and copy time over the median step time.", "",
             "| requests | batch tokens | step ms | steps/s | floor ms | step / floor | bytes to host | launches | "
             "GPU busy |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['requests']} | {r['batch_tokens']} | {r['step_ms']:.2f} | {r['sps']:.1f} | {r['floor_ms']:.2f} | "
              f"{r['floor_ratio']:.2f}x | {r['bytes_to_host']} | {_or_dash(r['launches'], '{}')} | "
              f"{_or_dash(r['gpu_busy'], '{:.0%}')} |" for r in rows[:-1]]
    lines += ["", f"<!-- /bench:{name} -->"]
    replace_section(Path(path), name, "\n".join(lines))


def _or_dash(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)
