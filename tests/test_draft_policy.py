"""The load- and SLO-aware draft policy and the step cost model, on synthetic cost curves."""

import pytest

from dspark.scheduler.cost_model import CostTable, StepCostModel, buckets_up_to
from dspark.scheduler.draft_policy import DraftPolicy


def gpu_like(max_tokens=1024, knee=64, per_token=0.02):
    """Flat step time up to `knee` batch tokens (memory-bound), then linear (compute-bound)."""
    cost = StepCostModel(max_tokens, 256)
    cost.verify.seconds = [1.0 + per_token * max(0, b - knee) for b in cost.verify.points]
    cost.draft.seconds = [0.0] * len(cost.draft.points)
    return cost


def test_cost_table_interpolates_refreshes_and_stays_monotone():
    t = CostTable(buckets_up_to(16))
    assert t.points == [1, 2, 4, 8, 16]
    t.seconds = [1.0, 2.0, 1.5, 4.0, 8.0]  # a noisy bucket (4) below its neighbour
    assert t(1) == 1.0 and t(3) == 2.0 and t(6) == 3.0 and t(32) == 16.0
    t.observe(8, 100.0)  # a spike counts as at most 4x the estimate
    assert t.seconds[3] == 0.9 * 4.0 + 0.1 * 16.0
    # the machine speeding up moves the buckets no step visits too (a quarter as much), keeping their ratios
    t.seconds = [1.0, 2.0, None, 4.0, 8.0]
    for _ in range(200):
        t.observe(1, 0.5)
    assert t.seconds[0] == pytest.approx(0.5, rel=1e-3) and t.seconds[2] is None
    assert t.seconds[1] == pytest.approx(2.0 * 0.5 ** 0.25, rel=0.03)
    assert t.seconds[4] / t.seconds[3] == pytest.approx(2.0, rel=1e-9)


def lengths_at(concurrency: int, survival: list[float]) -> list[int]:
    pol = DraftPolicy(gpu_like(), max_len=7)
    drafts = [(7, survival, 1.0, 0)] * concurrency
    return pol.lengths(drafts, base_tokens=concurrency, committing=concurrency)


def test_quiet_server_long_drafts_busy_server_short():
    surv = [0.9 ** (j + 1) for j in range(7)]
    quiet, busy, flooded = lengths_at(2, surv), lengths_at(48, surv), lengths_at(200, surv)
    assert quiet == [7, 7]
    assert 0 < sum(busy) / len(busy) < 7
    assert sum(flooded) / len(flooded) < sum(busy) / len(busy)


def test_lengths_follow_confidence_and_slo_weight():
    pol = DraftPolicy(gpu_like(), max_len=7)
    sure = [0.95 ** (j + 1) for j in range(7)]
    unsure = [0.4 ** (j + 1) for j in range(7)]
    out = pol.lengths([(7, sure, 1.0, 0), (7, unsure, 1.0, 0)] * 20, base_tokens=40, committing=40)
    assert out[0] > out[1]
    out = pol.lengths([(7, unsure, 4.0, 0), (7, unsure, 1.0, 0)] * 20, base_tokens=40, committing=40)
    assert out[0] > out[1]  # behind its SLO: more draft budget for the same confidences
    hopeless = [0.01 ** (j + 1) for j in range(7)]
    pol = DraftPolicy(gpu_like(knee=0, per_token=1.0), max_len=7)  # every batch token costs a full step
    assert pol.lengths([(7, hopeless, 1.0, 0), (7, hopeless, 1.0, 1)], 2, 2) == [0, 1]  # a probe verifies one


