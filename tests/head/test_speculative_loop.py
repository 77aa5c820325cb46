"""The head's speculative loops (speculative, pipeinfer) against a simulated target and draft: no MPI, no llama.cpp.

The simulated target computes a deterministic next token from the KV cache it keeps (committed
sequence only), answering each run on the next poll; the simulated draft guesses the target's
continuation right with a fixed probability and answers faster than the target. Checks that every feeding strategy of pipeinfer and
synchronous speculation decide the target's own tokens, and that joint feeding saves runs.
"""

from collections import deque
from functools import partial

import numpy as np
import pytest
from test_speculation import target_continuation, target_next

from pipeinfer_cpu.head import pipeinfer, speculative
from pipeinfer_cpu.head.executors import RunResult
from pipeinfer_cpu.head.session import Context
from pipeinfer_cpu.head.specdecode import Request, SpecSettings
from pipeinfer_cpu.head.speculation import SpeculationSwitch
from pipeinfer_cpu.llama.kvcache import COMMITTED_SEQ
from pipeinfer_cpu.sampling import SamplingConfig
from pipeinfer_cpu.wire.drafts import DraftReply
from pipeinfer_cpu.wire.runs import KvKind, Output


class SimulatedTarget:
    """An Executor: runs computed in launch order; a result shows up `delay` polls after the one
    before it (the draft answers on the next poll, so the draft is the faster of the two)."""

    def __init__(self, delay: int = 3) -> None:
        self.cache: dict[int, int] = {}
        self.results: deque[RunResult] = deque()
        self.runs = 0
        self.delay = delay
        self.polls = 0

    def launch(self, run) -> None:
        for op in run.kv_ops:
            assert op.kind == KvKind.RM and op.a == COMMITTED_SEQ
            for position in [p for p in self.cache if p >= op.p0]:
                del self.cache[position]
        if run.is_ops_only:
            return
        self.runs += 1
        rows = []
        for position, seqs, token, wanted in zip(run.positions, run.seq_ids, run.tokens, run.outputs):
            assert seqs == (COMMITTED_SEQ,) and position not in self.cache
            self.cache[position] = token
            if wanted:
                rows.append(target_next([self.cache[p] for p in range(position + 1)]))
        if rows:
            self.results.append(RunResult(run.run_id, Output.ARGMAX, np.asarray(rows, dtype=np.int32)))

    def poll(self):
        self.polls += 1
        return self.results.popleft() if self.results and self.polls % self.delay == 0 else None

    def wait(self):
        return self.results.popleft()

    def cancel(self, run_ids) -> None:
        """Runs finish at launch here; stale results still arrive and must be ignored."""


class SimulatedDraft:
    """A DraftClient whose guesses are the target's own tokens with probability `p_right`."""

    def __init__(self, p_right: float, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.p_right = p_right
        self.reply: DraftReply | None = None

    def request(self, request) -> None:
        truth = target_continuation(list(request.context), request.max_new)
        tokens = tuple(t if self.rng.random() < self.p_right else 99 for t in truth)
        self.reply = DraftReply(request.request_id, tokens, (0.9,) * len(tokens))

    def poll(self):
        reply, self.reply = self.reply, None
        return reply


def generate(mode: str, strategies: tuple[str, ...], seed: int, n_new: int = 60):
    rng = np.random.default_rng(seed)
    prompt = [int(t) for t in rng.integers(0, 50, size=8)]
    target = SimulatedTarget()
    switch = SpeculationSwitch(strategies=strategies, strategy=strategies[0])
    request = Request(tuple(prompt), n_new, SamplingConfig(), lambda t: False, lambda t: None, lambda: False)
    loop = speculative.generate if mode == "speculative" else partial(pipeinfer.generate, switch=switch)
    settings = SpecSettings(mode, draft_max=4)
    generation, _ = loop(Context(target), SimulatedDraft(0.6, seed), settings, request, 64, 5.0)
    return list(generation.tokens), target_continuation(prompt, n_new), target.runs


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("mode, strategies", [("pipeinfer", ("eager",)), ("pipeinfer", ("joint",)),
                                              ("pipeinfer", ("off",)), ("pipeinfer", ("eager", "joint", "off")),
                                              ("speculative", ("eager",))])
def test_every_strategy_decides_the_targets_own_tokens(seed, mode, strategies):
    tokens, truth, _ = generate(mode, strategies, seed)
    assert tokens == truth


def test_joint_feeding_sends_fewer_runs_than_eager():
    eager = sum(generate("pipeinfer", ("eager",), seed)[2] for seed in range(10))
    joint = sum(generate("pipeinfer", ("joint",), seed)[2] for seed in range(10))
    assert joint < eager
