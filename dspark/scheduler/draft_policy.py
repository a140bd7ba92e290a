"""How many draft tokens each request verifies this step (DSpark paper, sec. 3.2.2), and who drafts at all.

A step that verifies lengths l_r costs B = base + sum(l_r) batch tokens and is expected to commit
C + sum_r sum_{j<=l_r} a_{r,j} tokens, where C counts the requests that commit a token anyway and a_{r,j} is the
survival of draft position j (the running product of the confidence head's calibrated scores; for drafters
without one, of per-position acceptance rates measured online). The policy admits (r, j) pairs in descending
w_r * a_{r,j} while Theta = committed * SPS(B) still grows, and stops at the first pair that does not pay.
w_r is the request's SLO weight (> 1 behind its tokens/s target, < 1 far ahead of it).

Lossless: a_{r,j} depends only on tokens before x_j, and a_{r,j} is non-increasing in j, so whether x_j is
verified is decided before x_j is looked at (a stopping time), exactly as with a fixed confidence cut.

Before drafting, the same objective decides who drafts at all, from each request's running estimate of
tokens committed per round and the measured drafter cost: on a busy server, or where drafts rarely survive
(e.g. sampling at temperature 1 with a weak drafter), the requests that gain least decode plainly. Every request
drafts once on its own (a first-round probe, whatever its class's estimate), so what it asks for (code, chat,
math) decides for it rather than what the requests before it asked. A request left out drifts back toward its
class's estimate; a class that has not drafted for `probe_every` steps sends one request through a drafting round
(a probe), so the estimates follow the workload at a bounded cost; while probes keep showing that drafting does
not pay, they back off to one in 16 x `probe_every` steps.

The cost model can be wrong (on a 2-core CPU it misjudges verify rows by tens of percent under load, and a drafting
step's drafter forward more), so the policy also checks itself against what steps deliver, at two levels.

Per request (the per-request guard): each request keeps its own realized tokens per drafting round (1 + accepted)
and seconds of the steps it drafted in (running mean over its first rounds, then an EMA), and the band's plain-step
seconds (a decode-only step where nobody drafted commits one token per request). After `guard_rounds` measured
rounds, a request whose realized rate is below plain, tokens / drafting seconds < 1 / plain seconds, is benched:
it stops drafting whatever the cost model says, and drafts one re-probe round after `reprobe_every` steps, then 2x,
4x ... that (up to 16 x `reprobe_every`) while it still does not pay; a re-probe that lifts its rate back to plain
un-benches it. A request that pays keeps drafting as the cost model chooses. This is what keeps batch 1 from
being slower than no speculation where drafts rarely survive (sampling at T=1 on chat): it reacts within a few
steps, per request, so a request whose content pays (code) is not held back by one whose content does not (chat).

Per band of batch size (1, 2, 3-4, 5-8, ...) and class (greedy or sampled drafters; steps with both teach no
drafting rate, so T=0 traffic never vouches for T=1 traffic): the running tokens per second of decode steps with
drafters and of steps where nobody drafted. Where the class's drafting rate is the lower, its requests draft only
every `guard_every`-th step of the band (to keep measuring), unless their own rounds so far (even one) show that
they pay: a request's own evidence outranks its class's. Otherwise
every `guard_every`-th step of the band runs plain (to keep the baseline measured; also run at once when a request
awaits its verdict and the band has no plain measurement yet). Steps that only probe, and steps with prefill chunks,
teach neither rate; probes do teach the probed requests' own rates.

Lossless either way: whether a request drafts is decided before its drafts exist, from past rounds only.
"""

from __future__ import annotations

from dataclasses import dataclass

from dspark.scheduler.cost_model import StepCostModel


