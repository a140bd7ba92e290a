"""A request's lifecycle and token state in the engine core: the one place that owns them (token ids only; the
front end owns the text)."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from dspark.engine.messages import EngineCoreOutput
from dspark.engine.sampling import Rng, SamplingParams

if TYPE_CHECKING:
    from dspark.engine.grammar import Constraint


class SeqStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: Rng  # its random numbers (counter-based: engine.sampling.uniforms)
    seq_id: int = field(default_factory=lambda: next(_ids))
    arrival: float = field(default_factory=time.monotonic)
    status: SeqStatus = SeqStatus.WAITING
    num_computed: int = 0  # tokens whose K/V are in the cache
    finish_reason: str | None = None
    emitted_tokens: int = 0  # output tokens already handed to the front end
    first_token_time: float | None = None  # monotonic time of the first generated token (for SLOs)
    constraint: Constraint | None = None  # the grammar state of a structured-output request
    spec_rounds: int = 0  # drafting rounds verified for it
    # per draft position j: the rounds that verified a token there, and those that kept it
    spec_drafted: list[int] = field(default_factory=list)
    spec_accepted: list[int] = field(default_factory=list)

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

    def take_output(self) -> EngineCoreOutput:
        """The tokens not handed out yet (and why the request ended, once it has)."""
        spec = (self.spec_rounds, list(self.spec_drafted), list(self.spec_accepted)) if self.spec_rounds else None
        out = EngineCoreOutput(self.request_id, self.output_ids[self.emitted_tokens :],
                               self.logprobs[self.emitted_tokens :], self.finish_reason, spec=spec)
        self.emitted_tokens = self.num_output
        return out
