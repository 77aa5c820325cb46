"""What the two speculative loops share: settings, the request, and one request's `SpecState`.

The loops, `speculative` (synchronous, head/speculative.py) and `pipeinfer` (asynchronous,
head/pipeinfer.py), drive the same `Chain` state machine (head/speculation.py) and launch,
verify and finish runs the same way, through `SpecState`; they differ only in when they launch.

Verification is sampled-token matching: the target chooses each token exactly as it would alone
(argmax, or a sample drawing one uniform per position from the seeded stream), and a draft token
is accepted iff it equals that choice. The output is therefore the target's own output for the
seed, whatever the draft, the timing or the cancellations, which makes it lossless and testable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Protocol

from pipeinfer_cpu.errors import UserError
from pipeinfer_cpu.head.decoding import Generation, Record, choose
from pipeinfer_cpu.head.executors import RunResult
from pipeinfer_cpu.head.modes import Mode
from pipeinfer_cpu.head.session import Context
from pipeinfer_cpu.head.speculation import MAX_BRANCHES_PER_RUN, Chain, DraftPolicy, Launch, Verdict
from pipeinfer_cpu.sampling import SamplingConfig, make_rng
from pipeinfer_cpu.wire.drafts import DraftReply, DraftRequest
from pipeinfer_cpu.wire.runs import Output, RunMessage


@dataclass(frozen=True)
class SpecSettings:
    """How to speculate (the command line's speculation options), fixed for an engine's life."""

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
        if self.draft_max < 1:
            raise UserError(f"--draft-max must be at least 1, got {self.draft_max}")
        if self.max_inflight < 1:
            raise UserError(f"--max-inflight must be at least 1, got {self.max_inflight}")
        for name in ("p_accept", "p_recovery", "p_decay"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}")
        if not 0 < self.p_split <= 1:
            raise UserError(f"--p-split must be in (0, 1] (1 turns draft token trees off), got {self.p_split}")

    @property
    def trees(self) -> bool:
        return self.mode == Mode.PIPEINFER and self.p_split < 1.0

    @property
    def kv_sequences(self) -> int:
        """KV sequences every target stage needs: the committed one, plus branches of runs in flight."""
        return 1 + (self.max_inflight * MAX_BRANCHES_PER_RUN if self.trees else 0)


@dataclass
class SpecCounters:
    """What one speculative request did with the draft's tokens and the pipeline's runs."""

    drafted: int = 0
    confirmed: int = 0
    runs_launched: int = 0
    runs_cancelled: int = 0
    branches: int = 0
    branches_adopted: int = 0

    def stats_fields(self) -> dict[str, int]:
        """The `RunStats` fields these fill. Its `accepted` (a JSON key) counts confirmed draft tokens."""
        return {"drafted": self.drafted, "accepted": self.confirmed, "runs_launched": self.runs_launched,
                "runs_cancelled": self.runs_cancelled, "branches": self.branches,
                "branches_adopted": self.branches_adopted}


class DraftClient(Protocol):
    """The draft model, on its own rank or in the head: asked without waiting, answering later by
    request id (a reply to an older request may still come and must be told apart)."""

    def request(self, request: DraftRequest) -> None: ...

    def poll(self) -> DraftReply | None: ...


@dataclass(frozen=True)
class Request:
    """What one request asks of a speculative loop (the plain decoder takes the same, as arguments)."""

    prompt: tuple[int, ...]
    max_tokens: int
    sampling: SamplingConfig
    is_end: Callable[[int], bool]
    on_token: Callable[[int], None]
    should_stop: Callable[[], bool]
    drawn: int = 0  # positions already decided before this request (a resumed answer): make_rng skips them


class SpecState:
    """One speculative request in progress: its chain, draft policy, counters and decided tokens.

    Both loops launch, verify and finish runs through it, so they count, choose tokens and record
    times the same way; what is left to each loop is when to launch.
    """

    def __init__(self, context: Context, draft: DraftClient, settings: SpecSettings, request: Request) -> None:
        self.context = context
        self.executor = context.executor
        self.draft = draft
        self.settings = settings
        self.request = request
        self.policy = DraftPolicy(settings.draft_max, settings.p_accept, settings.p_recovery, settings.p_decay)
        self.counters = SpecCounters()
        limit = len(context) + len(request.prompt) + request.max_tokens
        self.chain = Chain.for_prompt(list(context.tokens), list(request.prompt), limit, context.new_run_id,
                                      range(1, settings.kv_sequences))
        self.clock = context.clock
        self.record = Record(self.clock.now(), clock=self.clock)
        self._rng = make_rng(request.sampling, request.drawn)
        self._output = Output.LOGITS if request.sampling.needs_logits else Output.ARGMAX
        self._draft_ids = 0

    @property
    def running(self) -> bool:
        """True until the last token is decided or a token or the caller stopped generation."""
        return not self.chain.done and self.record.stopped_by == "length"

    def send(self, launch: Launch) -> None:
        self.counters.runs_launched += 1
        self.counters.drafted += launch.n_draft + len(launch.branches)
        self.counters.branches += len(launch.branches)
        positions, seq_ids, tokens, outputs = launch.rows()
        self.executor.launch(RunMessage(launch.run_id, positions, seq_ids, tokens, outputs, launch.kv_ops,
                                        self._output))

    def ask_draft(self, context: Sequence[int], at_most: int | None = None) -> int:
        """Ask the draft to continue `context` (by at most `at_most` tokens when adaptive); returns the
        id its reply will carry."""
        self._draft_ids += 1
        length = self.settings.draft_max
        if self.settings.adaptive:
            length = min(self.policy.run_length(), at_most or length)
        self.draft.request(DraftRequest(self._draft_ids, tuple(context), length, self.policy.p_accept))
        return self._draft_ids

    def verify(self, result: RunResult) -> Verdict | None:
        """Decide what a result says (None for a stale run's), cancel the runs it made stale, and
        record and stream the decided tokens."""
        sampling = self.request.sampling
        verdict = self.chain.on_result(result.run_id,
                                       lambda row: choose(result, row, sampling, self._rng, self.chain.decided))
        if verdict is None:
            return None
        self._account(verdict)
        self._emit(verdict.decided)
        return verdict

    def _account(self, verdict: Verdict) -> None:
        self.counters.confirmed += verdict.confirmed
        self.counters.branches_adopted += int(verdict.branch_adopted)
        if verdict.cancelled:
            self.counters.runs_cancelled += len(verdict.cancelled)
            self.executor.cancel(list(verdict.cancelled))
        drafted = verdict.confirmed + (1 if verdict.rejected else 0)
        self.policy.observe(verdict.confirmed, drafted, verdict.rejected)

    def _emit(self, decided: Sequence[int]) -> None:
        """Record decided tokens; the caller may stop generation after each verdict."""
        for token in decided:
            if not self.record.add(token, self.request.on_token, self.request.is_end):
                return
        if decided and self.request.should_stop():
            self.record.stopped_by = "interrupt"

    def finish(self) -> tuple[Generation, SpecCounters]:
        """End the request: cancel the runs in flight, keep only decided tokens in the stages' KV
        cache, and tell the context what they hold."""
        cancelled, ops = self.chain.finish()
        if cancelled:
            self.counters.runs_cancelled += len(cancelled)
            self.executor.cancel(list(cancelled))
        if ops:
            self.executor.launch(RunMessage(self.context.new_run_id(), kv_ops=ops))
        self.context.commit(self.chain.fed)
        record = self.record
        prefill_s = record.times[0] if record.times else self.clock.now() - record.started
        generation = Generation(self.request.prompt, tuple(record.tokens), prefill_s, tuple(record.times), None,
                                record.stopped_by)
        return generation, self.counters
