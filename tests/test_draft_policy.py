"""The load- and SLO-aware draft policy and the step cost model, on synthetic cost curves."""

from scheduler.cost_model import CostTable, StepCostModel, buckets_up_to
from scheduler.draft_policy import DraftPolicy


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

    from engine.block_manager import BlockManager
    from engine.sampling import SamplingParams, make_generator
    from engine.sequence import Sequence
    from scheduler.scheduler import Scheduler

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