def test_gate_turns_speculation_off_when_drafting_does_not_pay():
    cost = gpu_like()
    pol = DraftPolicy(cost, max_len=7)
    cands = [(i, True, 7, 1.0) for i in range(8)]
    assert pol.gate(cands, 8, 8) == set(range(8))  # free drafting, good acceptance: everyone drafts
    cost.draft.seconds = [3.0] * len(cost.draft.points)  # drafting costs 3 target steps
    for i in range(8):
        for _ in range(30):
            pol.observe(i, True, 7, 0)  # nothing is ever accepted
    assert pol.gate(cands, 8, 8) == set()
    chosen = [pol.gate(cands, 8, 8) for _ in range(31 * pol.probe_every)]
    probes = [i for i, c in enumerate(chosen) if c]
    assert all(len(chosen[i]) == 1 for i in probes)  # one probe at a time, whatever the concurrency
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert gaps == sorted(gaps) and gaps[-1] > 4 * gaps[0]  # backing off while drafting keeps not paying
    assert len(set().union(*chosen)) == len(probes)  # taking turns
    cost.draft.seconds = [0.0] * len(cost.draft.points)  # drafting becomes free: everyone drafts again
    for i in range(8):
        for _ in range(30):
            pol.observe(i, True, 7, 5)
    assert pol.gate(cands, 8, 8) == set(range(8))


def test_survival_is_recalibrated_online():
    pol = DraftPolicy(gpu_like(), max_len=3)
    for _ in range(200):  # the head says 0.9 at every position; half of the first tokens survive
        pol.observe(0, False, 3, 0, [0.9, 0.9, 0.9])
        pol.observe(0, False, 3, 3, [0.9, 0.9, 0.9])
    a = pol.survival(False, [0.9, 0.9, 0.9], 3)
    assert abs(a[0] - 0.5) < 0.05


def test_scheduler_admits_and_decodes_requests_behind_their_slo_first():
    import time

    from dspark.engine.sampling import SamplingParams, make_generator
    from dspark.scheduler.block_manager import BlockManager
    from dspark.scheduler.scheduler import Scheduler
    from dspark.scheduler.sequence import Sequence

    sched = Scheduler(BlockManager(64, 4), max_num_seqs=1, max_num_batched_tokens=64, slo_tokens_per_s=50)
    fresh = Sequence("fresh", [1, 2, 3], SamplingParams(max_tokens=50), make_generator(0), None)
    slow = Sequence("slow", [1, 2, 3], SamplingParams(max_tokens=50), make_generator(0), None)
    slow.token_ids += [4] * 10  # a preempted request: 10 tokens streamed over 1 s = 10 tok/s < 50
    slow.first_token_time = time.monotonic() - 1.0
    sched.add(fresh)
    sched.add(slow)
    assert [it.seq.request_id for it in sched.schedule().items] == ["slow"]
    ahead = Sequence("ahead", [1, 2, 3], SamplingParams(max_tokens=50, slo_tokens_per_s=1), make_generator(0), None)
    ahead.token_ids += [4] * 10
    ahead.first_token_time = time.monotonic() - 1.0
    assert sched.slo_weight(ahead, time.monotonic()) == 0.25 and sched.slo_weight(slow, time.monotonic()) == 4.0


# -- the rules, exactly: hand-worked updates and an oracle that recomputes Theta from scratch -------------------
class LinearCost:
    """verify(B) = base + per_token * B, draft(R) = per_request * R: simple enough to check by hand."""

    def __init__(self, base=1.0, per_token=0.01, per_request=0.0):
        self.verify = lambda b: base + per_token * b
        self.draft = lambda r: per_request * r


def test_priors_for_a_new_request():
    pol = DraftPolicy(LinearCost(), max_len=4)
    assert pol.prior_tau == {True: 3.0, False: 2.0}  # 1 + max_len/2 greedy, 1 + max_len/4 sampled
    assert pol.accept_rate == {True: [0.7] * 4, False: [0.5] * 4}
    assert pol.mean_conf == {True: [0.7] * 4, False: [0.5] * 4}
    assert pol.class_idle == {True: 0, False: 0} and pol.probe_interval == {True: 32, False: 32}
    assert pol.probing == set() and pol.probe_every == 32 and pol.ema == 0.2


