"""A request's lifecycle and token state: the one place that owns them."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

import torch

from dspark.engine.sampling import SamplingParams
from dspark.engine.tokenizer import IncrementalDetokenizer

if TYPE_CHECKING:
    from dspark.engine.grammar import Constraint


class SeqStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass
class RequestOutput:
    """What one engine step produced for one request: the delta to stream."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list  # (token_id, lp, [(id, lp)]) per new token, when asked
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    detok: IncrementalDetokenizer
    seq_id: int = field(default_factory=lambda: next(_ids))
    arrival: float = field(default_factory=time.monotonic)
    status: SeqStatus = SeqStatus.WAITING
    num_computed: int = 0  # tokens whose K/V are in the cache
    finish_reason: str | None = None
    text: str = ""
    emitted_text: int = 0  # chars of `text` already streamed
    emitted_tokens: int = 0
    first_token_time: float | None = None  # monotonic time of the first generated token (for SLOs)
    constraint: Constraint | None = None  # the grammar state of a structured-output request

    def __post_init__(self):
        self.token_ids = list(self.prompt_ids)
        self.logprobs: list = []

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt :]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def take_output(self, holdback: int) -> RequestOutput:
        """The not-yet-streamed part; keeps `holdback` chars back while a stop string could still match."""
        end = len(self.text) if self.finished else max(self.emitted_text, len(self.text) - holdback)
        out = RequestOutput(
            request_id=self.request_id,
            token_ids=self.output_ids[self.emitted_tokens :],
            text=self.text[self.emitted_text : end],
            logprobs=self.logprobs[self.emitted_tokens :],
            finished=self.finished,
            finish_reason=self.finish_reason,
            prompt_tokens=self.num_prompt,
            completion_tokens=self.num_output,
        )
        self.emitted_text, self.emitted_tokens = end, self.num_output
        return out
