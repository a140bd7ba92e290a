"""The engine core's boundary: token ids in, token ids out, and what the front end needs to export metrics.

These msgspec structs are the wire format between the API front end and the engine core process (msgpack over
ZMQ, as vLLM's engine core does), and the objects the in-process transport hands over as they are. Nothing here
is text: the front end owns the tokenizer, stop strings, detokenization and the protocol.
"""

from __future__ import annotations

import msgspec

from dspark.engine.sampling import SamplingParams


class EngineCoreRequest(msgspec.Struct, tag="add", array_like=True):
    """A validated request: the core trusts it (one place validates: the front end)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams  # its `grammar` is llguidance's, compiled and checked by the front end
    client: int = 0  # the API server that sent it (--api-server-count): its outputs go back there only


class Abort(msgspec.Struct, tag="abort", array_like=True):
    request_ids: list[str]


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True):
    pass


CoreInput = EngineCoreRequest | Abort | Shutdown


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    """One request's delta from one step: its new token ids (and their logprobs when asked), and why it ended."""

    request_id: str
    token_ids: list[int]
    # (token id, logprob, [(id, logprob) of the top alternatives]) per new token, when the request asked
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = []
    finish_reason: str | None = None  # stop | length | deadline | abort | error
    error: str | None = None  # why the core refused or failed it (finish_reason "error")
    # so far: (drafting rounds, [rounds that verified a draft token at position j], [rounds that kept it])
    spec: tuple[int, list[int], list[int]] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class StepStats(msgspec.Struct, array_like=True, omit_defaults=True):
    """What one step did, for the front end's Prometheus metrics (the core exports nothing itself)."""

    step_s: float = 0.0
    step_tokens: int = 0
    bytes_to_host: int = 0
    scheduler_s: float = 0.0
    preempted: int = 0
    prefix_queries: int = 0  # prefix-cache lookups (tokens) since the last step
    prefix_hits: int = 0
    prefix_evictions: int = 0  # cached blocks evicted for room since the last step
    rounds: list[tuple[int, int, str]] = []  # (verified, accepted, proposer) per drafting round
    finished_rates: list[tuple[float, float]] = []  # (delivered tokens/s, SLO target) per finished request
    sps: dict[int, float] = {}  # the cost model's steps/s per batch-token bucket (every 50 steps)
    # (band, drafting: false | greedy | sampled, tokens/s) of the draft policy's realized-rate guard
    guard: list[tuple[str, str, float]] = []


class Gauges(msgspec.Struct, array_like=True):
    running: int  # with several API servers: the receiving API server's own requests (they sum to the core's)
    waiting: int
    kv_usage: float
    kv_free: int
    prefix_blocks: int


class EngineCoreOutputs(msgspec.Struct, tag="outputs", array_like=True, omit_defaults=True):
    """Everything one step (or one pass over the inbox) produced, sent as one message."""

    outputs: list[EngineCoreOutput]
    gauges: Gauges
    stats: StepStats | None = None  # None when no step ran (only refusals, aborts or expired deadlines)


class CoreReady(msgspec.Struct, tag="ready", array_like=True):
    """The core loaded its model: what the front end must know to validate requests and report."""

    max_model_len: int
    vocab_size: int
    num_kv_blocks: int
    model_name: str  # the served name (the vllm: metrics' model_name label)
    block_size: int  # tokens per KV block (GIE's optional BlockSize)
    prefix_caching: bool


class CoreFailed(msgspec.Struct, tag="failed", array_like=True):
    """The core could not start (a bad model path, a setting it refuses): the server exits with this message."""

    message: str


CoreMessage = EngineCoreOutputs | CoreReady | CoreFailed