def test_observe_updates_the_running_estimates():
    pol = DraftPolicy(LinearCost(), max_len=3)
    pol.observe(7, True, verified=3, accepted=1, confidence=[0.9, 0.6, 0.3])
    st = pol.state[7]
    # the request's first round weighs as much as the class estimate it started from
    assert st.tau == pytest.approx(0.5 * 2.5 + 0.5 * 2) and st.length == pytest.approx(0.8 * 3 + 0.2 * 3)
    # the class's first round weighs as much as the starting guess (a running mean), ...
    assert pol.prior_tau[True] == pytest.approx(0.5 * 2.5 + 0.5 * 2)
    # positions reached: the accepted one and the first rejected; the third was never looked at
    assert pol.accept_rate[True] == pytest.approx([0.5 * 0.7 + 0.5, 0.5 * 0.7, 0.7])
    assert pol.mean_conf[True] == pytest.approx([0.5 * 0.7 + 0.5 * 0.9, 0.5 * 0.7 + 0.5 * 0.6, 0.7])
    assert pol.accept_rate[False] == [0.5] * 3 and pol.prior_tau[False] == 1.75  # the other class is untouched
    pol.observe(7, True, verified=0, accepted=0)  # a draft trimmed to nothing still counts one round
    assert st.length == pytest.approx(0.8 * 3.0 + 0.2 * 1) and st.tau == pytest.approx(2 / 3 * 2.25 + 1 / 3)
    assert pol.prior_tau[True] == pytest.approx((2.5 + 2 + 1) / 3)  # ... the second a third: a plain mean
    for _ in range(40):  # ... until the rate reaches its floor, ema / 4
        pol.observe(8, True, verified=3, accepted=3)
    before = pol.prior_tau[True]
    pol.observe(8, True, verified=3, accepted=0)
    assert pol.prior_tau[True] == pytest.approx(0.95 * before + 0.05 * 1)
    pol.forget(7)
    assert 7 not in pol.state


def test_survival_is_the_running_product_of_recalibrated_rates():
    pol = DraftPolicy(LinearCost(), max_len=3)
    pol.accept_rate[True] = [0.8, 0.5, 0.5]
    assert pol.survival(True, None, 3) == pytest.approx([0.8, 0.4, 0.2])
    assert pol.survival(True, None, 2) == pytest.approx([0.8, 0.4])
    pol.mean_conf[True] = [0.4, 0.5, 0.5]  # the head says 0.4 where 0.8 survive: its scores are scaled up
    assert pol.survival(True, [0.3, 0.9, 0.5], 3) == pytest.approx([0.6, 0.6 * 0.9, 0.6 * 0.9 * 0.5])
    assert pol.survival(True, [0.9, 0.9, 0.9], 3)[0] == 1.0  # never above 1: survival stays non-increasing


def oracle_lengths(drafts, base, committing, cost):
    """The documented rule restated: pairs in descending w*a (earlier position first on ties); admit the next
    while Theta = committed / verify(B), recomputed from scratch, strictly grows."""
    out = [min(m, n) for n, _, _, m in drafts]

    def theta(lengths):
        gain = sum(w * sum(a[:m]) for (_, a, w, _), m in zip(drafts, lengths))
        return (committing + gain) / cost.verify(base + sum(lengths))

    pairs = sorted(((w * a[j], j, r) for r, (n, a, w, _) in enumerate(drafts) for j in range(out[r], n)),
                   key=lambda x: (-x[0], x[1]))
    for _, j, r in pairs:
        if j != out[r]:
            continue
        more = out[:r] + [j + 1] + out[r + 1:]
        if theta(more) <= theta(out):
            break
        out = more
    return out


def random_drafts(rng, n_req):
    drafts = []
    for _ in range(n_req):
        n = rng.randint(0, 5)
        a, s = [], 1.0
        for _ in range(n):
            s *= rng.uniform(0.2, 1.0)
            a.append(s)
        drafts.append((n, a, rng.choice([0.25, 1.0, 2.0, 4.0]), rng.choice([0, 0, 1, 2])))
    return drafts


