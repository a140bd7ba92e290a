"""Prompt lookup (n-gram) drafting: model-free, as vLLM's `ngram` method and llama.cpp's lookup decoding.

A request whose last n tokens (n from `max_n` down to `min_n`) occurred earlier in its prompt or output proposes
the tokens that followed their most recent earlier occurrence. It costs a search over the request's tokens and no
forward: it pays where the answer copies its context (code edits, quoted tool output, retrieved passages).

A sampled request's draft is a point mass (q = 1 on the drafted token): rejection sampling accepts it with
probability p(x) and resamples a rejection from p without x, so acceptance stays exact.
"""

from __future__ import annotations

import numpy as np
import torch

from dspark.engine.drafters.block import Draft, point_mass
from dspark.engine.sampling import SamplingParams


def lookup(tokens: np.ndarray, k: int, min_n: int, max_n: int) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the longest suffix of `tokens` (of
    min_n..max_n tokens) that occurred before; [] when none did."""
    size = len(tokens)
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        suffix = tokens[size - n :]
        windows = np.lib.stride_tricks.sliding_window_view(tokens[: size - 1], n)  # every start but the suffix's
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return tokens[start : start + k].tolist()
    return []


class NgramProposer:
    """The drafter interface the engine calls (`propose`), over each request's token ids instead of features."""

    model_free = True

    def __init__(self, vocab_size: int, device: str | torch.device = "cpu", min_n: int = 2, max_n: int = 4):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"ngram drafting needs 1 <= min_n <= max_n, not {min_n}, {max_n}")
        self.vocab_size, self.device, self.min_n, self.max_n = vocab_size, torch.device(device), min_n, max_n
        # how often a looked-up token was accepted once the ones before it were (decayed counts, a 1-in-2 prior):
        # every draft's confidence, so that the adaptive policy trims lookup's drafts under load as DSpark's
        self.kept, self.tested = 1.0, 2.0

    @property
    def survival(self) -> float:
        return self.kept / self.tested

    def observe(self, verified: int, accepted: int, decay: float = 0.99) -> None:
        """A verified round of one of its drafts: `accepted` of its first `verified` tokens were kept."""
        self.kept = decay * self.kept + accepted
        self.tested = decay * self.tested + accepted + (accepted < verified)

    def propose(self, histories: list[list[int]], ks: list[int], params: list[SamplingParams],
                min_len: int = 1) -> list[Draft]:
        """A draft of up to ks[b] tokens for each request from its token ids so far (prompt + output); empty where
        the continuation found is shorter than min(ks[b], min_len)."""
        drafts = []
        for tokens, k, p in zip(histories, ks, params):
            found = lookup(np.asarray(tokens, dtype=np.int64), k, self.min_n, self.max_n) if k else []
            if len(found) < min(k, min_len):
                found = []
            q = point_mass(found, self.vocab_size, self.device) if found and not p.greedy else None
            drafts.append(Draft(found, q, [self.survival] * len(found), "lookup"))
        return drafts
