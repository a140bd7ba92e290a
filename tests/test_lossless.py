"""Sampled speculative decoding is lossless: the engine's output distribution is the target's, exactly enumerated.

Each case samples one prompt N times (different seeds, 512 requests in flight) with max_tokens = L + 1, so the first
drafting round may verify L - 1 draft tokens, and counts the first L output tokens. Its exact distribution comes from
the target's logits, filtered by this file's own temperature / top-k / top-p code (not engine.sampling's: a broken
filter shared by the engine and the reference would cancel out), enumerated over every kept token sequence.

Statistic: the total variation between the N-sample histogram and the exact joint. Bound: 1.15 x the largest TV of
REPS simulated exact samplers of the same size; by the same simulation (tv_false_alarm below) a correct engine
exceeds it with probability < 1/REPS per case (well under that: none of 2000 fresh simulations did for any case
here when this was written). Seeds are fixed, so a run is deterministic; the rate says how lucky a pass would be.

Each case also asserts that drafting rounds really verified 2..L-1 tokens and accepted at positions >= 2, so the
multi-token acceptance path is what is being measured, not one-token drafts.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass

import pytest
import torch
from conftest import cheap_drafting
from test_sampling import reference_filter, reference_penalized

from dspark.engine import sampling, verify
from dspark.engine.drafters import block
from dspark.engine.drafters.vocab import DraftVocab
from dspark.engine.grammar import Constraint
from dspark.engine.llm_engine import LLMEngine
from dspark.engine.sampling import SamplingParams
from dspark.engine.settings import Settings

PROMPT = "def main():\n    "
L = 4  # output tokens counted: the prefill's token, then draft positions 1..3 of the first drafting round
N = 2000  # every broken engine below exceeds the bound at this size by 1.6x or more (9x for most)
N_ADAPTIVE = 4000  # the adaptive policy trims few rounds and verifies past position 1 rarely: more rounds to see it
REPS = 300


@dataclass(frozen=True)
class Case:
    method: str
    policy: str
    temperature: float
    top_k: int = 0
    top_p: float = 1.0
    threshold: float = 0.0
    extra: tuple = ()  # more SamplingParams fields, as (name, value) pairs; logit_bias as ((token, bias), ...)
    schema: str = ""  # a JSON schema the output must follow (structured output), as JSON text
    reduced_vocab: bool = False  # draft from a vocabulary without a likely token (FR-Spec)
    prompt: str = PROMPT

    def __str__(self) -> str:
        more = "".join(f"-{k}" for k, _ in self.extra) + ("-schema" if self.schema else "")
        more += "-reduced_vocab" if self.reduced_vocab else ""
        more += "-own_prompt" if self.prompt != PROMPT else ""
        return f"{self.method}-{self.policy}-T{self.temperature}-k{self.top_k}-p{self.top_p}-c{self.threshold}{more}"

    def grammar(self, eng: LLMEngine) -> str | None:
        if not self.schema:
            return None
        return eng.grammars.grammar({"type": "json_schema", "json_schema": {"schema": json.loads(self.schema)}})

    @property
    def n(self) -> int:
        return N_ADAPTIVE if self.policy == "adaptive" else N

    def params(self, **kw) -> SamplingParams:
        extra = {k: dict(v) if k == "logit_bias" else v for k, v in self.extra}
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, **extra, **kw)


# Penalties make each position's distribution depend on the tokens before it, drafts included. Negative frequency
# and presence penalties (OpenAI allows down to -2) favour repeats: with positive ones no top-3 sequence here
# repeats a token, and at -1.5 / -0.5 a verification that forgot the drafts' counts went undetected. The bias bans
# " try" (658, third most likely first token after PROMPT) and pushes " if" (323, fifth) into the top 3.
PENALTIES = (("frequency_penalty", -2.0), ("presence_penalty", -2.0), ("repetition_penalty", 1.3), ("min_p", 0.02),
             ("logit_bias", ((658, -100.0), (323, 2.0))))


# A covering design rather than the full product (24+ engine runs): every temperature, drafter and policy appears,
# each drafter under both policies. The tiny model's nucleus is wide (top-p 0.5 alone keeps > 64 tokens at T=0.7),
# so top-p runs under a top-k cap that keeps the joint enumerable; in those cases top-p does cut (64 and 137
# outcomes, not 4**4).
CASES = [
    Case("dspark", "fixed", 0.3, top_k=4, top_p=0.95),
    Case("dspark", "fixed", 0.7, top_k=3),
    Case("dspark", "adaptive", 1.0, top_k=3),
    Case("dspark", "fixed", 1.5, top_k=3),
    Case("dspark", "fixed", 1.0, top_k=3, threshold=0.5),
    Case("dflash", "fixed", 1.0, top_k=3),
    Case("dflash", "fixed", 0.7, top_k=4, top_p=0.7),
    Case("dflash", "adaptive", 0.3, top_k=4, top_p=0.95),
    Case("eagle3", "fixed", 0.7, top_k=3),
    Case("eagle3", "fixed", 1.5, top_k=3),
    Case("eagle3", "fixed", 0.3, top_k=4, top_p=0.95),
    # T=0.7: at 0.3 the tiny EAGLE-3 accepts 13% at position 1, and the adaptive policy (rightly) verifies too
    # little past it for the check to see positions >= 2 accepted
    Case("eagle3", "adaptive", 0.7, top_k=4, top_p=0.95),
    Case("dspark", "fixed", 1.0, top_k=3, extra=PENALTIES),
    # structured output: the grammar's mask on the target at every verified row (and on the drafter)
    Case("dspark", "fixed", 1.0, top_k=3, schema=json.dumps({"type": "string", "pattern": "^(ab|cd|ef)(gh|ij)kl$"})),
    # a token the drafter can never propose (q = 0) must still come out as often as the target says
    Case("dspark", "fixed", 0.7, top_k=3, reduced_vocab=True),
    # model-free prompt lookup: its drafts are point masses (q = 1 on the token); a prompt that repeats, so that
    # the lookup (from 1-token suffixes here) proposes in most rounds
    Case("ngram", "fixed", 1.0, top_k=3, prompt="1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2,"),
    # the hybrid: lookup's point masses and the DSpark drafter's q in the same runs (and batches)
    Case("dspark+ngram", "fixed", 0.7, top_k=3, prompt="1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2,"),
    # suffix decoding: point masses too, from the request's own tokens and (as requests finish) the global store
    Case("suffix", "fixed", 1.0, top_k=3, prompt="1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2,"),
    Case("suffix", "adaptive", 0.7, top_k=3, prompt="1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2,"),
    # the hybrid: suffix's point masses where its score clears the bar, the DSpark drafter's q elsewhere
    Case("dspark+suffix", "fixed", 0.7, top_k=3, prompt="1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2,"),
]


def reference_probs(logits: torch.Tensor, c: Case, prompt: list[int] = (), generated: list[int] = (),
                    allowed: torch.Tensor | None = None) -> dict[int, float]:
    """The target's next-token distribution after penalties, the grammar's `allowed` tokens, temperature, min-p,
    top-k and top-p, from test_sampling's plain float64 definitions (not engine.sampling's), as
    {token: probability} over the kept tokens."""
    sp = c.params()
    if sp.penalized:
        logits = reference_penalized(logits, sp, prompt, generated)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    probs = reference_filter(logits, c.temperature, c.top_k, c.top_p, sp.min_p)
    kept = probs.nonzero()[:, 0].tolist()
    assert len(kept) < 64, "a case keeping 64 tokens per position is too wide to enumerate"
    return {i: float(probs[i]) for i in kept}


def exact_joint(eng: LLMEngine, prompt: list[int], c: Case) -> dict[tuple, float]:
    """P(t_1..t_L) under the target, enumerated: one forward per kept prefix."""
    device = next(eng.model.parameters()).device

    grammar = c.grammar(eng)

    def next_dist(ids):
        allowed = None
        if grammar is not None:  # the grammar's state after this prefix's generated tokens, from a fresh matcher
            g = eng.grammars.constraint(grammar)
            g.commit(ids[len(prompt):])
            allowed = g.mask()
        with torch.inference_mode():
            h, _ = eng.model(torch.tensor([ids], device=device))
            return reference_probs(eng.model.logits(h)[0, -1].float().cpu(), c, prompt, ids[len(prompt):], allowed)

    joint = {(): 1.0}
    for _ in range(L):
        joint = {seq + (t,): pr * pt for seq, pr in joint.items() for t, pt in next_dist(prompt + list(seq)).items()}
    return joint


def tv(counts: dict, joint: dict, n: int) -> float:
    return 0.5 * sum(abs(counts.get(k, 0) / n - joint.get(k, 0.0)) for k in set(counts) | set(joint))


def simulated_tvs(joint: dict, n: int, reps: int, seed: int) -> torch.Tensor:
    """TVs of `reps` histograms of n exact draws from `joint`."""
    probs = torch.tensor(list(joint.values()), dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    draws = torch.multinomial(probs.float(), n * reps, replacement=True, generator=g).view(reps, n)
    counts = torch.zeros(reps, len(probs), dtype=torch.float64).scatter_add_(1, draws, torch.ones(reps, n).double())
    return 0.5 * (counts / n - probs).abs().sum(-1)


def tv_bound(joint: dict, n: int) -> float:
    return float(simulated_tvs(joint, n, REPS, seed=0).max()) * 1.15


def run_case(c: Case, n: int | None = None) -> tuple[dict, dict, LLMEngine]:
    n = n or c.n
    # 16 in flight under the adaptive policy: with 512, one more draft token would not pay for itself and few draft
    eng = LLMEngine(Settings(max_num_seqs=16 if c.policy == "adaptive" else 512, max_num_batched_tokens=8192,
                             speculative=c.method, draft_len=L - 1, confidence_threshold=c.threshold,
                             draft_policy=c.policy, ngram_min=1))
    if c.policy == "adaptive":
        cheap_drafting(eng)
    ids = eng.tokenizer.encode(c.prompt)
    if c.reduced_vocab:  # without the likeliest token at the first drafted position (after the greedy first token)
        with torch.inference_mode():
            first = int(eng.model.logits(eng.model(torch.tensor([ids]))[0])[0, -1].argmax())
            top = int(eng.model.logits(eng.model(torch.tensor([ids + [first]]))[0])[0, -1].argmax())
        keep = torch.ones(eng.model_config.vocab_size, dtype=torch.bool)
        keep[top] = False
        eng.drafter.vocab = DraftVocab(keep.nonzero()[:, 0], len(keep))
    params = [c.params(seed=s, max_tokens=L + 1, ignore_eos=True, grammar=c.grammar(eng)) for s in range(n)]
    counts: dict = {}
    for s in eng.generate([ids] * n, params):
        key = tuple(s.output_ids[:L])
        counts[key] = counts.get(key, 0) + 1
    return counts, exact_joint(eng, ids, c), eng


def assert_multi_token_rounds(eng: LLMEngine, policy: str) -> None:
    """Rounds verified more than one draft token on average, up to L - 1, and accepted past position 1."""
    rounds = eng.round_log
    assert eng.stats["verified_tokens"] > eng.stats["draft_rounds"], "verified tokens per round <= 1"
    assert max(v for v, *_ in rounds) == L - 1
    assert sum(a >= 2 for _, a, *_ in rounds) >= 10, "draft positions >= 2 were rarely accepted"
    if policy == "adaptive":  # the scheduler verified part of the drafts, not all or nothing
        assert 0 < eng.stats["verified_tokens"] < eng.stats["draft_tokens"]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_sampled_distribution_matches_target(case):
    counts, joint, eng = run_case(case)
    assert_multi_token_rounds(eng, case.policy)
    assert tv(counts, joint, case.n) < tv_bound(joint, case.n)


# -- the check fails for broken engines -------------------------------------------------------------------------
MUTANTS = {  # engine.verify's pieces, broken the ways a rewrite of verification could break them
    "accept_all": ("ratio_test", lambda px, qx, u, position: torch.ones_like(px, dtype=torch.bool)),
    "resample_from_p": ("correction", lambda p, q: p),  # the token after a rejection drawn from p, not (p - q)+
    "no_ratio_test_after_first": ("ratio_test", lambda px, qx, u, position: (u * qx < px) | (position >= 1)),
}


PENALTY_MUTANTS = {  # penalties a rewrite could get wrong at verification
    "no_penalties": lambda logits, params, prompt, output, draft=(): logits.clone(),
    "penalties_ignore_the_draft": lambda logits, params, prompt, output, draft=(): sampling.penalize(
        logits, params, prompt, output, ()),
}


@pytest.mark.parametrize("mutant", [*MUTANTS, "ignore_temperature", *PENALTY_MUTANTS, "grammar_only_on_row_0"])
def test_broken_engines_are_detected(mutant, monkeypatch):
    """Each is a bug a rewrite of verification could introduce; the same check must fail for every one."""
    case = Case("dspark", "fixed", 1.0, top_k=3)
    if mutant == "grammar_only_on_row_0":  # the draft rows scored without the grammar's state after the draft
        case = next(c for c in CASES if c.schema)
        real = Constraint.masks
        monkeypatch.setattr(Constraint, "masks", lambda self, draft: real(self, [])[[0] * (len(draft) + 1)])
    elif mutant in PENALTY_MUTANTS:
        case = Case("dspark", "fixed", 1.0, top_k=3, extra=PENALTIES)
        monkeypatch.setattr(verify, "penalize", PENALTY_MUTANTS[mutant])
    elif mutant == "ignore_temperature":
        case = Case("dspark", "fixed", 0.7, top_k=3)
        for mod in (sampling, verify, block):  # block: the drafters' DraftSampler
            monkeypatch.setattr(mod, "filter_logits", ignore_temperature(mod.filter_logits))
        monkeypatch.setattr(verify, "filter_top_k", ignore_temperature(verify.filter_top_k))  # top-k rows
    else:
        monkeypatch.setattr(verify, *MUTANTS[mutant])
    if mutant == "grammar_only_on_row_0":  # the engine's own check catches the off-grammar token it committed
        with pytest.raises(RuntimeError, match="grammar rejected committed token"):
            run_case(case)
        return
    counts, joint, _ = run_case(case)
    assert tv(counts, joint, case.n) > tv_bound(joint, case.n)


def ignore_temperature(filter_fn):
    return lambda logits, temps, ks, ps, *min_ps: filter_fn(logits, torch.ones_like(temps), ks, ps, *min_ps)


def test_reference_filter_matches_definition():
    """The reference itself: top-k and top-p keep the right tokens, temperature sharpens."""
    logits = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]).log()
    assert reference_probs(logits, Case("x", "fixed", 1.0, top_k=2)) == pytest.approx({0: 5 / 7, 1: 2 / 7})
    assert reference_probs(logits, Case("x", "fixed", 1.0, top_p=0.8)) == pytest.approx(
        {0: 0.5 / 0.85, 1: 0.2 / 0.85, 2: 0.15 / 0.85})
    sharp = reference_probs(logits, Case("x", "fixed", 0.5))
    assert sharp[0] == pytest.approx(0.25 / sum(x * x for x in (0.5, 0.2, 0.15, 0.1, 0.05)))


def tv_false_alarm(joint: dict, n: int = N, reps: int = 2000) -> float:
    """Share of fresh exact samplers (seeds unlike the bound's) whose TV exceeds the bound."""
    return float((simulated_tvs(joint, n, reps, seed=1) > tv_bound(joint, n)).double().mean())


def test_the_bound_rarely_fires_on_exact_samples():
    """The false-alarm rate stated in the module docstring, on a joint shaped like the cases' (81 outcomes)."""
    probs = torch.tensor([0.6, 0.3, 0.1])
    joint = {k: float(torch.prod(probs[list(k)])) for k in itertools.product(range(3), repeat=L)}
    assert tv_false_alarm(joint) < 1 / REPS