def test_lengths_follow_the_rule_exactly():
    import random

    rng = random.Random(0)
    admitted = 0
    for _ in range(300):
        cost = LinearCost(base=rng.uniform(0.2, 2.0), per_token=rng.uniform(0.001, 0.2))
        drafts = random_drafts(rng, rng.randint(1, 6))
        base, committing = rng.randint(0, 20), rng.randint(1, 20)
        got = DraftPolicy(cost, max_len=5).lengths(drafts, base, committing)
        assert got == oracle_lengths(drafts, base, committing, cost), (drafts, base, committing)
        admitted += sum(got) - sum(min(m, n) for n, _, _, m in drafts)
    assert admitted > 100  # the cases admit, not only stop at once
    flat = LinearCost(per_token=0.0)  # a token of survival 0 adds nothing: not verified even when free
    assert DraftPolicy(flat, max_len=2).lengths([(2, [1.0, 0.0], 1.0, 0)], 1, 1) == [1]
    # ties go to the earlier position: request 0's second token waits behind request 1's first
    tie = [(2, [0.5, 0.5], 1.0, 0), (1, [0.5], 1.0, 0)]
    knee = LinearCost()
    knee.verify = lambda b: 1.0 if b <= 3 else 10.0  # room for two more tokens (with a linear cost, equal pairs
    assert DraftPolicy(knee, max_len=2).lengths(tie, 1, 1) == [1, 1]  # all pay or none do)


def oracle_gate(pol, cands, base, committing):
    """Who drafts: requests by descending w*(tau-1) (input order on ties) while committed / (verify + draft)
    strictly grows, starting from committing / verify(base) with no drafting."""
    scored = sorted([(w * (pol.state[sid].tau - 1), sid, min(k, pol.state[sid].length))
                     for sid, _, k, w in cands if k > 0], key=lambda x: -x[0])
    chosen, best = [], committing / pol.cost.verify(base)
    for i in range(len(scored)):
        top = scored[: i + 1]
        t = pol.cost.verify(base + sum(x[2] for x in top)) + pol.cost.draft(len(top))
        theta = (committing + sum(x[0] for x in top)) / t
        if theta <= best:
            break
        chosen, best = [x[1] for x in top], theta
    return set(chosen)


def test_gate_follows_the_rule_exactly():
    import random

    from dspark.scheduler.draft_policy import SpecState

    rng = random.Random(1)
    drafted = 0
    for _ in range(300):
        pol = DraftPolicy(LinearCost(rng.uniform(0.2, 2.0), rng.uniform(0.001, 0.1), rng.uniform(0, 0.5)), 5,
                          probe_every=10**6)
        cands = []
        for sid in range(rng.randint(1, 6)):
            greedy = rng.random() < 0.5
            pol.state[sid] = SpecState(rng.uniform(1.0, 4.0), rng.uniform(0.5, 5.0), rounds=1)
            cands.append((sid, greedy, rng.randint(0, 5), rng.choice([0.25, 1.0, 4.0])))
        base, committing = rng.randint(1, 20), rng.randint(1, 20)
        want = oracle_gate(pol, cands, base, committing)
        assert pol.gate(cands, base, committing) == want, cands
        drafted += len(want)
    assert drafted > 100


