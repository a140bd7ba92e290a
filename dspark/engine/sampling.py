"""Per-request sampling parameters and the batched sampler (temperature, top-k, top-p, seeds, logprobs)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    seed: int | None = None
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None = off; k >= 0 = chosen token's logprob plus top-k alternatives
    skip_special_tokens: bool = True
    num_speculative_tokens: int | None = None  # per-request draft length cap (None = server default, 0 = off)
    slo_tokens_per_s: float | None = None  # per-user speed target (None = server default, 0 = none)
    deadline_s: float | None = None  # end the request (finish_reason "deadline") this long after arrival
    # Logit adjustments (OpenAI's penalties and logit_bias; vLLM's repetition_penalty and min_p). They define the
    # target distribution: sampling and verification both use it, so speculation stays lossless with them.
    presence_penalty: float = 0.0  # subtracted from the logit of every token the output already holds
    frequency_penalty: float = 0.0  # subtracted once per occurrence in the output
    repetition_penalty: float = 1.0  # logits of tokens in the prompt or output: / it when > 0, * it when < 0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    min_p: float = 0.0  # after temperature, drop tokens below min_p x the most likely one's probability
    grammar: str | None = None  # structured output: an llguidance grammar (engine.grammar.GrammarCompiler)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5

    @property
    def penalized(self) -> bool:
        """Its logits depend on more than the model: penalties or a bias."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias)


class Rng:
    """A request's random numbers, counter-based (as Philox is): uniform number i of seed s is a hash of (s, i),
    so one call (`uniforms`) draws a whole step's numbers for every request, and a seeded request gets the same
    numbers whatever shares its batch. `offset` counts the numbers the request has used."""

    __slots__ = ("seed", "offset")

    def __init__(self, seed: int):
        self.seed, self.offset = seed % 2**64, 0

    def initial_seed(self) -> int:
        return self.seed


def make_generator(seed: int | None) -> Rng:
    """The request's random numbers: from its seed, or from a fresh 62-bit seed of torch's global RNG."""
    return Rng(seed if seed is not None else int(torch.randint(0, 2**62, (1,))))


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer (uint64, wrapping): a bijection that spreads every input bit over the output."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniforms(rngs: list[Rng], counts: list[int], device=None) -> torch.Tensor:
    """float64 uniforms in [0, 1), counts[i] of them from rngs[i] (which advance past them), one after another:
    number i of seed s is SplitMix64 at (mix(s), i), 53 bits of it, computed for the whole batch in one pass of
    uint64 array arithmetic on the host (a few microseconds), then one copy to `device`."""
    c = np.asarray(counts, dtype=np.int64)
    keys = _mix64(np.fromiter((r.seed for r in rngs), dtype=np.uint64, count=len(rngs)))
    offsets = np.fromiter((r.offset for r in rngs), dtype=np.int64, count=len(rngs))
    for r, n in zip(rngs, counts):
        r.offset += n
    owner = np.repeat(np.arange(len(c)), c)
    counter = (offsets - (np.cumsum(c) - c))[owner] + np.arange(owner.size)
    with np.errstate(over="ignore"):
        z = _mix64(keys[owner] + (counter.astype(np.uint64) + np.uint64(1)) * _GOLDEN)
    u = torch.from_numpy((z >> np.uint64(11)).astype(np.float64) * 2.0**-53)
    return u if device is None else u.to(device)


def penalize(logits: torch.Tensor, params: SamplingParams, prompt: list[int], output: list[int],
             draft: list[int] = ()) -> torch.Tensor:
    """One request's logits rows [len(draft) + 1, V] after logit_bias, repetition, frequency and presence
    penalties (in that order), on their device. Row j scores the token after output + draft[:j], so it counts
    those: the distribution verification checks draft token j against is exactly the one sampling would use."""
    dev, (m, vocab) = logits.device, logits.shape
    logits = logits.clone()
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), device=dev)
        logits[:, ids] += torch.tensor(list(params.logit_bias.values()), device=dev, dtype=logits.dtype)
    if not (params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0):
        return logits
    counts = torch.zeros(m, vocab, device=dev, dtype=logits.dtype)
    if output:
        counts += torch.bincount(torch.tensor(output, device=dev), minlength=vocab).to(logits.dtype)
    if len(draft):
        step = torch.zeros(m, vocab, device=dev, dtype=logits.dtype)
        step[torch.arange(1, m, device=dev), torch.tensor(list(draft), device=dev)] = 1.0
        counts += step.cumsum(0)
    if params.repetition_penalty != 1.0:
        seen = counts > 0
        if prompt:
            seen[:, torch.tensor(prompt, device=dev)] = True
        rp = params.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / rp, logits * rp), logits)
    return logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(logits.dtype)


TOP_P_WIDTH = 1024  # top-p without top-k first looks for each row's nucleus among this many likeliest tokens


def _keep(logits: torch.Tensor, lse: torch.Tensor, top: tuple[torch.Tensor, torch.Tensor], k: torch.Tensor,
          top_ps: torch.Tensor) -> torch.Tensor:
    """logits with -inf outside each row's top-k and top-p, from its largest logits `top` (values, indices, in
    descending order, as many as its cuts can reach) and the full logsumexp `lse`."""
    sorted_logits, idx = top
    cut = _cut(sorted_logits, k, top_ps, lse)
    return torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits.masked_fill(cut, float("-inf")))


