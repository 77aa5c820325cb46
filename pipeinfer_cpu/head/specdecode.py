"""Speculative decoding loops of the head: `speculative` (synchronous) and `pipeinfer` (asynchronous).

Both drive the same `Chain` state machine; they differ only in when runs are launched:

- speculative: draft k tokens, send [last decided token + draft] as one run, wait for its result,
  verify, repeat. The draft and the target never work at the same time.
- pipeinfer: continuous asynchronous speculation. Decided tokens are fed at once; while fewer than
  `max_inflight` runs are in flight and no result is waiting, the draft keeps extending the fed
  chain and each continuation is launched as a speculative run. Results are verified in order;
  a wrong guess cancels every later run on every stage at once (early inference cancellation).
  A `SpeculationSwitch` picks online how decided tokens are fed: alone at once (PipeInfer's
  way), with the draft's continuation (one run instead of two, which pays on a one-stage
  pipeline), or without speculation. With `--p-split` below 1, speculative runs also carry draft
  token trees (EXPERIMENTAL: see speculation.py and the README for why they are off by default).

Verification is sampled-token matching: the target chooses each token exactly as it would alone
(argmax, or a sample drawing one uniform per position from the seeded stream), and a draft token
is accepted iff it equals that choice. The output is therefore the target's own output for the
seed, whatever the draft, the timing or the cancellations, which makes it lossless and testable.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from pipeinfer_cpu.head.decoding import Generation
from pipeinfer_cpu.rank.drafter import DraftReply, DraftRequest
from pipeinfer_cpu.errors import ClusterError
from pipeinfer_cpu.head.executors import Executor, RunResult
from pipeinfer_cpu.head.modes import Mode
from pipeinfer_cpu.head.session import Context
from pipeinfer_cpu.wire.runs import Output, RunMessage
from pipeinfer_cpu.sampling import SamplingConfig, make_rng, sample
from pipeinfer_cpu.head.speculation import MAX_BRANCHES_PER_RUN, Chain, DraftPolicy, Launch, SpeculationSwitch, branch_candidates
from pipeinfer_cpu.wire.transport import Backoff


@dataclass(frozen=True)
class SpecSettings:
    mode: Mode  # the engine's (a plain string becomes a Mode); the loops run for SPECULATIVE and PIPEINFER
    draft_max: int = 8
    max_inflight: int = 4
    p_accept: float = 0.4
    p_recovery: float = 0.05
    p_decay: float = 0.02
    adaptive: bool = True
    p_split: float = 1.0  # pipeinfer: branch where the draft's runner-up is at least this likely; 1 = no trees

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", Mode(self.mode))

    @property
    def trees(self) -> bool:
        return self.mode == Mode.PIPEINFER and self.p_split < 1.0

    @property
    def kv_sequences(self) -> int:
        """KV sequences every target stage needs: the committed one, plus branches of runs in flight."""
        return 1 + (self.max_inflight * MAX_BRANCHES_PER_RUN if self.trees else 0)


@dataclass
class SpecCounters:
    drafted: int = 0
    confirmed: int = 0
    runs_launched: int = 0
    runs_cancelled: int = 0
    branches: int = 0
    branches_adopted: int = 0


class DraftClient:
    def request(self, request: DraftRequest) -> None: ...

    def poll(self) -> DraftReply | None: ...


class SpeculativeLoop:
    """One speculative request, from prompt to the last token."""

    def __init__(self, executor: Executor, draft: DraftClient, settings: SpecSettings, n_batch: int,
                 timeout_s: float, switch: SpeculationSwitch | None = None) -> None:
        self.executor = executor
        self.draft = draft
        self.settings = settings
        self.n_batch = n_batch
        self.timeout_s = timeout_s
        self.policy = DraftPolicy(settings.draft_max, settings.p_accept, settings.p_recovery, settings.p_decay)
        self.counters = SpecCounters()
        self.switch = switch or SpeculationSwitch()  # kept by the caller across requests
        self._draft_sent: tuple[int, int, int, bool] | None = None  # (request id, epoch, base, joint)
        self._draft_ids = 0

    def generate(self, context: Context, prompt: list[int], max_tokens: int, sampling: SamplingConfig,
                 is_end: Callable[[int], bool], on_token: Callable[[int], None],
                 should_stop: Callable[[], bool]) -> tuple[Generation, SpecCounters]:
        """Generate after the committed `context`, and tell it what the stages hold afterwards."""
        chain = Chain.for_prompt(list(context.tokens), prompt, len(context) + len(prompt) + max_tokens,
                                 context.new_run_id, range(1, self.settings.kv_sequences))
        rng = make_rng(sampling)
        output = Output.ARGMAX if sampling.greedy else Output.LOGITS
        record = _Record(time.perf_counter())
        last_progress = time.perf_counter()
        backoff = Backoff()
        while not chain.done and record.stopped_by == "length":
            progressed = self._launch_what_is_due(chain, output)
            result = self._next_result(chain)
            if result is not None:
                progressed = True
                verdict = chain.on_result(result.run_id, lambda row: _choose(result, row, sampling, rng))
                if verdict is not None:
                    self._account(verdict)
                    record.emit(verdict.decided, on_token, is_end, should_stop)
                    self._maybe_switch(record)
            if progressed:
                last_progress = time.perf_counter()
                backoff = Backoff()
            elif time.perf_counter() - last_progress > self.timeout_s:
                raise ClusterError(f"no result from the pipeline or the draft within {self.timeout_s:.0f} s")
            else:
                backoff.sleep()
        self._finish(chain)
        context.commit(chain.fed)
        return record.generation(prompt), self.counters

    def _maybe_switch(self, record: "_Record") -> None:
        """pipeinfer with --adaptive: close a measurement window and let the switch choose."""
        if self.settings.mode != Mode.PIPEINFER or not self.settings.adaptive:
            return
        tokens = len(record.tokens) - record.window_start_tokens
        if tokens >= self.switch.window:
            now = time.perf_counter()
            self.switch.observe(tokens, now - record.window_start)
            record.window_start, record.window_start_tokens = now, len(record.tokens)

    def _next_result(self, chain: Chain) -> RunResult | None:
        if self.settings.mode == Mode.SPECULATIVE:
            return self.executor.wait() if chain.inflight else None
        return self.executor.poll()

    # -- launching ----------------------------------------------------------------------------

    def _launch_what_is_due(self, chain: Chain, output: Output) -> bool:
        if self.settings.mode == Mode.SPECULATIVE:
            return self._speculative_step(chain, output) if not chain.inflight else False
        launched = self._launch_draft_reply(chain, output)
        if not self._joins(chain):
            while chain.needs_feed():
                self._send(chain.feed_decided(self.n_batch), output)
                launched = True
        if self._wants_draft(chain):
            self._ask_draft(chain)
        return launched

    def _joins(self, chain: Chain) -> bool:
        """True while decided tokens wait for the draft to travel with them (the joint strategy):
        only when nothing is in flight (after a rejection, or when speculation ran dry), and only
        for the one or two tokens a verdict leaves unfed (two after an adopted branch), never for
        a prompt."""
        return (self.switch.strategy == "joint" and chain.needs_feed() and not chain.inflight
                and len(chain.decided) - len(chain.fed) <= 2)

    def _launch_draft_reply(self, chain: Chain, output: Output) -> bool:
        """Launch the answer to the outstanding draft request if it came and is still current."""
        reply = self.draft.poll()
        if reply is None or self._draft_sent is None or reply.request_id != self._draft_sent[0]:
            return False
        _, epoch, base, joint = self._draft_sent
        self._draft_sent = None
        alternatives = (branch_candidates(reply.second_tokens, reply.second_probs, self.settings.p_split)
                        if self.settings.trees else [])
        if joint:
            launch = chain.join(list(reply.tokens), epoch, base, alternatives)
        else:
            launch = chain.speculate(list(reply.tokens), epoch, base, alternatives)
        if launch is not None:
            self._send(launch, output)
        return launch is not None

    def _wants_draft(self, chain: Chain) -> bool:
        if chain.done or len(chain.fed) >= chain.limit or not self.switch.speculating:
            return False
        outstanding = self._draft_sent is not None and self._draft_sent[1] == chain.epoch
        if self._joins(chain):
            return not (outstanding and self._draft_sent[3])
        return (not outstanding and not chain.needs_feed() and len(chain.inflight) < self.settings.max_inflight)

    def _ask_draft(self, chain: Chain) -> None:
        """Ask for a continuation of the fed tokens (eager), or of the decided ones (joint, synchronous)."""
        joint = self.settings.mode == Mode.SPECULATIVE or self._joins(chain)
        context = chain.decided if joint else chain.fed
        self._draft_ids += 1
        length = self.policy.run_length() if self.settings.adaptive else self.settings.draft_max
        self.draft.request(DraftRequest(self._draft_ids, tuple(context), length, self.policy.p_accept))
        self._draft_sent = (self._draft_ids, chain.epoch, len(context), joint)

    def _speculative_step(self, chain: Chain, output: Output) -> bool:
        """Synchronous speculation: feed the prompt, or draft (waiting for it) and send one run."""
        if len(chain.decided) - len(chain.fed) > 1:  # the prompt
            while chain.needs_feed() and not chain.inflight:
                self._send(chain.feed_decided(self.n_batch), output)
            return True
        self._ask_draft(chain)
        reply = self._wait_draft()
        self._draft_sent = None
        self._send(chain.feed_with_draft(list(reply.tokens)), output)
        return True

    def _send(self, launch: Launch, output: Output) -> None:
        self.counters.runs_launched += 1
        self.counters.drafted += launch.n_draft + len(launch.branches)
        self.counters.branches += len(launch.branches)
        positions, seq_ids, tokens, outputs = launch.rows()
        self.executor.launch(RunMessage(launch.run_id, positions, seq_ids, tokens, outputs, launch.kv_ops, output))

    def _account(self, verdict) -> None:
        self.counters.confirmed += verdict.confirmed
        self.counters.branches_adopted += int(verdict.branch_adopted)
        if verdict.cancelled:
            self.counters.runs_cancelled += len(verdict.cancelled)
            self.executor.cancel(list(verdict.cancelled))
        drafted = verdict.confirmed + (1 if verdict.rejected else 0)
        self.policy.observe(verdict.confirmed, drafted, verdict.rejected)

    def _finish(self, chain: Chain) -> None:
        cancelled, ops = chain.finish()
        if cancelled:
            self.counters.runs_cancelled += len(cancelled)
            self.executor.cancel(list(cancelled))
        if ops:
            self.executor.launch(RunMessage(chain.new_run_id(), kv_ops=ops))

    # -- waiting ------------------------------------------------------------------------------

    def _wait_draft(self) -> DraftReply:
        deadline = time.perf_counter() + self.timeout_s
        backoff = Backoff()
        while time.perf_counter() < deadline:
            reply = self.draft.poll()
            if reply is not None and self._draft_sent and reply.request_id == self._draft_sent[0]:
                return reply
            backoff.sleep()
        raise ClusterError(f"the draft rank did not answer within {self.timeout_s:.0f} s")


@dataclass
class _Record:
    """Decided tokens and their times, and why generation stopped."""

    started: float
    window_start: float = 0.0
    window_start_tokens: int = 1  # windows start after the first token (prefill is not decode)
    tokens: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    stopped_by: str = "length"

    def emit(self, decided, on_token, is_end, should_stop) -> None:
        for token in decided:
            self.tokens.append(token)
            self.times.append(time.perf_counter() - self.started)
            if len(self.tokens) == 1:
                self.window_start = time.perf_counter()
            on_token(token)
            if is_end(token):
                self.stopped_by = "eos"
                return
        if decided and should_stop():
            self.stopped_by = "interrupt"

    def generation(self, prompt: list[int]) -> Generation:
        prefill_s = self.times[0] if self.times else time.perf_counter() - self.started
        return Generation(tuple(prompt), tuple(self.tokens), prefill_s, tuple(self.times), None, self.stopped_by)


def _choose(result: RunResult, row: int, sampling: SamplingConfig, rng: np.random.Generator) -> int:
    """The target's token for an output row; one uniform per decided position, as in plain decoding."""
    if result.output_kind == Output.ARGMAX:
        rng.random()
        return int(result.payload[row])
    return sample(result.payload[row], sampling, rng)