def test_gate_bookkeeping_idle_drift_and_probes():
    from dspark.scheduler.draft_policy import SpecState

    pol = DraftPolicy(LinearCost(per_request=0.0), max_len=4, probe_every=2)
    pol.state[1] = SpecState(3.0, 4.0, rounds=1)  # greedy, pays
    pol.state[2] = SpecState(1.0, 4.0, rounds=1)  # sampled, gains nothing: never drafts on its own merit
    pol.state[3] = SpecState(1.0, 4.0, rounds=1)  # sampled
    cands = [(2, False, 4, 1.0), (3, False, 4, 1.0), (1, True, 4, 1.0)]
    assert pol.gate(cands, 3, 3) == {1}
    assert pol.state[1].idle == 0 and pol.state[2].idle == 1 and pol.state[3].idle == 1
    assert pol.state[2].tau == pytest.approx(1.0 + 0.02 * (2.0 - 1.0))  # drifts toward the sampled prior
    assert pol.class_idle == {True: 0, False: 1} and pol.probing == set()
    assert pol.gate(cands, 3, 3) == {1, 3}  # second idle step for the sampled class: it probes (3 idled longest
    assert pol.probing == {3} and pol.state[3].idle == 0  # on ties, the larger seq_id), the greedy one drafts
    assert pol.class_idle[False] == 0 and pol.probe_interval == {True: 2, False: 4}
    pol.prior_tau[False] = 1.0  # no drift toward paying: the sampled class keeps probing and backing off
    pol.state[2].tau = pol.state[3].tau = 1.0
    intervals = []
    for _ in range(200):
        pol.gate(cands, 3, 3)
        intervals.append(pol.probe_interval[False])
    assert max(intervals) == 32 and sorted(set(intervals)) == [4, 8, 16, 32]  # doubles up to 16 x probe_every
    # only sampled requests: they still probe (the greedy class having no members does not stop the loop)
    only = DraftPolicy(LinearCost(), max_len=4, probe_every=2)
    only.state[5] = SpecState(1.0, 4.0, rounds=1)
    assert [only.gate([(5, False, 4, 1.0)], 1, 1) for _ in range(2)] == [set(), {5}]
    # a request with nothing to draft never drafts, one with a single token can; fixed policy: all with k > 0
    pol = DraftPolicy(LinearCost(), max_len=4)
    pol.state[8], pol.state[9] = SpecState(4.0, 4.0, rounds=1), SpecState(4.0, 4.0, rounds=1)
    assert pol.gate([(8, True, 0, 4.0), (9, True, 1, 1.0)], 1, 1) == {9}
    pol.state[10] = SpecState(1.0, 0.0, rounds=1)  # gains and costs nothing: Theta unchanged, it does not draft
    assert pol.gate([(10, True, 4, 1.0)], 1, 1) == set()
    pol.forget(12345)  # forgetting an unknown request is fine
    fixed = DraftPolicy(LinearCost(), max_len=4, adaptive=False)
    assert fixed.gate([(1, True, 0, 1.0), (2, True, 1, 1.0), (3, False, 4, 1.0)], 1, 1) == {2, 3}


def test_every_request_drafts_its_first_round_whatever_its_class_learned():
    """A class whose requests so far gained nothing (e.g. sampled chat) does not keep a new request of another
    kind (sampled math) from drafting: its first round is a probe, and from then on its own rounds decide."""
    from dspark.scheduler.draft_policy import SpecState

    pol = DraftPolicy(LinearCost(per_request=0.1), max_len=4)
    for sid in range(3):
        for _ in range(20):
            pol.observe(sid, False, 4, 0)  # nothing accepted: the sampled class's estimate falls to ~1
    assert pol.prior_tau[False] < 1.1
    old = [(sid, False, 4, 1.0) for sid in range(3)]
    assert pol.gate(old, 3, 3) == set()  # the requests with a history of losing do not draft
    new = (7, False, 4, 1.0)
    assert pol.gate([*old, new], 4, 4) == {7} and pol.probing == {7} and pol.class_idle[False] == 0
    assert pol.gate([*old, new], 4, 4) == {7}  # not drafted yet (e.g. no KV room): it still gets its round
    start = pol.state[7].tau  # the class's estimate when it arrived
    pol.observe(7, False, 4, 3)  # its own round: 3 of 4 accepted
    assert pol.state[7].tau == pytest.approx(0.5 * start + 0.5 * 4)
    assert pol.gate([*old, new], 4, 4) == {7} and pol.probing == set()  # now on its own merit
    pol.observe(7, False, 4, 0)
    for _ in range(10):
        pol.observe(7, False, 4, 0)
    assert pol.gate([*old, new], 4, 4) == set()  # and its own losing rounds stop it
    assert isinstance(pol.state[7], SpecState) and pol.state[7].rounds == 12


