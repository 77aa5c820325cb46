"""The speculation state machine against a simulated target and pipeline (no MPI, no llama.cpp).

The simulated stages keep a KV cache as {position: token}, apply KV operations in run order,
skip cancelled runs, and compute a deterministic 'target' next token from the cache contents.
"""

from collections import deque
from itertools import count

import numpy as np
import pytest

from pipeinfer_cpu.protocol import KvKind
from pipeinfer_cpu.speculation import Chain, DraftPolicy


def target_next(context: list[int]) -> int:
    return (sum(context) * 31 + len(context) * 7) % 50


def target_continuation(prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(target_next(tokens))
    return tokens[len(prompt):]


class SimulatedPipeline:
    """Runs computed strictly in order; a run's row at position p sees the cache up to p."""

    def __init__(self) -> None:
        self.cache: dict[int, int] = {}
        self.queue: deque = deque()
        self.cancelled: set[int] = set()

    def launch(self, launch) -> None:
        self.queue.append(launch)

    def compute_next(self):
        while self.queue:
            run = self.queue.popleft()
            for op in run.kv_ops:
                assert op.kind == KvKind.RM
                for position in [p for p in self.cache if p >= op.p0]:
                    del self.cache[position]
            if run.run_id in self.cancelled:
                continue  # skipped: writes nothing to the cache
            rows = []
            for i, token in enumerate(run.tokens):
                position = run.start + i
                assert position not in self.cache, "a stale KV entry was never removed"
                self.cache[position] = token
                if run.outputs[i]:
                    context = [self.cache[p] for p in range(position + 1)]
                    rows.append(target_next(context))
            if any(run.outputs):
                return run.run_id, rows
        return None


def drive(seed: int, n_new: int = 30) -> tuple[list[int], list[int], dict[int, int]]:
    rng = np.random.default_rng(seed)
    prompt = [int(t) for t in rng.integers(0, 50, size=int(rng.integers(1, 12)))]
    truth = target_continuation(prompt, n_new + 20)
    ids = count(1)
    chain = Chain.for_prompt([], prompt, len(prompt) + n_new, lambda: next(ids))
    pipe = SimulatedPipeline()
    p_right = rng.uniform(0, 1)
    while not chain.done:
        while chain.needs_feed():
            pipe.launch(chain.feed_decided(4))
        if len(chain.inflight) < 3 and rng.random() < 0.7:
            base = len(chain.fed)
            guesses = [truth[base - len(prompt) + i] if base - len(prompt) + i < len(truth) and rng.random() < p_right
                       else 99 for i in range(int(rng.integers(1, 5)))]
            on_track = chain.fed == (prompt + truth)[:base]
            launch = chain.speculate(guesses if on_track else [98] * len(guesses), chain.epoch, base)
            if launch is not None:
                pipe.launch(launch)
        result = pipe.compute_next()
        if result is None:
            continue
        run_id, rows = result
        verdict = chain.on_result(run_id, lambda row: rows[row])
        if verdict is not None:
            pipe.cancelled.update(verdict.cancelled)
    cancelled, ops = chain.finish()
    pipe.cancelled.update(cancelled)
    from pipeinfer_cpu.speculation import Launch

    pipe.launch(Launch(next(ids), len(chain.fed), (), (), 0, ops))
    while pipe.compute_next() is not None:
        pass
    return chain.accepted[len(prompt):], truth[:n_new], {p: pipe.cache[p] for p in sorted(pipe.cache)}


@pytest.mark.parametrize("seed", range(200))
def test_random_acceptance_patterns_decide_the_targets_own_tokens(seed):
    decided, truth, cache = drive(seed)
    assert decided == truth
    # after the request, the cache holds exactly the committed tokens (all but the last decided one)
    assert sorted(cache) == list(range(len(cache)))


def test_rejection_cancels_later_runs_and_queues_kv_removal():
    ids = count(1)
    chain = Chain.for_prompt([], [1, 2, 3], 20, lambda: next(ids))
    feed = chain.feed_decided(8)
    chain.on_result(feed.run_id, lambda row: 7)  # decides 7
    first = chain.speculate([8, 9], chain.epoch, len(chain.fed))
    assert first is None  # 7 is decided but not fed yet: nothing may be speculated past it
    feed = chain.feed_decided(8)
    spec1 = chain.speculate([8, 9], chain.epoch, len(chain.fed))
    spec2 = chain.speculate([10], chain.epoch, len(chain.fed))
    verdict = chain.on_result(feed.run_id, lambda row: 5)  # the target says 5, the draft said 8
    assert verdict.decided == (5,) and verdict.rejected
    assert set(verdict.cancelled) == {spec1.run_id, spec2.run_id}
    assert chain.fed == [1, 2, 3, 7]
    follow = chain.feed_decided(8)
    assert follow.tokens == (5,) and follow.kv_ops[0].kind == KvKind.RM and follow.kv_ops[0].p0 == 4
    assert chain.on_result(spec1.run_id, lambda row: 0) is None  # a stale result is ignored


def test_a_draft_made_before_a_decided_token_is_realigned():
    ids = count(1)
    chain = Chain.for_prompt([], [1, 2], 10, lambda: next(ids))
    feed = chain.feed_decided(8)
    base, epoch = len(chain.fed), chain.epoch
    chain.on_result(feed.run_id, lambda row: 4)
    chain.feed_decided(8)  # 4 is fed before the draft's answer comes back
    launch = chain.speculate([4, 5, 6], epoch, base)  # the draft had guessed 4 right
    assert launch.tokens == (5, 6) and launch.start == 3
    assert chain.speculate([9, 9], chain.epoch, base) is None  # a wrong guess for 4: useless


def test_policy_adapts_run_length_and_cutoff():
    policy = DraftPolicy(draft_max=8, p_accept=0.4, alpha=0.6)
    assert policy.run_length() == 3  # 0.6^3 = 0.22 >= 0.15 > 0.6^4
    for _ in range(30):
        policy.observe(4, 4, rejected=False)
    assert policy.run_length() == 8 and policy.p_accept < 0.4
    for _ in range(30):
        policy.observe(0, 1, rejected=True)
    assert policy.run_length() == 1 and policy.p_accept > 0.4
    with pytest.raises(ValueError, match="draft-max"):
        DraftPolicy(draft_max=0)


def test_switch_tries_both_choices_then_keeps_the_faster_and_still_explores():
    from pipeinfer_cpu.speculation import SpeculationSwitch

    switch = SpeculationSwitch(window=16, explore_every=4)
    assert switch.speculating
    switch.observe(16, 0.4)  # speculating: 40 tok/s
    assert not switch.speculating  # tries the other choice once
    switch.observe(16, 0.2)  # not speculating: 80 tok/s
    choices = []
    for _ in range(8):
        choices.append(switch.speculating)
        switch.observe(16, 0.2 if not switch.speculating else 0.4)
    assert choices.count(False) > choices.count(True) >= 1  # mostly the faster, sometimes the other
    switch.observe(0, 0.0)  # an empty window changes nothing
    assert switch.windows == 10
