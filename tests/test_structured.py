"""Structured outputs (response_format): every output of a JSON-schema request parses and validates, greedy and
sampled, with and without speculation; greedy output is identical with speculation; schemas that cannot be used
are 400s."""

import json

import httpx
import jsonschema
import pytest
from openai import OpenAI

from dspark.engine.grammar import GrammarError
from dspark.engine.llm_engine import LLMEngine
from dspark.engine.sampling import SamplingParams
from dspark.engine.settings import Settings

S = {"type": "string", "maxLength": 6}
# Bounded everywhere (strings, arrays, numbers; no additional properties, as OpenAI's strict mode requires), so a
# tiny model's output always completes within max_tokens and every output can be checked.
SCHEMAS = [
    {"type": "object", "properties": {"name": S}, "required": ["name"], "additionalProperties": False},
    {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["age"],
     "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
     "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1, "maxItems": 3},
    {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 4},
    {"type": "object", "properties": {"x": {"type": "number", "enum": [0.5, -2.25, 3]}}, "required": ["x"],
     "additionalProperties": False},  # (a free number can take unboundedly many digits)
    {"type": "object", "properties": {"p": {"type": "object", "properties": {"q": S}, "required": ["q"],
                                            "additionalProperties": False}}, "required": ["p"],
     "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": S, "maxItems": 2}}, "required": ["tags"],
     "additionalProperties": False},
    {"type": "object", "properties": {"a": S, "b": {"type": "integer", "minimum": 1, "maximum": 9}},
     "required": ["a", "b"], "additionalProperties": False},
    {"enum": ["yes", "no"]},
    {"type": "boolean"},
    {"type": "integer", "minimum": 10, "maximum": 99},
    {"type": "string", "pattern": "^[a-c]{2,4}$"},
    {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[0-9]{3}$"}}, "required": ["id"],
     "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"const": "point"}, "xy": {"type": "array", "items": {
        "type": "integer", "minimum": 0, "maximum": 99}, "minItems": 2, "maxItems": 2}}, "required": ["kind", "xy"],
     "additionalProperties": False},
    {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"enum": ["none"]}]},
    {"type": "object", "properties": {"n": {"type": ["integer", "null"], "minimum": 0, "maximum": 9}},
     "required": ["n"], "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"k": S, "v": {"type": "boolean"}}, "required": ["k", "v"],
        "additionalProperties": False}}}, "required": ["items"], "additionalProperties": False},
    {"type": "object", "properties": {"level": {"enum": [1, 2, 3]}, "note": S}, "required": ["level"],
     "additionalProperties": False},
    {"$defs": {"leaf": {"type": "object", "properties": {"v": {"type": "integer", "minimum": 0, "maximum": 9}},
                        "required": ["v"], "additionalProperties": False}},
     "type": "object", "properties": {"left": {"$ref": "#/$defs/leaf"}, "right": {"$ref": "#/$defs/leaf"}},
     "required": ["left", "right"], "additionalProperties": False},
]
PROMPTS = ["def main():\n    ", "Return JSON: ", "data = "]


@pytest.fixture(scope="module")
def engines():
    return (LLMEngine(Settings(speculative="none")),
            LLMEngine(Settings(speculative="dspark", draft_policy="fixed", draft_len=3)))


def run(eng, schema, temperature):
    grammar = eng.grammars.grammar({"type": "json_schema", "json_schema": {"schema": schema}})
    ps = [eng.tokenizer.encode(p) for p in PROMPTS]
    params = [SamplingParams(temperature=temperature, seed=i, max_tokens=160, grammar=grammar)
              for i in range(len(ps))]
    return eng.generate(ps, params)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_output_parses_and_validates(engines, temperature):
    plain, spec = engines
    for schema in SCHEMAS:
        outs = {}
        for name, eng in (("plain", plain), ("spec", spec)):
            seqs = run(eng, schema, temperature)
            for s in seqs:
                text = eng.tokenizer.decode(s.output_ids)
                assert s.finish_reason == "stop", (schema, text)
                jsonschema.validate(json.loads(text), schema)
            outs[name] = [s.output_ids for s in seqs]
        if temperature == 0:
            assert outs["plain"] == outs["spec"], schema
    assert spec.stats["accepted_tokens"] > 0  # speculation ran, and drafts were accepted under the grammar


def test_json_mode_and_unusable_schemas(engines):
    plain, _ = engines
    g = plain.grammars.grammar({"type": "json_object"})  # unbounded: a tiny model may not close its strings
    seqs = plain.generate([plain.tokenizer.encode("x = ")] * 8,
                          [SamplingParams(temperature=1.0, seed=i, max_tokens=64, grammar=g) for i in range(8)])
    text = {s: plain.tokenizer.decode(s.output_ids) for s in seqs}
    done = [s for s in seqs if s.finish_reason == "stop"]
    assert done and all(isinstance(json.loads(text[s]), dict) for s in done)
    assert all(text[s].startswith("{") for s in seqs)
    for bad in [{"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}},
                {"type": "json_schema", "json_schema": {"schema": {"$ref": "#/nowhere"}}},
                {"type": "json_schema", "json_schema": {"schema": {"enum": ["x" * 70_000]}}},
                {"type": "yaml"}]:
        with pytest.raises(GrammarError):
            plain.grammars.grammar(bad)


def test_response_format_over_http(server):
    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    schema = SCHEMAS[9]
    r = client.chat.completions.create(
        model=server.name, messages=[{"role": "user", "content": "Give me a record."}], max_tokens=160,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "rec", "schema": schema,
                                                                               "strict": True}})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    for rf in [{"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
               {"type": "json_schema"}, {"type": "xml"}]:
        resp = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
            "model": server.name, "messages": [{"role": "user", "content": "x"}], "response_format": rf})
        assert resp.status_code == 400 and resp.json()["error"]["param"].startswith("response_format"), resp.text