def test_greedy_requests_verify_the_best_length_past_a_step_in_the_cost_curve():
    """A one-token decode step is cheaper than any verification step (a step in the curve): the first draft token
    alone does not pay, several do. Greedy requests (lossless whatever is verified) get the best length; a
    sampled request keeps the stopping rule, and its length does not change with a greedy request beside it."""
    step = LinearCost()
    step.verify = lambda b: 1.0 if b <= 1 else 1.35 + 0.01 * (b - 2)
    surv = [0.3, 0.2, 0.15, 0.1, 0.05, 0.02, 0.01]
    pol = DraftPolicy(step, max_len=7)
    assert pol.lengths([(7, surv, 1.0, 0)], 1, 1) == [0]  # the stopping rule alone
    assert pol.lengths([(7, surv, 1.0, 0)], 1, 1, greedy=[False]) == [0]
    best = max(range(8), key=lambda m: (1 + sum(surv[:m])) / step.verify(1 + m))
    assert best > 0
    assert pol.lengths([(7, surv, 1.0, 0)], 1, 1, greedy=[True]) == [best]
    two = [(7, surv, 1.0, 0), (7, surv, 1.0, 0)]
    mixed = pol.lengths(two, 2, 2, greedy=[True, False])
    assert mixed[1] == pol.lengths(two, 2, 2)[1] and mixed[0] >= mixed[1]


def test_guard_stops_drafting_that_delivers_fewer_tokens_per_second():
    """The cost model says draft (free drafting, tau 3); the steps say otherwise: 12 tokens in 0.2 s with
    drafters against 8 in 0.1 s without. Every 4th step measures the other kind."""
    from dspark.scheduler.draft_policy import SpecState

    def run(drafted_tokens):
        pol = DraftPolicy(LinearCost(), max_len=4, probe_every=10**6, guard_every=4)
        for sid in range(8):
            pol.state[sid] = SpecState(3.0, 4.0, rounds=1)
        cands = [(sid, True, 4, 1.0) for sid in range(8)]
        kinds = []
        for _ in range(40):
            chosen = pol.gate(cands, 8, 8)
            kinds.append(bool(chosen))
            pol.observe_step(drafted_tokens if chosen else 8, 0.2 if chosen else 0.1)
        return pol, kinds

    pol, kinds = run(12)
    assert kinds[:4] == [True, True, True, False]  # the model's choice, with every 4th step plain to measure
    assert kinds[-8:] == [False, False, False, True] * 2  # measured worse: plain, every 4th step drafting
    assert pol.drafting_pays(8) is False and pol.drafting_pays(5) is False and pol.drafting_pays(4) is None
    assert pol.drafting_pays(8, greedy=False) is None  # greedy drafters vouch for (or against) greedy ones only
    rates, = pol.guard_state().values()  # what /metrics shows, under the band's label
    assert list(pol.guard_state()) == ["5-8"] and rates["sampled"] is None
    assert rates["greedy"] == pytest.approx(60.0) and rates["false"] == pytest.approx(80.0)
    pol, kinds = run(20)  # 100 tokens/s with drafters: drafting goes on
    assert pol.drafting_pays(8) is True and kinds[-8:] == [True, True, True, False] * 2


def test_probe_only_steps_teach_the_guard_nothing():
    from dspark.scheduler.draft_policy import SpecState

    pol = DraftPolicy(LinearCost(per_request=10.0), max_len=4, probe_every=10**6)  # drafting never pays
    pol.state[1] = SpecState(2.0, 4.0, rounds=1)
    assert pol.gate([(1, True, 4, 1.0), (2, True, 4, 1.0)], 2, 2) == {2}  # 2's first round: a probe
    pol.observe(2, True, 4, 1)
    pol.observe_step(3, 0.1)
    assert pol.step_rate == {}
    assert pol.gate([(1, True, 4, 1.0), (2, True, 4, 1.0)], 2, 2) == set()
    pol.observe_step(2, 0.1, decode_only=False)  # a step with a prompt chunk: no rate either
    assert pol.step_rate == {}
    assert pol.gate([(1, True, 4, 1.0), (2, True, 4, 1.0)], 2, 2) == set()
    pol.observe_step(2, 0.1)
    assert pol.step_rate == {(1, None): [1, 20.0]}