@dataclass
class SpecState:
    tau: float  # running mean of tokens committed per drafting round (bonus included), EMA after a few rounds
    length: float  # EMA of draft tokens verified per round
    idle: int = 0  # steps since it last drafted
    rounds: int = 0  # drafting rounds observed
    # the per-request guard: rounds measured, running tokens per drafting round and seconds per drafting step
    measured: int = 0
    got: float = 0.0
    spent: float = 0.0
    benched: bool = False  # its realized rate fell below plain: drafts only its re-probes
    backoff: int = 0  # steps from one re-probe to the next (0: never benched)


class DraftPolicy:
    def __init__(self, cost: StepCostModel, max_len: int, min_len: int = 0, adaptive: bool = True,
                 probe_every: int = 32, ema: float = 0.2, guard_every: int = 16, guard_rounds: int = 3,
                 reprobe_every: int = 16):
        self.cost = cost
        self.max_len, self.min_len = max_len, min(min_len, max_len)
        self.adaptive = adaptive
        self.probe_every = probe_every
        self.ema = ema
        self.state: dict[int, SpecState] = {}
        self.class_idle = {True: 0, False: 0}  # steps since a request of the class last drafted
        self.probing: set[int] = set()  # this step's probes: they verify at least one token, so they teach
        self.probe_interval = {True: probe_every, False: probe_every}  # backs off while probes keep failing
        # Per class (greedy or sampled): running tau and per-position acceptance rates, priors for new requests.
        # The starting values are optimistic guesses worth one round: the class's first rounds replace them by
        # a running mean (learning rate 1 / (rounds + 1), down to ema / 4), so a weak drafter stops being
        # credited within a few rounds instead of a few dozen.
        self.class_rounds = {True: 0, False: 0}
        self.prior_tau = {True: 1.0 + max_len / 2, False: 1.0 + max_len / 4}
        self.accept_rate = {True: [0.7] * max_len, False: [0.5] * max_len}
        # Online recalibration of the confidence head per class and position: its offline calibration was fitted
        # at one temperature, and acceptance differs a lot between greedy and sampled requests.
        self.mean_conf = {True: [0.7] * max_len, False: [0.5] * max_len}
        # The band guard: (band, drafters' class: True greedy, False sampled, None plain step) -> [steps seen,
        # running tokens/s]; steps per band; running seconds of plain decode steps per band (per-request baseline).
        self.guard_every = guard_every
        self.step_rate: dict[tuple[int, bool | None], list[float]] = {}
        self.band_steps: dict[int, int] = {}
        self.plain_seconds: dict[int, float] = {}
        self.step_kind: tuple[int, bool | None] | None = None  # this step's (band, class), None: teaches no rate
        # The per-request guard: rounds before a verdict, first re-probe interval; this step's band and rounds.
        self.guard_rounds, self.reprobe_every = guard_rounds, reprobe_every
        self.step_band = 0
        self.step_rounds: list[tuple[int, int]] = []  # (seq_id, tokens committed) of this step's drafting rounds

    @staticmethod
    def band(requests: int) -> int:
        return max(requests - 1, 0).bit_length()  # 1 | 2 | 3-4 | 5-8 | 9-16 | ...

    @staticmethod
    def band_label(band: int) -> str:
        lo, hi = (1 << (band - 1)) + 1 if band else 1, 1 << band
        return str(hi) if lo == hi else f"{lo}-{hi}"

    def guard_state(self) -> dict[str, dict[str, float | None]]:
        """Per band label: running tokens/s of plain steps ("false") and of steps with greedy / sampled drafters."""
        out = {}
        for b in sorted({b for b, _ in self.step_rate}):
            rates = {name: self.step_rate.get((b, cls)) for name, cls in
                     (("false", None), ("greedy", True), ("sampled", False))}
            out[self.band_label(b)] = {name: r and r[1] for name, r in rates.items()}
        return out

    def drafting_pays(self, requests: int, greedy: bool = True) -> bool | None:
        """Did steps with drafters of the class deliver at least the tokens/s of plain steps, at this batch size?
        None: not enough steps of both kinds yet (4 each)."""
        return self._band_pays(self.band(requests), greedy)

    def _band_pays(self, b: int, greedy: bool) -> bool | None:
        d, p = self.step_rate.get((b, greedy)), self.step_rate.get((b, None))
        if d is None or p is None or d[0] < 4 or p[0] < 4:
            return None
        return d[1] >= p[1]

    def request_pays(self, st: SpecState, b: int, rounds: int | None = None) -> bool | None:
        """The per-request guard's verdict: its tokens per second of drafting steps against one token per plain
        step of its band. None: fewer than `rounds` (default `guard_rounds`) rounds measured, or no plain step
        measured yet."""
        plain = self.plain_seconds.get(b)
        if st.measured < (self.guard_rounds if rounds is None else rounds) or plain is None:
            return None
        return st.got * plain >= st.spent

    def _judge(self, st: SpecState, pays: bool | None) -> None:
        """Bench a request measured as slower than plain, backing its re-probes off; un-bench one that pays."""
        if pays is False:  # benched now, or a re-probe that did not pay: wait twice as long for the next
            st.backoff = min(2 * st.backoff, 16 * self.reprobe_every) if st.backoff else self.reprobe_every
            st.benched = True
        elif pays:
            st.benched = False

    def observe_step(self, committed: int, seconds: float, decode_only: bool = True) -> None:
        """The whole step's result (drafting, forward, acceptance): tokens committed and wall seconds. A step
        with prompt chunks (`decode_only` False) teaches no rate: its seconds went partly to tokens not output."""
        kind, self.step_kind = self.step_kind, None
        rounds, self.step_rounds = self.step_rounds, []
        if not decode_only or seconds <= 0:
            return
        for sid, got in rounds:  # the drafting requests' own rates (probes included)
            st = self.state.get(sid)
            if st is None:
                continue
            st.measured += 1
            r = 0.5 if st.benched else max(1 / st.measured, 0.25)  # a re-probe weighs half: recovers in 1-2
            st.got, st.spent = (1 - r) * st.got + r * got, (1 - r) * st.spent + r * seconds
            self._judge(st, self.request_pays(st, self.step_band))
        if kind is None:
            return
        rec = self.step_rate.setdefault(kind, [0, 0.0])
        rec[0] += 1
        r = max(1 / rec[0], 0.1)
        rec[1] = (1 - r) * rec[1] + r * committed / seconds
        if kind[1] is None:  # a plain decode step: one token per request
            b = kind[0]
            self.plain_seconds[b] = seconds if b not in self.plain_seconds else \
                (1 - r) * self.plain_seconds[b] + r * seconds

    # -- who drafts ---------------------------------------------------------------------------------------------
    def gate(self, cands: list[tuple[int, bool, int, float]], base_tokens: int, committing: int) -> set[int]:
        """cands: (seq_id, greedy, most draft tokens, SLO weight). Returns the seq_ids that draft this step."""
        if not self.adaptive:
            return {sid for sid, _, k, _ in cands if k > 0}
        b = self.step_band = self.band(len(cands))
        self.step_rounds = []
        scored, verdict = [], {}
        greedy_of = {sid: greedy for sid, greedy, _, _ in cands}
        for sid, greedy, k, w in cands:
            st = self.state.setdefault(sid, SpecState(self.prior_tau[greedy], float(self.max_len)))
            if self.request_pays(st, b) is False and not st.benched:  # the band's baseline came after its rounds
                self._judge(st, False)
            verdict[sid] = self.request_pays(st, b, rounds=1)  # its own evidence so far (None: none yet)
            if k > 0:
                scored.append((w * (st.tau - 1.0), sid, min(k, st.length), st))
        scored.sort(key=lambda x: -x[0])
        chosen: set[int] = set()
        self.probing = set()
        gain, tokens = 0.0, float(base_tokens)
        best = committing / max(self.cost.verify(tokens), 1e-9)
        for g, sid, length, st in scored:
            if st.benched:  # measured as slower than plain: only its re-probes draft (below)
                continue
            t = self.cost.verify(tokens + length) + self.cost.draft(len(chosen) + 1)
            theta = (committing + gain + g) / max(t, 1e-9)
            if theta <= best:
                break
            chosen.add(sid)
            gain, tokens, best = gain + g, tokens + length, theta
        tick = self.band_steps[b] = self.band_steps.get(b, 0) + 1
        check = tick % self.guard_every == 0
        # the band guard, per class, for requests whose own rounds do not (yet) show that they pay: a class measured
        # as worse drafts only every guard_every-th step; otherwise every guard_every-th step runs plain
        losing = {sid for sid in chosen if not verdict[sid] and self._band_pays(b, greedy_of[sid]) is False}
        chosen -= set() if check else losing
        need_baseline = b not in self.plain_seconds and any(
            st.measured >= self.guard_rounds for _, _, _, st in scored)
        plain = bool(chosen) and (need_baseline or check and not losing)
        if plain:  # a measured plain step: no probe in it either
            self.step_kind = (b, None)
            for _, _, _, st in scored:
                st.idle += 1
            return set()
        classes = {greedy_of[sid] for sid in chosen}  # none: a plain step; both: teaches no drafting rate
        self.step_kind = None if len(classes) > 1 else (b, classes.pop() if classes else None)
        gated = set(chosen)
        for _, sid, _, st in scored:
            if sid not in chosen and st.rounds == 0:  # its first drafting round, to learn from its own content
                chosen.add(sid)
                self.probing.add(sid)
            elif st.benched and st.idle + 1 >= st.backoff:  # a benched request's re-probe, backing off
                chosen.add(sid)
                self.probing.add(sid)
        for _, sid, _, st in scored:
            if sid in chosen:
                st.idle = 0
            else:  # a few bad rounds should not bench a request for long: drift back to its class's estimate
                st.idle += 1
                st.tau += 0.02 * (self.prior_tau[greedy_of[sid]] - st.tau)
        # Probe: a class (greedy / sampled) that has not drafted for `probe_every` steps sends its longest-idle
        # request through one drafting round, so the class's estimate follows a changing workload. One probe per
        # class per `probe_every` steps bounds the cost whatever the concurrency. Benched requests have their own
        # re-probes and are not picked.
        for greedy in (True, False):
            members = [(st.idle, sid) for _, sid, _, st in scored if greedy_of[sid] == greedy and not st.benched]
            if not members:
                continue
            if any(greedy_of[sid] == greedy for sid in gated):
                self.class_idle[greedy] = 0
                self.probe_interval[greedy] = self.probe_every
                continue
            self.class_idle[greedy] += 1
            if any(greedy_of[sid] == greedy for sid in self.probing):  # a first round teaches the class this step
                self.class_idle[greedy] = 0
            elif self.class_idle[greedy] >= self.probe_interval[greedy]:
                sid = max(members)[1]
                chosen.add(sid)
                self.probing.add(sid)
                self.state[sid].idle = 0
                self.class_idle[greedy] = 0
                # still not worth drafting: probe half as often next time, down to 1 in 16 x probe_every steps
                self.probe_interval[greedy] = min(2 * self.probe_interval[greedy], 16 * self.probe_every)
        if chosen != gated and not gated:
            self.step_kind = None  # probes only: a step that measures neither drafting nor plain decoding
        return chosen

    # -- how long ---------------------------------------------------------------------------------------------
    def survival(self, greedy: bool, confidence: list[float] | None, n: int) -> list[float]:
        if confidence is None:
            rates = self.accept_rate[greedy][:n]
        else:
            obs, pred = self.accept_rate[greedy], self.mean_conf[greedy]
            rates = [min(1.0, c * obs[j] / max(pred[j], 1e-3)) for j, c in enumerate(confidence[:n])]
        out, a = [], 1.0
        for c in rates[:n]:
            a *= c
            out.append(a)
        return out

    def lengths(self, drafts: list[tuple[int, list[float], float, int]], base_tokens: int,
                committing: int, greedy: list[bool] | None = None) -> list[int]:
        """drafts: (tokens drafted, survival per position, SLO weight, fewest to verify) per drafting request
        -> how many to verify. The fewest is fixed before drafting (min_draft_len, or 1 for a probe).

        `greedy[r]`: request r decodes greedily. Its committed tokens are the target's argmax chain whatever is
        verified, so its length need not be a stopping time: after the rule stops, greedy requests go on through
        their remaining pairs (same order) to the best Theta. That matters where the cost curve has a step: on a
        CPU a one-token decode step runs a lighter path than a verification step (e.g. 63 vs 85 ms for 1 vs 2
        batch tokens on a 2-core EPYC), so the first draft token alone rarely pays while several together do;
        the stopping rule alone then verifies nothing and drafting is wasted."""
        if not self.adaptive:
            return [n for n, _, _, _ in drafts]
        out = [min(max(self.min_len, m), n) for n, _, _, m in drafts]
        tokens = base_tokens + sum(out)
        gain = sum(sum(a[:m]) * w for (_, a, w, _), m in zip(drafts, out))
        pairs = sorted(((w * a[j], j, r) for r, (n, a, w, _) in enumerate(drafts) for j in range(out[r], n)),
                       key=lambda x: (-x[0], x[1]))
        theta = (committing + gain) / max(self.cost.verify(tokens), 1e-9)
        stopped = len(pairs)
        for i, (wa, j, r) in enumerate(pairs):
            if j != out[r]:
                continue  # only extends a prefix (ties can list a later position first)
            new = (committing + gain + wa) / max(self.cost.verify(tokens + 1), 1e-9)
            if new <= theta:
                stopped = i
                break
            out[r], gain, tokens, theta = j + 1, gain + wa, tokens + 1, new
        if greedy is not None and any(greedy):
            ext = list(out)
            for wa, j, r in pairs[stopped:]:
                if not greedy[r] or j != ext[r]:
                    continue
                ext[r], gain, tokens = j + 1, gain + wa, tokens + 1
                new = (committing + gain) / max(self.cost.verify(tokens), 1e-9)
                if new > theta:
                    out, theta = list(ext), new
        return out

    # -- learning from verification -----------------------------------------------------------------------------
    def observe(self, seq_id: int, greedy: bool, verified: int, accepted: int,
                confidence: list[float] | None = None) -> None:
        """One round's result: `verified` draft tokens scored, `accepted` of them kept (plus the bonus)."""
        e = self.ema
        st = self.state.setdefault(seq_id, SpecState(self.prior_tau[greedy], float(self.max_len)))
        st.rounds += 1
        self.step_rounds.append((seq_id, 1 + accepted))  # timed by observe_step, for the per-request guard
        r = max(1 / (st.rounds + 1), e)  # the class's estimate it started from counts as one round
        st.tau = (1 - r) * st.tau + r * (1 + accepted)
        st.length = (1 - e) * st.length + e * max(verified, 1)
        self.class_rounds[greedy] += 1
        c = max(1 / (self.class_rounds[greedy] + 1), e / 4)
        self.prior_tau[greedy] = (1 - c) * self.prior_tau[greedy] + c * (1 + accepted)
        rates = self.accept_rate[greedy]
        for j in range(min(verified, accepted + 1)):  # positions reached: accepted, or the first rejected
            rates[j] = (1 - c) * rates[j] + c * (1.0 if j < accepted else 0.0)
            if confidence is not None:
                self.mean_conf[greedy][j] = (1 - c) * self.mean_conf[greedy][j] + c * confidence[j]

    def forget(self, seq_id: int) -> None:
        self.state.pop(seq_id, None)
