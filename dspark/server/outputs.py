"""The front end's side of a request's output: the core's token ids become text.

Incremental detokenization (correct on a character whose UTF-8 bytes span tokens), stop strings (held back while
one could still match, cut where it does), and the RequestOutput deltas the protocol layer streams. The core ends
a request on EOS, stop token ids, max_tokens and deadlines; a stop string is found here, and the front end then
aborts the request in the core.
"""

from __future__ import annotations

from dataclasses import dataclass

from dspark.engine.messages import EngineCoreOutput
from dspark.engine.sampling import SamplingParams
from dspark.engine.tokenizer import IncrementalDetokenizer, Tokenizer


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
    spec: tuple[int, list[int], list[int]] | None = None  # so far: rounds, verified and kept per draft position

    def merge(self, later: RequestOutput) -> None:
        """Append a later delta of the same request (for a consumer that fell behind: one chunk, not several)."""
        self.token_ids += later.token_ids
        self.text += later.text
        self.logprobs += later.logprobs
        self.finished, self.finish_reason = later.finished, later.finish_reason
        self.completion_tokens, self.spec = later.completion_tokens, later.spec


class RequestState:
    """One request's text as it grows: detokenizer, stop strings, what has been streamed."""

    def __init__(self, tokenizer: Tokenizer, request_id: str, prompt_ids: list[int], params: SamplingParams):
        self.request_id = request_id
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids, params.skip_special_tokens)
        self.stop = params.stop
        self.holdback = max((len(x) for x in params.stop), default=1) - 1
        self.num_prompt = len(prompt_ids)
        self.num_output = 0
        self.text = ""
        self.emitted = 0  # chars of `text` already streamed
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def process(self, out: EngineCoreOutput) -> RequestOutput:
        """Apply one core delta. A stop string ends the request here (finish_reason "stop"; the tokens after it
        are dropped): `stopped_here` then says the core must be told to abort it."""
        ids, lps = [], []
        last = len(out.token_ids) - 1
        for i, tok in enumerate(out.token_ids):
            ids.append(tok)
            if out.logprobs:
                lps.append(out.logprobs[i])
            self.num_output += 1
            if i == last and out.finish_reason == "stop":
                break  # an EOS or stop token id: it ends the text, it is not part of it
            before = len(self.text)
            self.text += self.detok.add(tok)
            if self.stop and len(self.text) > before and self._cut_at_stop(before):
                self.finish_reason = "stop"
                break
        if out.finish_reason is not None and self.finish_reason is None:
            self.text += self.detok.flush()
            self.finish_reason = out.finish_reason
        end = len(self.text) if self.finished else max(self.emitted, len(self.text) - self.holdback)
        delta = RequestOutput(self.request_id, ids, self.text[self.emitted : end], lps, self.finished,
                              self.finish_reason, self.num_prompt, self.num_output, out.spec)
        self.emitted = end
        return delta

    def _cut_at_stop(self, before: int) -> bool:
        start = max(0, before - max(len(x) for x in self.stop) + 1)
        hits = [i for i in (self.text.find(x, start) for x in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
        return bool(hits)
