"""Structured outputs on the default model, in-process at batch 1: per-user tokens/s with and without a JSON
schema, with and without speculation (the shipped dspark drafter, the default adaptive policy), and the share of
outputs that parse and validate.

Run: python -m dspark.loadtest.structured_bench [--prompts 6 --max-tokens 96]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jsonschema
import torch

from dspark.engine.llm_engine import LLMEngine
from dspark.engine.report import replace_section
from dspark.engine.sampling import SamplingParams
from dspark.engine.settings import Settings

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "city": {"type": "string", "maxLength": 40}, "hobbies": {"type": "array", "maxItems": 3,
                                                             "items": {"type": "string", "maxLength": 30}}},
    "required": ["name", "age", "city", "hobbies"], "additionalProperties": False}
ASKS = ["a software engineer from Berlin", "a retired teacher who loves gardening", "a young chess champion",
        "a chef in Tokyo", "a marine biologist", "a jazz musician from New Orleans", "a nurse who runs marathons",
        "a farmer in Kenya"]


def run(method: str, schema: bool, prompts: int, max_tokens: int) -> dict:
    eng = LLMEngine(Settings(speculative=method))
    grammar = eng.grammars.grammar({"type": "json_schema", "json_schema": {"schema": SCHEMA}}) if schema else None
    asks = [eng.tokenizer.encode_chat([{"role": "user", "content": f"Describe {a} as a JSON object with name, age, "
                                        "city and hobbies."}]) for a in ASKS[:prompts]]
    eng.generate([asks[0]], SamplingParams(temperature=0, max_tokens=4))  # warm-up
    tokens, secs, valid = 0, 0.0, 0
    rounds0, acc0 = eng.stats["draft_rounds"], eng.stats["accepted_tokens"]
    for ids in asks:
        t0 = time.perf_counter()
        s = eng.generate([ids], SamplingParams(temperature=0, max_tokens=max_tokens, grammar=grammar))[0]
        secs += time.perf_counter() - t0
        tokens += s.num_output
        try:
            jsonschema.validate(json.loads(s.text), SCHEMA)
            valid += 1
        except (json.JSONDecodeError, jsonschema.ValidationError):
            pass
    rounds = eng.stats["draft_rounds"] - rounds0
    tau = (eng.stats["accepted_tokens"] - acc0 + rounds) / rounds if rounds else None
    return {"method": method, "schema": schema, "tps": tokens / secs, "valid": valid, "n": len(asks), "tau": tau}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--write", default="docs/benchmarks.md")
    args = p.parse_args(argv)
    rows = [run(m, sc, args.prompts, args.max_tokens) for m in ("none", "dspark") for sc in (False, True)]
    for r in rows:
        print(r)
    base = {r["schema"]: r["tps"] for r in rows if r["method"] == "none"}
    lines = ["<!-- bench:structured -->", "## Structured outputs: tokens/s with a JSON schema (CPU, batch 1)", "",
             f"Command: `python -m dspark.loadtest.structured_bench --prompts {args.prompts} --max-tokens "
             f"{args.max_tokens}` ({torch.get_num_threads()} torch threads, the default model and dtype). "
             f"{args.prompts} chat requests asking for a person as JSON, greedy, one at a time; with a schema "
             "(object of 4 bounded fields) through `response_format` json_schema, or free text. Valid: outputs "
             "that parse and validate against the schema.", "",
             "| speculation | schema | tok/s per user | vs no speculation | tau | valid |", "|---|---|---|---|---|---|"]
    for r in rows:
        tau = f"{r['tau']:.2f}" if r["tau"] else "-"
        lines.append(f"| {r['method']} | {'yes' if r['schema'] else 'no'} | {r['tps']:.1f} | "
                     f"{r['tps'] / base[r['schema']]:.2f}x | {tau} | {r['valid']}/{r['n']} |")
    lines += ["", "<!-- /bench:structured -->"]
    replace_section(Path(args.write), "structured", "\n".join(lines))


if __name__ == "__main__":
    main()