# -- the per-request realized-rate guard: synthetic steps at batch 1 ------------------------------------------------
def drive(pol, sid, greedy, steps, accepted, draft_s=0.15, plain_s=0.1):
    """`steps` decode steps of request `sid` alone: each round it drafts accepts `accepted` of 4 tokens; a step
    with a drafter takes draft_s, a plain one plain_s. Returns whether it drafted, per step."""
    drafted = []
    for _ in range(steps):
        chosen = pol.gate([(sid, greedy, 4, 1.0)], 1, 1)
        if chosen:
            pol.observe(sid, greedy, 4, accepted)
        pol.observe_step(1 + accepted if chosen else 1, draft_s if chosen else plain_s)
        drafted.append(bool(chosen))
    return drafted


def optimistic():
    """A cost model that says drafting is nearly free (as a CPU's can be wrong about the drafter's forward)."""
    return DraftPolicy(LinearCost(per_token=0.01, per_request=0.0), max_len=4)


def test_a_request_slower_with_drafts_stops_within_a_few_rounds_and_is_reprobed_with_backoff():
    """Sampled, nothing accepted, drafting steps 1.5x a plain step: 1 token per 0.15 s against 1 per 0.1 s.
    The cost model keeps saying draft (tau still above 1); the request's own realized rate stops it."""
    pol = optimistic()
    drafted = drive(pol, 1, False, 200, accepted=0)
    # its first round (a probe), two more, then one plain step for the band's baseline: benched from there
    assert drafted[:4] == [True, True, True, False]
    assert pol.state[1].benched and pol.plain_seconds[0] == pytest.approx(0.1)
    probes = [i for i, d in enumerate(drafted) if d][3:]
    assert probes and probes[0] >= 16  # no drafting for the next 16 steps
    gaps = [b - a for a, b in zip([2, *probes], probes)]
    assert gaps[:3] == [16, 32, 64]  # re-probed one round at a time, backing off while it still does not pay
    assert sum(drafted) <= 3 + 4


def test_a_request_whose_drafting_pays_keeps_drafting_whatever_its_class_measured():
    """A sampled request accepting 3 of 4 (4 tokens per 0.15 s against 1 per 0.1 s) drafts on all but the band's
    baseline steps, even after another sampled request's losing rounds (unchecked by its own guard here) made
    the band's sampled verdict negative: its own rounds outrank its class's."""
    pol = optimistic()
    pol.guard_rounds = 10**6  # request 1 never gets a verdict of its own: only the band guard sees it lose
    drive(pol, 1, False, 100, accepted=0)
    assert pol.drafting_pays(1, greedy=False) is False
    pol.forget(1)
    pol.guard_rounds = 3
    drafted = drive(pol, 2, False, 64, accepted=3)
    assert sum(drafted) >= 64 - 64 // pol.guard_every - 1 and not pol.state[2].benched
    assert drafted[0] and all(drafted[1:8])


def test_greedy_traffic_that_pays_does_not_vouch_for_sampled_traffic_that_does_not():
    """T=0 requests gaining 4 tokens a round, then T=1 requests gaining none (drafting steps 1.5x plain): each
    sampled request stops drafting within its first few rounds (later, at most a probe or a measuring round now and
    then)."""
    pol = optimistic()
    for sid in range(3):
        assert sum(drive(pol, sid, True, 64, accepted=3)) >= 56  # greedy, paying: drafts nearly every step
        pol.forget(sid)
    assert pol.drafting_pays(1, greedy=True)
    for sid in range(10, 14):
        drafted = drive(pol, sid, False, 40, accepted=0)
        assert sum(drafted[:16]) <= 3 and sum(drafted) <= 6, (sid, drafted)
        pol.forget(sid)
