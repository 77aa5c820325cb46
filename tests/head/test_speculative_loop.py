"""The head's speculative loops (speculative, pipeinfer) against a simulated target and draft: no MPI, no llama.cpp.

The simulated target computes a deterministic next token from the KV cache it keeps (committed
sequence only), answering each run on the next poll; the simulated draft guesses the target's
continuation right with a fixed probability and answers faster than the target. Checks that every feeding strategy of pipeinfer and
synchronous speculation decide the target's own tokens, greedy and sampled with penalties (which
look at the tokens before each position), and that joint feeding saves runs.
"""

import dataclasses
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
from pipeinfer_cpu.sampling import SamplingConfig, make_rng, sample
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
                context = [self.cache[p] for p in range(position + 1)]
                rows.append(target_next(context) if run.output_kind == Output.ARGMAX else target_logits(context))
        if rows:
            self.results.append(RunResult(run.run_id, run.output_kind, np.asarray(rows)))

    def poll(self):
        self.polls += 1
        return self.results.popleft() if self.results and self.polls % self.delay == 0 else None

    def wait(self):
        return self.results.popleft()

    def cancel(self, run_ids) -> None:
        """Runs finish at launch here; stale results still arrive and must be ignored."""


def target_logits(context: list[int]) -> np.ndarray:
    """The simulated target's logits after `context` (when asked for logits): deterministic, with
    repeated tokens likely enough that the penalties change choices."""
    row = np.random.default_rng(len(context)).standard_normal(50).astype(np.float32)
    row[target_next(context)] += 2.0
    row[context[-1] % row.size] += 1.5  # a wrong draft guess (99) lies outside the vocabulary
    return row


def sampled_continuation(prompt: list[int], n: int, sampling: SamplingConfig) -> list[int]:
    """What the target alone decides after `prompt`: `sample` over its logits, every token before
    the position as history."""
    rng = make_rng(sampling)
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(sample(target_logits(tokens), sampling, rng, tokens))
    return tokens[len(prompt):]


class SimulatedDraft:
    """A DraftClient whose guesses are the target's own tokens with probability `p_right`."""

    def __init__(self, p_right: float, seed: int, continuation=target_continuation) -> None:
        self.rng = np.random.default_rng(seed)
        self.p_right = p_right
        self.continuation = continuation  # (context, n) -> the target's next n tokens
        self.reply: DraftReply | None = None

    def request(self, request) -> None:
        truth = self.continuation(list(request.context), request.max_new)
        tokens = tuple(t if self.rng.random() < self.p_right else 99 for t in truth)
        self.reply = DraftReply(request.request_id, tokens, (0.9,) * len(tokens))

    def poll(self):
        reply, self.reply = self.reply, None
        return reply


def generate(mode: str, strategies: tuple[str, ...], seed: int, n_new: int = 60,
             sampling: SamplingConfig = SamplingConfig()):
    rng = np.random.default_rng(seed)
    prompt = [int(t) for t in rng.integers(0, 50, size=8)]
    target = SimulatedTarget()
    switch = SpeculationSwitch(strategies=strategies, strategy=strategies[0])
    request = Request(tuple(prompt), n_new, sampling, lambda t: False, lambda t: None, lambda: False)
    loop = speculative.generate if mode == "speculative" else partial(pipeinfer.generate, switch=switch)
    settings = SpecSettings(mode, draft_max=4)
    if sampling.needs_logits:
        truth = sampled_continuation(prompt, n_new, sampling)
        whole = prompt + truth
        draft = SimulatedDraft(0.6, seed, lambda context, n: (whole[len(context):len(context) + n]
                                                              if whole[:len(context)] == context else [99] * n))
    else:
        truth, draft = target_continuation(prompt, n_new), SimulatedDraft(0.6, seed)
    generation, _ = loop(Context(target), draft, settings, request, 64, 5.0)
    return list(generation.tokens), truth, target.runs


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("mode, strategies", [("pipeinfer", ("eager",)), ("pipeinfer", ("joint",)),
                                              ("pipeinfer", ("off",)), ("pipeinfer", ("eager", "joint", "off")),
                                              ("speculative", ("eager",))])
def test_every_strategy_decides_the_targets_own_tokens(seed, mode, strategies):
    tokens, truth, _ = generate(mode, strategies, seed)
    assert tokens == truth


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("mode, strategies", [("pipeinfer", ("eager", "joint", "off")), ("speculative", ("eager",))])
@pytest.mark.parametrize("sampling", [
    SamplingConfig(repeat_penalty=1.5),
    SamplingConfig(temperature=0.8, top_k=20, top_p=0.95, min_p=0.05, repeat_penalty=1.3, repeat_last_n=16,
                   frequency_penalty=0.1, presence_penalty=0.5, seed=3)])
def test_penalised_and_sampled_choices_are_the_targets_own(seed, mode, strategies, sampling):
    tokens, truth, _ = generate(mode, strategies, seed, sampling=sampling)
    assert tokens == truth
    assert truth != generate(mode, strategies, seed, sampling=dataclasses.replace(sampling, repeat_penalty=1.0,
                                                                                   frequency_penalty=0.0,
                                                                                   presence_penalty=0.0))[1]


def test_joint_feeding_sends_fewer_runs_than_eager():
    eager = sum(generate("pipeinfer", ("eager",), seed)[2] for seed in range(10))
    joint = sum(generate("pipeinfer", ("joint",), seed)[2] for seed in range(10))
    assert joint < eager
