"""Tool calls: the parser (streamed in any pieces = parsed whole), the prompt rendering, `required` / named choices
enforced by the grammar (every call valid against its function's parameters, greedy identical with speculation),
and the official openai client's tool-calling loop over HTTP, streamed and not."""

import json

import httpx
import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai import OpenAI

from dspark.engine.llm_engine import LLMEngine
from dspark.engine.sampling import SamplingParams
from dspark.engine.settings import Settings
from dspark.server.protocol import ChatCompletionRequest
from dspark.server.tools import ToolCallParser, chat_messages, parse_tool_calls, tool_choice, tool_grammar

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {  # $defs and a $ref: hoisted to the root of the combined schema
    "name": "add", "parameters": {"$defs": {"digit": {"type": "integer", "minimum": 0, "maximum": 9}},
                                  "type": "object", "properties": {"a": {"$ref": "#/$defs/digit"},
                                                                   "b": {"$ref": "#/$defs/digit"}},
                                  "required": ["a", "b"], "additionalProperties": False}}}
NOARGS = {"type": "function", "function": {"name": "now"}}  # no parameters: takes none
TOOLS = [WEATHER, ADD, NOARGS]
SCHEMAS = {t["function"]["name"]: t["function"].get("parameters", {"type": "object", "additionalProperties": False})
           for t in TOOLS}

TEXTS = [
    "Plain answer, no calls.\n",
    'Let me check.\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "x": {"y": "}"}}}\n'
    '</tool_call>\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>',
    '<tool_call>\n{"arguments": {"a": 1}, "name": "add"}\n</tool_call>',  # arguments first: parsed whole
    "<tool_call>\nnot json\n</tool_call> after",  # not a call: stays text
    '<tool_call>\n{"name": "h", "arguments": "{\\"a\\": 1}"}\n</tool_call>',  # arguments as a string
    "a < b <tool_ca",  # a tag's prefix at the end is text after all
    '<tool_call>\n{"name": "k", "arguments": {"a": 1</tool_call>tail',  # a call cut short by its closing tag
    '<tool_call>\n{"name": "now", "parameters": {}}\n</tool_call>',  # Llama 3.1's key for the arguments
]


def fold(text: str, cuts: list[int]) -> tuple[str, list[dict]]:
    """Stream `text` cut at `cuts` through a parser and fold its deltas the way a client does."""
    parser, content, calls = ToolCallParser(), "", {}
    bounds = [0, *sorted(set(cuts)), len(text)]
    for a, b in zip(bounds, bounds[1:]):
        c, deltas = parser.feed(text[a:b])
        content += c
        assert len({d["index"] for d in deltas}) == len(deltas)  # one delta per call per chunk
        for d in deltas:
            call = calls.setdefault(d["index"], {"name": "", "arguments": ""})
            call["name"] += d["function"].get("name") or ""
            call["arguments"] += d["function"]["arguments"]
    content += parser.finish()[0]
    return content, [calls[k] for k in sorted(calls)]


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(TEXTS), st.lists(st.integers(0, 120), max_size=12))
def test_streamed_in_any_pieces_equals_parsed_whole(text, cuts):
    content, calls = parse_tool_calls(text)
    streamed, streamed_calls = fold(text, [c for c in cuts if c < len(text)])
    assert streamed_calls == [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                              for c in calls]
    assert (streamed or None if calls else streamed) == content


def test_parsed_calls():
    assert parse_tool_calls(TEXTS[0]) == (TEXTS[0], [])
    content, calls = parse_tool_calls(TEXTS[1])
    assert content == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris", "x": {"y": "}"}}), ("now", {})]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in parse_tool_calls(TEXTS[2])[1]] == [
        ("add", '{"a": 1}')]
    assert parse_tool_calls(TEXTS[3]) == (TEXTS[3], [])
    assert parse_tool_calls(TEXTS[4])[1][0]["function"]["arguments"] == '{"a": 1}'
    assert parse_tool_calls(TEXTS[5]) == (TEXTS[5], [])
    assert parse_tool_calls(TEXTS[6])[0] == "tail"
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in parse_tool_calls(TEXTS[7])[1]] == [
        ("now", "{}")]


def request(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [
        {"role": "user", "content": "Weather in Paris?"}], **kw})


def test_history_rendered_for_a_template_without_tools():
    req = request(tools=TOOLS, messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "18C"},
        {"role": "tool", "tool_call_id": "c2", "content": "25C"}])
    msgs, extra = chat_messages(req, native=False)
    assert extra == {}
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[0]["content"].startswith("Be brief.\n\n") and '"name": "add"' in msgs[0]["content"]
    assert msgs[2]["content"] == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
                                  '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>')
    assert msgs[3]["content"] == "<tool_response>\n18C\n</tool_response>\n<tool_response>\n25C\n</tool_response>"
    # a template that knows tools gets them, and the calls with parsed arguments, as HF templates expect
    msgs, extra = chat_messages(req, native=True)
    assert [t["function"]["name"] for t in extra["tools"]] == ["get_weather", "add", "now"]
    assert msgs[2]["tool_calls"][1]["function"]["arguments"] == {"city": "Rome"}
    assert msgs[3] == {"role": "tool", "content": "18C", "tool_call_id": "c1"}
    # no tools: the messages are as they were
    assert chat_messages(request(), native=False) == ([{"role": "user", "content": "Weather in Paris?"}], {})


