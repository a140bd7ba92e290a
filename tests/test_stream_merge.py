"""A stream that falls behind the core takes the queued deltas as one (vLLM's output collector does the same), and
vLLM's `continuous_usage_stats` tells a client how many tokens each chunk carries."""

import asyncio
import json

import pytest

from dspark.engine.messages import CoreReady, EngineCoreOutput, EngineCoreOutputs, Gauges
from dspark.engine.sampling import SamplingParams
from dspark.engine.tokenizer import Tokenizer
from dspark.server.async_llm import AsyncLLM, EngineDeadError


class HeldCore:
    """A core client that sends nothing by itself: the test hands the front end its outputs."""

    info = CoreReady(max_model_len=256, vocab_size=0, num_kv_blocks=8,
                     model_name="held", block_size=16, prefix_caching=False)
    alive = True

    def __init__(self):
        self.sent = []

    def start(self, on_outputs, on_dead):
        self.on_outputs, self.on_dead = on_outputs, on_dead

    def send(self, msg):
        self.sent.append(msg)


def step(rid: str, tokens: list[int], reason: str | None = None) -> EngineCoreOutputs:
    return EngineCoreOutputs([EngineCoreOutput(rid, tokens, finish_reason=reason)], Gauges(1, 0, 0.0, 8, 0))


@pytest.fixture
def front(model_dir):
    tok = Tokenizer(str(model_dir))
    core = HeldCore()
    llm = AsyncLLM(core, tok)
    llm.start()
    return llm, core, tok


def test_deltas_queued_behind_a_slow_consumer_arrive_as_one(front):
    llm, core, tok = front
    ids = tok.encode("The quick brown fox jumps over the lazy dog")
    assert len(ids) >= 6

    async def run():
        gen = llm.generate("r", [1, 2, 3], SamplingParams(max_tokens=len(ids)))
        first = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0)  # the request is registered and waits for its first delta
        core.on_outputs(step("r", ids[:1]))
        one = await first
        for t in ids[1:-1]:  # four steps' deltas while the consumer is away
            core.on_outputs(step("r", [t]))
        core.on_outputs(step("r", ids[-1:], "length"))
        rest = [out async for out in gen]
        return one, rest

    one, rest = asyncio.run(run())
    assert one.token_ids == ids[:1] and not one.finished
    assert len(rest) == 1, "the queued deltas must come as one"
    merged = rest[0]
    assert merged.token_ids == ids[1:]
    assert one.text + merged.text == tok.decode(ids)
    assert merged.finished and merged.finish_reason == "length" and merged.completion_tokens == len(ids)


def test_an_error_behind_queued_deltas_comes_after_them(front):
    llm, core, tok = front
    ids = tok.encode("hello world, again and again")

    async def run():
        gen = llm.generate("r", [1, 2, 3], SamplingParams(max_tokens=64))
        first = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0)
        for t in ids:
            core.on_outputs(step("r", [t]))
        core.on_dead("injected")
        got = [await first]
        with pytest.raises(EngineDeadError):
            async for out in gen:
                got.append(out)
        return got

    got = asyncio.run(run())
    assert [t for out in got for t in out.token_ids] == ids, "no delta is lost to the error behind it"


def test_continuous_usage_counts_every_chunks_tokens(server):
    import httpx

    body = {"model": server.name, "prompt": "Once upon a time", "max_tokens": 12, "ignore_eos": True,
            "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    usages = [c["usage"] for c in chunks]
    assert all(u is not None for u in usages), "every chunk carries the usage so far"
    counts = [u["completion_tokens"] for u in usages]
    assert counts == sorted(counts) and counts[-1] == 12
    assert all(u["prompt_tokens"] == usages[0]["prompt_tokens"] > 0 for u in usages)
    body["stream_options"] = {"include_usage": True}  # OpenAI's: null until the last chunk
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-1]["usage"]["completion_tokens"] == 12
