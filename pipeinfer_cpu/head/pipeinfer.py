"""The `pipeinfer` loop: PipeInfer's continuous asynchronous speculation with early cancellation.

Decided tokens are fed at once; while fewer than `max_inflight` runs are in flight and no result
is waiting, the draft keeps extending the fed chain and each continuation is launched as a
speculative run. Results are verified in order; a wrong guess cancels every later run on every
stage at once (early inference cancellation). A `SpeculationSwitch` picks online how decided
tokens are fed: alone at once (PipeInfer's way), with the draft's continuation (one run instead
of two, which pays on a one-stage pipeline), or without speculation. With `--p-split` below 1,
speculative runs also carry draft token trees (EXPERIMENTAL: see speculation.py and the README
for why they are off by default).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeinfer_cpu.errors import ClusterError
from pipeinfer_cpu.head.decoding import Generation
from pipeinfer_cpu.head.session import Context
from pipeinfer_cpu.head.specdecode import DraftClient, Request, SpecCounters, SpecSettings, SpecState
from pipeinfer_cpu.head.speculation import SpeculationSwitch, branch_candidates


def generate(context: Context, draft: DraftClient, settings: SpecSettings, request: Request, n_batch: int,
             timeout_s: float, switch: SpeculationSwitch) -> tuple[Generation, SpecCounters]:
    """Generate after the committed `context` (which learns what the stages hold afterwards).
    `switch` is kept by the caller across requests: what it learnt about the pipeline stays."""
    state = SpecState(context, draft, settings, request)
    PipeInferLoop(state, n_batch, timeout_s, switch).run()
    return state.finish()


def inflight_cap(settings: SpecSettings, switch: SpeculationSwitch) -> int:
    """Runs in flight at most: --max-inflight, or one per stage where the switch asks for more (with
    adaptive drafting and no trees, whose branches need a KV sequence per run), never more draft tokens
    in flight than --max-inflight runs of --draft-max hold."""
    if not settings.adaptive or settings.trees:
        return settings.max_inflight
    return max(settings.max_inflight, min(switch.inflight, settings.max_inflight * settings.draft_max))


@dataclass(frozen=True)
class _DraftSent:
    """The outstanding draft request, and the chain's state when it was asked: its reply is used
    only while that state is current."""

    request_id: int
    epoch: int
    base: int  # how many tokens the draft continues (fed ones, or decided ones when joint)
    joint: bool  # its reply travels with the decided tokens in one run (the joint strategy)


@dataclass(frozen=True)
class _Window:
    """A measurement window of the switch: when it started and how many tokens were decided then."""

    start: float
    tokens: int


class PipeInferLoop:
    """One pipeinfer request: launches whatever is due, then takes the next result, until done."""

    def __init__(self, state: SpecState, n_batch: int, timeout_s: float, switch: SpeculationSwitch) -> None:
        self.state = state
        self.chain = state.chain
        self.settings = state.settings
        self.n_batch = n_batch
        self.timeout_s = timeout_s
        self.switch = switch
        self._draft_sent: _DraftSent | None = None
        self._window: _Window | None = None
        self._plain_runs: dict[int, float] = {}  # run id -> launch time of a decided token's one-token run
        self._inflight_cap = inflight_cap(self.settings, switch)

    def run(self) -> None:
        clock = self.state.clock
        last_progress = clock.now()
        backoff = clock.idler()
        while self.state.running:
            progressed = self._launch_what_is_due()
            result = self.state.executor.poll()
            if result is not None:
                progressed = True
                launched_at = self._plain_runs.pop(result.run_id, None)
                if launched_at is not None:
                    self.switch.observe_plain_run(clock.now() - launched_at)
                if self.state.verify(result) is not None:
                    self._maybe_switch()
            if progressed:
                last_progress = clock.now()
                backoff = clock.idler()
            elif clock.now() - last_progress > self.timeout_s:
                raise ClusterError(f"no result from the pipeline or the draft within {self.timeout_s:.0f} s")
            else:
                backoff.sleep()

    def _maybe_switch(self) -> None:
        """With --adaptive: close a measurement window and let the switch choose. Windows start
        after the first token (prefill is not decode)."""
        record = self.state.record
        if not self.settings.adaptive or record.first_token_at is None:
            return
        window = self._window or _Window(record.first_token_at, 1)
        tokens = len(record.tokens) - window.tokens
        if tokens >= self.switch.window:
            now = self.state.clock.now()
            self.switch.observe(tokens, now - window.start)
            window = _Window(now, len(record.tokens))
        self._window = window

    def _launch_what_is_due(self) -> bool:
        chain = self.chain
        launched = self._launch_draft_reply()
        if not self._joins():
            while chain.needs_feed():
                launch = chain.feed_decided(self.n_batch)
                self.state.send(launch)
                if len(launch.tokens) == 1:  # a one-token run through every stage, as plain pipelining's
                    self._plain_runs[launch.run_id] = self.state.clock.now()
                launched = True
        if self._wants_draft():
            self._ask_draft()
        return launched

    def _joins(self) -> bool:
        """True while decided tokens wait for the draft to travel with them (the joint strategy):
        only when nothing is in flight (after a rejection, or when speculation ran dry), and only
        for the one or two tokens a verdict leaves unfed (two after an adopted branch), never for
        a prompt."""
        chain = self.chain
        return (self.switch.strategy == "joint" and chain.needs_feed() and not chain.inflight
                and len(chain.decided) - len(chain.fed) <= 2)

    def _launch_draft_reply(self) -> bool:
        """Launch the answer to the outstanding draft request if it came and is still current."""
        reply = self.state.draft.poll()
        sent = self._draft_sent
        if reply is None or sent is None or reply.request_id != sent.request_id:
            return False
        self._draft_sent = None
        alternatives = (branch_candidates(reply.second_tokens, reply.second_probs, self.settings.p_split)
                        if self.settings.trees else [])
        if sent.joint:
            launch = self.chain.join(list(reply.tokens), sent.epoch, sent.base, alternatives)
        else:
            launch = self.chain.speculate(list(reply.tokens), sent.epoch, sent.base, alternatives)
        if launch is not None:
            self.state.send(launch)
        return launch is not None

    def _wants_draft(self) -> bool:
        chain = self.chain
        if chain.done or len(chain.fed) >= chain.limit or not self.switch.speculating:
            return False
        sent = self._draft_sent
        outstanding = sent is not None and sent.epoch == chain.epoch
        if self._joins():
            return not (outstanding and sent.joint)
        return not outstanding and not chain.needs_feed() and len(chain.inflight) < self._inflight_cap

    def _ask_draft(self) -> None:
        """Ask for a continuation of the fed tokens (eager), or of the decided ones (joint)."""
        joint = self._joins()
        context = self.chain.decided if joint else self.chain.fed
        request_id = self.state.ask_draft(context, self.switch.run_tokens)
        self._draft_sent = _DraftSent(request_id, self.chain.epoch, len(context), joint)