@pytest.fixture(scope="module")
def engines():
    return (LLMEngine(Settings(speculative="none")),
            LLMEngine(Settings(speculative="dspark", draft_policy="fixed", draft_len=3)))


CHOICES = [("required", True), ("required", False), ({"type": "function", "function": {"name": "add"}}, True)]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("choice,parallel", CHOICES)
def test_forced_calls_are_valid_calls(engines, choice, parallel, temperature):
    """The grammar forces well-formed calls to the offered functions with valid arguments; speculation under it
    stays lossless (identical greedy output) and still accepts drafts."""
    req = request(tools=TOOLS, tool_choice=choice, parallel_tool_calls=parallel)
    msgs, extra = chat_messages(req, native=False)
    outs = {}
    for name, eng in zip(("plain", "spec"), engines):
        grammar = eng.grammars.lark(tool_grammar(req, tool_choice(req)))
        prompt = eng.tokenizer.encode_chat(msgs, **extra)
        seqs = eng.generate([prompt] * 4, [SamplingParams(temperature=temperature, seed=i, max_tokens=200,
                                                          grammar=grammar) for i in range(4)])
        for s in seqs:
            text = full = eng.tokenizer.decode(s.output_ids)
            if s.finish_reason == "length":  # parallel calls are unbounded: a 5M model may repeat them
                assert parallel and not isinstance(choice, dict), text
                text = text[: text.rfind("</tool_call>") + len("</tool_call>")]  # the last one is cut off
            content, calls = parse_tool_calls(text)
            assert content is None and calls, full
            if not parallel or isinstance(choice, dict):
                assert len(calls) == 1 and s.finish_reason == "stop", full
            for c in calls:
                name_ = c["function"]["name"]
                if isinstance(choice, dict):
                    assert name_ == "add"
                jsonschema.validate(json.loads(c["function"]["arguments"]), SCHEMAS[name_])
        outs[name] = [s.output_ids for s in seqs]
    if temperature == 0:
        assert outs["plain"] == outs["spec"]
    assert engines[1].stats["accepted_tokens"] > 0


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_openai_client_tool_loop(server, client):
    """The loop an agent runs: the model calls (forced here: a 5M model would not choose to), the caller answers
    with tool messages, the model continues; streamed calls equal non-streamed ones."""
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    kw = dict(model=server.name, tools=TOOLS, temperature=0, max_tokens=120)
    kw["parallel_tool_calls"] = False  # one call: a 5M model repeats parallel ones until max_tokens
    r = client.chat.completions.create(messages=msgs, tool_choice="required", **kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert calls and all(c.type == "function" and c.id.startswith("call_") for c in calls)
    for c in calls:
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])

    stream = client.chat.completions.create(messages=msgs, tool_choice="required", stream=True, **kw)
    folded, reasons = {}, []
    for chunk in stream:
        delta = chunk.choices[0].delta
        reasons.append(chunk.choices[0].finish_reason)
        for d in delta.tool_calls or []:
            f = folded.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            f["id"] = f["id"] or d.id
            f["name"] += d.function.name or ""
            f["arguments"] += d.function.arguments or ""
    assert [(f["name"], f["arguments"]) for f in folded.values()] == [
        (c.function.name, c.function.arguments) for c in calls]
    assert all(f["id"].startswith("call_") for f in folded.values()) and reasons[-1] == "tool_calls"

    msgs.append(choice.message.model_dump(exclude_none=True))
    msgs += [{"role": "tool", "tool_call_id": c.id, "content": json.dumps({"ok": True})} for c in calls]
    r2 = client.chat.completions.create(messages=msgs, tool_choice="none", **kw)
    assert r2.choices[0].message.content and not r2.choices[0].message.tool_calls
    named = client.chat.completions.create(messages=msgs[:1], tool_choice={"type": "function", "function": {
        "name": "add"}}, **kw)
    assert named.choices[0].finish_reason == "stop"  # as OpenAI: a forced named call ends with 'stop'
    assert [c.function.name for c in named.choices[0].message.tool_calls] == ["add"]


def test_auto_without_a_call_is_plain_content(server, client):
    """With tools offered and no call made, the answer is the model's text, as without the parser."""
    msgs = [{"role": "user", "content": "Say hello."}]
    kw = dict(model=server.name, temperature=0, max_tokens=24)
    plain = client.chat.completions.create(messages=msgs, tools=TOOLS, tool_choice="none", **kw)
    auto = client.chat.completions.create(messages=msgs, tools=TOOLS, **kw)
    if not auto.choices[0].message.tool_calls:
        assert auto.choices[0].message.content == plain.choices[0].message.content


BAD = [
    ({"tool_choice": "required"}, "tool_choice"),  # no tools
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"messages": [{"role": "tool", "content": "18C"}]}, "messages.0"),  # no tool_call_id
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages.0"),
]


@pytest.mark.parametrize("body,param", BAD)
def test_unusable_tools_are_400s(server, body, param):
    resp = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
        "model": server.name, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, **body})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param, resp.text
