"""The speculation state machine against a simulated target and pipeline (no MPI, no llama.cpp).

The simulated stages keep a KV cache as {position: token}, apply KV operations in run order,
skip cancelled runs, and compute a deterministic 'target' next token from the cache contents.
"""

from collections import deque
from itertools import count

import numpy as np
import pytest

from pipeinfer_cpu.head.speculation import MAX_BRANCHES_PER_RUN, Branch, Chain, DraftPolicy, Launch, branch_candidates
from pipeinfer_cpu.llama.kvcache import COMMITTED_SEQ
from pipeinfer_cpu.wire.runs import KvKind, KvOp


def target_next(context: list[int]) -> int:
    return (sum(context) * 31 + len(context) * 7) % 50


def target_continuation(prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(target_next(tokens))
    return tokens[len(prompt):]


class SimulatedPipeline:
    """Runs computed strictly in order over a KV cache of cells (position, token, sequence ids),
    with llama.cpp's rules: a row attends to the cells of its first sequence id up to its position,
    CP tags cells with one more sequence, RM untags them and frees cells left with none."""

    def __init__(self) -> None:
        self.cells: list[tuple[int, int, set[int]]] = []
        self.queue: deque = deque()
        self.cancelled: set[int] = set()

    def launch(self, launch) -> None:
        self.queue.append(launch)

    def apply(self, op) -> None:
        inside = lambda pos: (op.p0 < 0 or pos >= op.p0) and (op.p1 < 0 or pos < op.p1)  # noqa: E731
        for pos, _, seqs in self.cells:
            if op.kind == KvKind.RM and inside(pos):
                seqs.discard(op.a)
            elif op.kind == KvKind.CP and op.a in seqs and inside(pos):
                seqs.add(op.b)
        self.cells = [cell for cell in self.cells if cell[2]]

    def context(self, seq: int, position: int) -> list[int]:
        seen = sorted((pos, token) for pos, token, seqs in self.cells if seq in seqs and pos <= position)
        assert [pos for pos, _ in seen] == list(range(position + 1)), f"sequence {seq} has gaps or stale cells"
        return [token for _, token in seen]

    def compute_next(self):
        while self.queue:
            run = self.queue.popleft()
            for op in run.kv_ops:
                self.apply(op)
            if run.run_id in self.cancelled:
                continue  # skipped: writes nothing to the cache
            positions, seq_ids, tokens, outputs = run.rows()
            for position, seqs, token in zip(positions, seq_ids, tokens):
                self.cells.append((position, token, set(seqs)))
            rows = [target_next(self.context(seqs[0], position))
                    for position, seqs, wanted in zip(positions, seq_ids, outputs) if wanted]
            if rows:
                return run.run_id, rows
        return None


def drive(seed: int, n_new: int = 30, trees: bool = False) -> tuple[list[int], list[int], list, Chain]:
    rng = np.random.default_rng(seed)
    prompt = [int(t) for t in rng.integers(0, 50, size=int(rng.integers(1, 12)))]
    truth = target_continuation(prompt, n_new + 20)
    ids = count(1)
    seqs = range(1, 1 + 3 * MAX_BRANCHES_PER_RUN) if trees else ()
    chain = Chain.for_prompt([], prompt, len(prompt) + n_new, lambda: next(ids), seqs)
    pipe = SimulatedPipeline()
    p_right = rng.uniform(0, 1)
    while not chain.done:
        while chain.needs_feed():
            pipe.launch(chain.feed_decided(4))
        if len(chain.inflight) < 3 and rng.random() < 0.7:
            base = len(chain.fed)
            right = [truth[base - len(prompt) + i] for i in range(4)] if base - len(prompt) + 4 <= len(truth) else [97] * 4
            guesses = [right[i] if rng.random() < p_right else 99 for i in range(int(rng.integers(1, 5)))]
            # runners-up: the right token where the guess is wrong (sometimes), else another wrong one
            alternatives = [(i, right[i] if guess != right[i] and rng.random() < 0.5 else 96)
                            for i, guess in enumerate(guesses) if rng.random() < 0.6]
            on_track = chain.fed == (prompt + truth)[:base]
            launch = chain.speculate(guesses if on_track else [98] * len(guesses), chain.epoch, base, alternatives)
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
    pipe.launch(Launch(next(ids), len(chain.fed), (), (), 0, ops))
    while pipe.compute_next() is not None:
        pass
    return chain.decided[len(prompt):], truth[:n_new], sorted((p, t, tuple(s)) for p, t, s in pipe.cells), chain


@pytest.mark.parametrize("trees", [False, True], ids=["chain", "trees"])
@pytest.mark.parametrize("seed", range(200))
def test_random_acceptance_patterns_decide_the_targets_own_tokens(seed, trees):
    decided, truth, cells, chain = drive(seed, trees=trees)
    assert decided == truth
    # after the request, the cache holds exactly the committed tokens (all but the last decided one),
    # in the committed sequence only: no branch sequence leaks a cell
    assert [(pos, seqs) for pos, _, seqs in cells] == [(pos, (COMMITTED_SEQ,)) for pos in range(len(cells))]
    assert sorted(chain.free_seqs) == (list(range(1, 1 + 3 * MAX_BRANCHES_PER_RUN)) if trees else [])


def test_a_branch_holding_the_targets_choice_is_adopted_and_decides_one_more_token():
    ids = count(1)
    chain = Chain.for_prompt([], [1, 2, 3], 20, lambda: next(ids), branch_seqs=[1, 2, 3, 4])
    chain.on_result(chain.feed_decided(8).run_id, lambda row: 7)
    feed = chain.feed_decided(8)
    # runner-up 4 at the run's first position cannot branch (an earlier run verifies it); 5 beside 9 can
    spec = chain.speculate([8, 9, 10], chain.epoch, len(chain.fed), alternatives=[(1, 5), (0, 4)])
    assert spec.branches == (Branch(position=5, token=5, seq=1),)
    assert KvOp(KvKind.CP, COMMITTED_SEQ, 1, 0, 4) in spec.kv_ops  # the branch sees the fed prefix
    # by position, the branch before the main token at its position
    assert spec.rows() == ((4, 5, 5, 6), ((0, 1), (1,), (0,), (0,)), (8, 5, 9, 10), (True,) * 4)
    assert chain.on_result(feed.run_id, lambda row: 8).decided == (8,)
    rows = {0: 5, 1: 11, 2: 0, 3: 0}  # the target says 5 after 8 (not 9), and 11 after the branch's 5
    verdict = chain.on_result(spec.run_id, lambda row: rows[row])
    assert verdict.decided == (5, 11) and verdict.rejected and verdict.branch_adopted and verdict.confirmed == 1
    assert chain.fed == [1, 2, 3, 7, 8] and chain.decided[-2:] == [5, 11]
    follow = chain.feed_decided(8)  # the branch's token is fed again, in order, with the token it decided
    assert follow.tokens == (5, 11) and follow.start == 5
    assert follow.kv_ops == (KvOp(KvKind.RM, COMMITTED_SEQ, 0, 5, -1), KvOp(KvKind.RM, 1, 0, -1, -1))
    assert 1 in chain.free_seqs


def test_branches_wait_for_free_kv_sequences():
    ids = count(1)
    chain = Chain.for_prompt([], [1, 2], 40, lambda: next(ids), branch_seqs=[1, 2, 3])
    chain.on_result(chain.feed_decided(8).run_id, lambda row: 7)
    chain.feed_decided(8)
    first = chain.speculate([1, 2, 3, 4], chain.epoch, len(chain.fed), [(1, 9), (2, 9), (3, 9)])
    second = chain.speculate([5, 6, 7], chain.epoch, len(chain.fed), [(1, 9), (2, 9)])
    assert len(first.branches) == MAX_BRANCHES_PER_RUN and len(second.branches) == 1 and not chain.free_seqs
    assert first.rows()[1] == ((0, 1, 2), (1,), (0, 2), (2,), (0,), (0,))  # main path tagged before each branch


def test_branch_candidates_keep_likely_runners_up_most_likely_first():
    assert branch_candidates((5, 6, 7, -1), (0.1, 0.3, 0.25, 0.9), p_split=0.2) == [(1, 6), (2, 7)]
    assert branch_candidates((5,), (0.9,), p_split=1.0) == []


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


def test_switch_tries_each_strategy_then_keeps_the_fastest_and_still_explores():
    from pipeinfer_cpu.head.speculation import STRATEGIES, SpeculationSwitch

    speed = {"eager": 40.0, "joint": 80.0, "off": 60.0}
    switch = SpeculationSwitch(window=16, explore_every=4)
    tried = []
    for _ in range(3):
        tried.append(switch.strategy)
        switch.observe(16, 16 / speed[switch.strategy])
    assert tried == list(STRATEGIES)  # each once, in order
    chosen = []
    for _ in range(12):
        chosen.append(switch.strategy)
        switch.observe(16, 16 / speed[switch.strategy])
    assert chosen.count("joint") >= 9 and {"eager", "off"} & set(chosen)  # mostly the fastest, sometimes another
    assert switch.speculating == (switch.strategy != "off")
    switch.observe(0, 0.0)  # an empty window changes nothing
    assert switch.windows == 15


def test_switch_explores_less_while_the_leader_holds_and_again_when_it_is_beaten():
    from pipeinfer_cpu.head.speculation import SpeculationSwitch

    speed = {"eager": 40.0, "joint": 80.0, "off": 60.0}
    switch = SpeculationSwitch(explore_every=4, max_explore_every=32)
    for _ in range(103):
        switch.observe(16, 16 / speed[switch.strategy])
    assert switch.explorations == 5  # after waits of 4, 8, 16, 32, 32 windows, not one window in four
    speed["eager"] = 200.0  # the world changed: eager is now far faster
    chosen = []
    for _ in range(100):
        chosen.append(switch.strategy)
        switch.observe(16, 16 / speed[switch.strategy])
    assert chosen[-50:].count("eager") >= 45  # found at the next exploration, then kept
def test_joint_feeding_is_only_tried_on_a_one_stage_pipeline():
    from pipeinfer_cpu.head.speculation import SpeculationSwitch

    assert "joint" in SpeculationSwitch.for_stages(1).strategies
    four = SpeculationSwitch.for_stages(4)
    seen = set()
    for _ in range(12):
        seen.add(four.strategy)
        four.observe(16, 0.3)
    assert seen == {"eager"}  # off is never tried blind with several stages: its speed comes from runs


def test_with_several_stages_off_is_read_from_one_token_runs_not_tried():
    """A decided token's one-token run costs what plain pipelining costs per token: once eager is
    slower than that, the switch turns speculation off, and tries eager again now and then."""
    from pipeinfer_cpu.head.speculation import SpeculationSwitch

    four = SpeculationSwitch.for_stages(4)
    assert (four.run_tokens, four.inflight) == (1, 4)
    chosen = []
    for _ in range(40):
        if four.speculating:
            four.observe_plain_run(0.01)  # off would give 100 tokens/s
        chosen.append(four.strategy)
        four.observe(16, 16 / (50.0 if four.strategy == "eager" else 100.0))
    assert chosen[0] == "eager" and chosen[1] == "off"
    assert 30 <= chosen.count("off") < 40  # eager re-tried now and then
    good = SpeculationSwitch.for_stages(4)
    for _ in range(40):
        good.observe_plain_run(0.01)
        good.observe(16, 16 / 150.0)  # eager beats off's 100 tokens/s: never leaves it
        assert good.strategy == "eager"
    assert SpeculationSwitch.for_stages(1).run_tokens is None