def _cut(sorted_logits: torch.Tensor, k: torch.Tensor, top_ps: torch.Tensor, lse: torch.Tensor | None
         ) -> torch.Tensor:
    """Which of each row's largest logits (descending) its top-k and top-p drop; without the row's full
    logsumexp `lse`, its top-k alone (for rows whose top_p is 1)."""
    cut = torch.arange(sorted_logits.shape[-1], device=sorted_logits.device)[None, :] >= k[:, None]
    if lse is not None:
        probs = (sorted_logits - lse).exp()
        cut |= (probs.cumsum(-1) - probs) >= top_ps[:, None]  # keep the smallest prefix reaching top_p
    return cut


def filter_logits(logits: torch.Tensor, temps: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor,
                  min_ps: torch.Tensor | None = None):
    """Temperature, min-p, top-k and top-p applied row-wise (in that order); returns probabilities [N, V].

    min-p drops tokens whose probability is below min_p x the row's largest. top-p keeps the smallest prefix of
    the probability-sorted vocabulary whose (untruncated) mass reaches top_p.
    Only as many of the largest as a row needs are sorted (a full sort of a 49k-150k vocabulary per row was most
    of a sampled step): the top-k when every row has a small one; else the top TOP_P_WIDTH, which holds the
    nucleus of a row whose mass there reaches its top_p; only the other rows are sorted further, and rows without
    any filter keep every token. Probabilities come from the full logsumexp, so the result is the same."""
    logits = logits / temps[:, None]
    if min_ps is not None and bool((min_ps > 0).any()):
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_ps[:, None] * probs.amax(-1, keepdim=True), float("-inf"))
    vocab = logits.shape[-1]
    if bool((top_ks > 0).any()) or bool((top_ps < 1).any()):
        k = torch.where(top_ks > 0, top_ks, vocab).clamp(max=vocab)
        lse = logits.logsumexp(-1, keepdim=True)
        width = int(k.max())
        if width <= TOP_P_WIDTH:
            return _keep(logits, lse, logits.topk(width, dim=-1), k, top_ps).softmax(-1)
        vals, idx = logits.topk(TOP_P_WIDTH, dim=-1)
        unfiltered = (k >= vocab) & (top_ps >= 1)
        fits = (k <= TOP_P_WIDTH) | ((vals - lse).exp().sum(-1) >= top_ps + 1e-6)
        kept = torch.where(unfiltered[:, None], logits, _keep(logits, lse, (vals, idx), k, top_ps))
        rest = (~fits & ~unfiltered).nonzero()[:, 0]
        if len(rest):  # their cuts reach past the top TOP_P_WIDTH: sorted as far as they need
            sub, width = logits[rest], int(k[rest].max())
            top = sub.topk(width, dim=-1) if width < vocab else sub.sort(dim=-1, descending=True)
            kept[rest] = _keep(sub, lse[rest], top, k[rest], top_ps[rest])
        logits = kept
    return logits.softmax(-1)


def filter_top_k(logits: torch.Tensor, temps: torch.Tensor, top_ks: torch.Tensor,
                 top_ps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """filter_logits for rows that all have a top-k (1 <= k), returned sparse: (probabilities [N, K], their token
    ids [N, K]) over each row's K = max(top_ks) largest logits, in vocabulary order (0 past a row's own cut).
    One top-k pass over the vocabulary, and a logsumexp where a row's top-p cut needs its whole mass."""
    vals, idx = logits.topk(int(top_ks.max()), dim=-1)  # descending; temperature keeps the order
    vals = vals / temps[:, None]
    lse = (logits / temps[:, None]).logsumexp(-1, keepdim=True) if bool((top_ps < 1).any()) else None
    p = vals.masked_fill(_cut(vals, top_ks, top_ps, lse), float("-inf")).softmax(-1)
    idx, order = idx.sort(-1)
    return p.gather(1, order), idx


def draw(probs: torch.Tensor, gen: Rng) -> int:
    """One index from an (unnormalised) probability vector by inverse CDF: one uniform from `gen`.

    torch.multinomial draws an exponential per vocabulary entry; this is a cumsum and a binary search, in float64
    so that tail tokens keep their probability over a 150k vocabulary."""
    return index_at(probs, float(uniforms([gen], [1])[0]))


def index_at(probs: torch.Tensor, u: float) -> int:
    """The index whose slice of the CDF holds u * total, for u in [0, 1]; never an index without mass."""
    return int(index_at_rows(probs[None], torch.tensor([u], dtype=torch.float64, device=probs.device))[0])


def index_at_rows(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """index_at for every row of probs [N, V] with its own u [N] (float64 throughout)."""
    cdf = probs.double().cumsum(-1)
    i = torch.searchsorted(cdf, (u.double() * cdf[:, -1])[:, None], right=True)[:, 0]
    # u * total rounded onto (or u was) the total: the last index with mass
    last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).to(torch.int8).argmax(-1)
    return torch.where(i >= probs.shape[-1], last, i)
