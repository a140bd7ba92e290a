"""Grammar engines for structured outputs, measured on this CPU with the default model's tokenizer: compile time
and the per-token cost of the allowed-token mask, following a valid instance of a JSON schema token by token.

Run: python -m dspark.loadtest.grammar_bench (needs `pip install llguidance outlines-core`; xgrammar is left out here:
its wheel requires triton, a GPU compiler of several hundred MB, which a CPU install should not pull).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dspark.engine.report import replace_section

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}},
    "address": {"type": "object", "properties": {"city": {"type": "string"},
                                                 "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city"]},
    "score": {"type": "number"}}, "required": ["name", "age", "tags", "address"], "additionalProperties": False}
INSTANCE = {"name": "Ada Lovelace", "age": 36, "tags": ["a", "c"], "address": {"city": "London", "zip": "12345"},
            "score": 9.5}


def stats(times: list[float]) -> dict:
    return {"mean_us": statistics.mean(times) * 1e6, "p50_us": statistics.median(times) * 1e6,
            "max_us": max(times) * 1e6, "tokens": len(times)}


def bench_llguidance(tok, ids: list[int]) -> dict:
    import llguidance

    path = Path(tempfile.mkdtemp()) / "tokenizer.json"
    path.write_text(tok.tok.to_str())
    lltok = llguidance.LLTokenizer(str(path), n_vocab=tok.vocab_size, eos_token=tok.eos_ids)
    t0 = time.perf_counter()
    matcher = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(
        SCHEMA, defaults={"whitespace_flexible": False}))
    compile_s = time.perf_counter() - t0
    times = []
    for t in ids:
        t0 = time.perf_counter()
        mask = matcher.compute_bitmask()
        times.append(time.perf_counter() - t0)
        assert (mask[t // 8] >> (t % 8)) & 1 and matcher.consume_token(t), matcher.get_error()
    assert matcher.is_accepting()
    return {"engine": f"llguidance {llguidance.__version__ if hasattr(llguidance, '__version__') else '1.9'}",
            "compile_ms": compile_s * 1e3, **stats(times)}


def byte_level_vocabulary(tok) -> dict[bytes, list[int]]:
    """Token bytes for a byte-level BPE vocabulary (GPT-2's byte-to-unicode map undone), specials left out."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, extra = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    dec = {chr(c): b for b, c in zip(bs, cs)}
    out: dict[bytes, list[int]] = {}
    for i in range(tok.vocab_size):
        s = tok.tok.id_to_token(i)
        if i not in tok.special_ids and s and all(c in dec for c in s):
            out.setdefault(bytes(dec[c] for c in s), []).append(i)
    return out


def bench_outlines(tok, ids: list[int]) -> dict:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    vocab = byte_level_vocabulary(tok)
    t0 = time.perf_counter()
    guide = Guide(Index(build_regex_from_schema(json.dumps(SCHEMA)), Vocabulary(tok.eos_ids[0], vocab)))
    compile_s = time.perf_counter() - t0
    mask = torch.zeros((tok.vocab_size + 31) // 32, dtype=torch.int32)
    times = []
    for t in ids:
        t0 = time.perf_counter()
        guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
        times.append(time.perf_counter() - t0)
        assert (int(mask[t // 32]) >> (t % 32)) & 1
        guide.advance(t)
    return {"engine": "outlines-core 0.2", "compile_ms": compile_s * 1e3, **stats(times)}


def main() -> None:
    from dspark.engine.settings import DEFAULT_MODEL, resolve_model
    from dspark.engine.tokenizer import Tokenizer

    tok = Tokenizer(resolve_model(DEFAULT_MODEL))
    ids = tok.encode(json.dumps(INSTANCE, separators=(",", ":")))
    rows = [bench_llguidance(tok, ids), bench_outlines(tok, ids)]
    for r in rows:
        print(r)
    lines = ["<!-- bench:grammar-engines -->", "## Grammar engines: mask cost per token (CPU)", "",
             f"Command: `python -m dspark.loadtest.grammar_bench` ({torch.get_num_threads()} torch threads; the "
             "engines are "
             f"single-threaded). A nested JSON schema (object, enum array, pattern, integer, number; "
             f"{len(ids)} tokens of a valid instance) with the default model's tokenizer ({tok.vocab_size} tokens): "
             "the time to compile the schema, then the allowed-token mask computed before each token.", "",
             "| engine | compile, ms | mask mean, us | p50, us | max, us |", "|---|---|---|---|---|"]
    lines += [f"| {r['engine']} | {r['compile_ms']:.1f} | {r['mean_us']:.0f} | {r['p50_us']:.0f} | {r['max_us']:.0f} |"
              for r in rows]
    lines += ["", "<!-- /bench:grammar-engines -->"]
    replace_section(Path("docs/benchmarks.md"), "grammar-engines", "\n".join(lines))


if __name__ == "__main__":
    main()
