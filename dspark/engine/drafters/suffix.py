"""Suffix decoding (SuffixDecoding, Oliaro et al. 2024; vLLM's `suffix` method, from Arctic Inference): model-free
drafting from what followed the request's most recent tokens elsewhere, in its own prompt + output and in the
outputs of recently finished requests.

Matching: the longest suffix of the request's tokens (at most `max_depth`) that occurred before, in the request
itself and in the global store. The continuation is chosen by frequency over every occurrence of that match (the
most recent `max_hits`): at each position, the next token most of the still-agreeing occurrences continue with.
Each drafted token's probability is the share of all occurrences whose continuation agrees with the draft so far
(the empirical probability that the continuation follows the matched context); the walk stops where it falls below
`min_token_prob`. The draft is at most `spec_factor` x the match length tokens (a short match predicts little), and
its score, the sum of its tokens' probabilities, is the number of tokens it expects to be accepted: the proposal
with the higher score (request or global) wins.

These are the counts a suffix tree holds (occurrences of a context, and of each continuation); here they are
computed on demand over token arrays, by extending the match backwards from the positions that hold the last token
(NumPy, O(tokens) per request per step), so there is no structure to update per token in Python and the memory is
the tokens themselves. The global store keeps the outputs of the most recently used finished requests (an LRU, in
requests and in tokens).

A sampled request's draft is a point mass (q = 1 on the drafted token), as prompt lookup's: rejection sampling
stays exact.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

import numpy as np
import torch

from dspark.engine.drafters.block import Draft, point_mass
from dspark.engine.sampling import SamplingParams

SEP = -1  # ends each stored output: matches no token, so no match or continuation crosses from one to the next


def longest_match(tokens: np.ndarray, context: np.ndarray, end: int, max_depth: int) -> tuple[int, np.ndarray]:
    """(m, ends): the longest m <= max_depth for which the last m tokens of `context` occur in tokens[:end], and the
    positions (ascending) where those occurrences end; (0, []) when even the last token does not occur."""
    ends = np.flatnonzero(tokens[:end] == context[-1])
    m = 1 if len(ends) else 0
    while len(ends) and m < min(max_depth, len(context)):
        back = ends - m
        back = back[back >= 0]
        agree = back[tokens[back] == context[-1 - m]] + m
        if not len(agree):
            break
        ends, m = agree, m + 1
    return m, ends


def continuation(tokens: np.ndarray, ends: np.ndarray, k: int, min_prob: float) -> tuple[list[int], list[float]]:
    """Up to k tokens that most occurrences ending at `ends` continue with, and each one's probability: the share
    of all the occurrences whose continuation agrees with the draft up to it. Stops below `min_prob`; ties go to
    the most recent occurrence's token."""
    out, probs = [], []
    total, at = len(ends), ends + 1
    for _ in range(k):
        at = at[at < len(tokens)]
        nxt = tokens[at]
        at, nxt = at[nxt != SEP], nxt[nxt != SEP]
        if not len(at):
            break
        values, counts = np.unique(nxt, return_counts=True)
        tied = values[counts == counts.max()]
        tok = int(nxt[np.isin(nxt, tied)][-1])  # the most recent of the most frequent
        prob = int(counts[values == tok][0]) / total
        if prob < min_prob:
            break
        out.append(tok)
        probs.append(prob)
        at = at[nxt == tok] + 1
    return out, probs


class SuffixCache:
    """The global store: outputs of recently finished requests, bounded in requests and in tokens. An output whose
    occurrences win a proposal becomes the most recently used; the least recently used goes first."""

    def __init__(self, max_requests: int = 1000, max_tokens: int = 1 << 20):
        if max_requests < 0 or max_tokens < 0:
            raise ValueError("the suffix cache's bounds must be >= 0")
        self.max_requests, self.max_tokens = max_requests, max_tokens
        self.outputs: OrderedDict[Hashable, np.ndarray] = OrderedDict()  # least recently used first
        self.num_tokens = 0
        self._tokens: np.ndarray | None = None  # every output + SEP, concatenated (rebuilt on change)
        self._starts = np.zeros(0, dtype=np.int64)
        self._keys: list[Hashable] = []

    def __len__(self) -> int:
        return len(self.outputs)

    def add(self, key: Hashable, output_ids: list[int]) -> None:
        """Store a finished request's output (its last max_tokens tokens at most), evicting the least recently
        used outputs past the bounds."""
        self.remove(key)
        if not output_ids or not self.max_requests or not self.max_tokens:
            return
        out = np.asarray(output_ids[-self.max_tokens :], dtype=np.int64)
        self.outputs[key] = out
        self.num_tokens += len(out)
        while len(self.outputs) > self.max_requests or self.num_tokens > self.max_tokens:
            self.num_tokens -= len(self.outputs.popitem(last=False)[1])
        self._tokens = None

    def remove(self, key: Hashable) -> None:
        out = self.outputs.pop(key, None)
        if out is not None:
            self.num_tokens -= len(out)
            self._tokens = None

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._keys = list(self.outputs)
            parts = [np.append(o, SEP) for o in self.outputs.values()]
            self._tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
            self._starts = np.cumsum([0, *map(len, parts)])[:-1]
        return self._tokens

    def touch(self, positions: np.ndarray) -> None:
        """The outputs holding these positions of `tokens` were just used: most recently used now."""
        for i in np.unique(np.searchsorted(self._starts, positions, side="right") - 1):
            key = self._keys[int(i)]
            if key in self.outputs:
                self.outputs.move_to_end(key)


class SuffixProposer:
    """The drafter interface the engine calls (`propose`) over token ids, and `finish` to feed the global store."""

    model_free = True

    def __init__(self, vocab_size: int, device: str | torch.device = "cpu", max_depth: int = 24,
                 spec_factor: float = 1.0, min_token_prob: float = 0.1, max_hits: int = 256,
                 max_cached_requests: int = 1000, max_cached_tokens: int = 1 << 20):
        if max_depth < 1 or spec_factor <= 0 or not 0 <= min_token_prob <= 1 or max_hits < 1:
            raise ValueError("suffix drafting needs max_depth >= 1, spec_factor > 0, 0 <= min_token_prob <= 1, "
                             "max_hits >= 1")
        self.vocab_size, self.device = vocab_size, torch.device(device)
        self.max_depth, self.spec_factor, self.min_token_prob = max_depth, spec_factor, min_token_prob
        self.max_hits = max_hits
        self.cache = SuffixCache(max_cached_requests, max_cached_tokens)

    def finish(self, key: Hashable, output_ids: list[int]) -> None:
        self.cache.add(key, output_ids)

    def speculate(self, history: list[int], k: int) -> tuple[list[int], list[float]]:
        """The better-scoring of the request's own and the global proposal: (tokens, probabilities)."""
        ctx = np.asarray(history, dtype=np.int64)
        best: tuple[float, list[int], list[float], np.ndarray | None] = (0.0, [], [], None)
        for tokens, end in ((ctx, len(ctx) - 1), (self.cache.tokens, len(self.cache.tokens))):
            m, ends = longest_match(tokens, ctx, end, self.max_depth)
            if not m:
                continue
            ends = ends[-self.max_hits :]
            n = min(k, int(np.ceil(self.spec_factor * m)))
            toks, probs = continuation(tokens, ends, n, self.min_token_prob)
            if sum(probs) > best[0]:
                best = (sum(probs), toks, probs, ends if tokens is not ctx else None)
        if best[3] is not None:
            self.cache.touch(best[3])
        return best[1], best[2]

    def propose(self, histories: list[list[int]], ks: list[int], params: list[SamplingParams],
                min_score: float | list[float] = 0.0) -> list[Draft]:
        """A draft of up to ks[b] tokens for each request from its token ids so far; empty where its score (the
        tokens it expects accepted) is below min_score (one for all, or per request). Each token's confidence is its
        probability given the tokens drafted before it (what the draft policy multiplies into survival)."""
        scores = min_score if isinstance(min_score, list) else [min_score] * len(histories)
        drafts = []
        for tokens, k, p, need in zip(histories, ks, params, scores):
            found, probs = self.speculate(tokens, k) if k else ([], [])
            if not found or sum(probs) < need:
                found, probs = [], []
            q = point_mass(found, self.vocab_size, self.device) if found and not p.greedy else None
            conf = [b / a for a, b in zip([1.0, *probs], probs)]
            drafts.append(Draft(found, q, conf, "suffix"))
        return drafts
