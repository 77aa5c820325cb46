"""A simulated pipeline, draft rank and clock for the head's own loops (discrete events, no threads).

The head's decoding and speculation loops take an `Executor`, a `DraftClient` and a `Clock` (on
their `Context`); here each is simulated, so the schedule the model predicts is the one the real
head would make, with its own policies (draft lengths, the speculation switch, cancellation).

- `SimClock`: the head's time. The head's own work advances it (`busy`); when a loop idles, it
  jumps to the next moment something new can be polled (a result or a draft reply).
- `SimPipeline`: every stage is a FIFO server (a run starts at max(arrival, stage free)); every hop
  a FIFO link (serialisation at its bandwidth, one message at a time, then its delay). A cancel
  leaves the head for every stage at once (one hop's delay): a stage that has not started the run
  skips it, one computing it aborts; either forwards only its KV operations, as the real stage does.
  The schedule of the runs still in flight is recomputed from the last settled state whenever a
  run is launched or cancelled, so a cancel changes exactly what it would change.
- `SimDraft`: a FIFO server; a newer request abandons the one being drafted at its next token
  (as the draft rank's loop does). Its tokens follow `TargetText` with the given acceptance.
- `TargetText`: the target's token at every position, fixed; the last stage answers each output
  row at position p with the token at p + 1, so the head decides the target text whatever it fed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from pipeinfer_cpu.errors import PipeinferError
from pipeinfer_cpu.head.executors import RunResult
from pipeinfer_cpu.plan.inputs import ModelInputs
from pipeinfer_cpu.wire.drafts import DraftReply, DraftRequest
from pipeinfer_cpu.wire.hidden import encoded_nbytes
from pipeinfer_cpu.wire.links import LinkSpec
from pipeinfer_cpu.wire.runs import Output, RunMessage

HEADER_BYTES = 80  # a run message's int64 header
ROW_BYTES = 32  # per row: position, sequence id, token id, output flag (int64 each)
KV_OP_BYTES = 40
RESULT_ROW_BYTES = 4  # an argmax id (int32)
DRAFT_HEADER_BYTES = 32


class SimulationError(PipeinferError):
    """The simulated schedule cannot go on (the head waits for something that will never come)."""


class TargetText:
    """The target's tokens by position, and which of them the draft guesses right (seeded)."""

    def __init__(self, acceptance: float, seed: int, length: int) -> None:
        self.agrees = np.random.default_rng(seed).random(length) < acceptance

    @staticmethod
    def token(position: int) -> int:
        return 100 + (position * 7919) % 20000

    def draft_token(self, position: int) -> int:
        right = position >= len(self.agrees) or self.agrees[position]
        return self.token(position) if right else self.token(position) + 1


# -- the clock ----------------------------------------------------------------------------------

class SimClock:
    """Simulated seconds; `sources` say when their next event is, so idling can jump to it."""

    def __init__(self) -> None:
        self.t = 0.0
        self.sources: list = []  # objects with next_event(now) -> float | None
        self.busy_intervals: list[tuple[float, float]] = []  # the head's own work

    def now(self) -> float:
        return self.t

    def idler(self) -> "_Idle":
        return _Idle(self)

    def busy(self, seconds: float) -> None:
        if seconds > 0:
            self.busy_intervals.append((self.t, self.t + seconds))
            self.t += seconds

    def wait_until(self, t: float) -> None:
        self.t = max(self.t, t)

    def next_event(self) -> float | None:
        times = [t for t in (source.next_event(self.t) for source in self.sources) if t is not None]
        return min(times) if times else None


@dataclass
class _Idle:
    clock: SimClock

    def sleep(self) -> None:
        """The head polls until something arrives: jump to then (polling itself is free here)."""
        t = self.clock.next_event()
        if t is None:
            raise SimulationError("the simulated head waits for a result or a draft that will never come")
        self.clock.wait_until(t)


# -- the pipeline -------------------------------------------------------------------------------

@dataclass
class _Run:
    message: RunMessage
    sent: float  # when the head handed it to its first link
    cancel_at: float = math.inf  # when the head sent its cancel
    # set by the schedule:
    intervals: list = field(default_factory=list)  # (stage, start, end, computed)
    transfers: list = field(default_factory=list)  # (hop, start, end of serialisation, arrival)
    result_at: float | None = None
    done_at: float = 0.0  # when nothing of it is left anywhere
    delivered: bool = False


class SimPipeline:
    """An `Executor` whose runs travel the simulated stages and links of `inputs`."""

    def __init__(self, inputs: ModelInputs, clock: SimClock, text: TargetText) -> None:
        self.inputs = inputs
        self.clock = clock
        self.text = text
        n = len(inputs.stages)
        self._stage_free = [0.0] * n  # as settled by retired runs
        self._link_free = [0.0] * (n + 1)
        self._pending: list[_Run] = []  # launch order; not yet settled
        self.retired: list[_Run] = []
        clock.sources.append(self)

    @property
    def runs(self) -> list[_Run]:
        """Every run launched so far, settled or not, in launch order."""
        return self.retired + self._pending

    # Executor

    def launch(self, run: RunMessage) -> None:
        self.clock.busy(self.inputs.head_send_s)
        self._settle()
        self._pending.append(_Run(run, self.clock.now()))
        self._schedule()

    def poll(self) -> RunResult | None:
        run = self._next_result()
        if run is None or run.result_at > self.clock.now():
            return None
        return self._deliver(run)

    def wait(self) -> RunResult:
        run = self._next_result()
        if run is None:
            raise SimulationError("the simulated head waits for a result with no run in flight")
        self.clock.wait_until(run.result_at)
        return self._deliver(run)

    def cancel(self, run_ids: list[int]) -> None:
        ids = set(run_ids)
        for run in self._pending:
            if run.message.run_id in ids:
                run.cancel_at = min(run.cancel_at, self.clock.now())
        self._schedule()

    # the clock's source

    def next_event(self, now: float) -> float | None:
        run = self._next_result()
        return run.result_at if run is not None and run.result_at > now else None

    # schedule

    def _next_result(self) -> _Run | None:
        for run in self._pending:
            if run.result_at is not None and not run.delivered:
                return run
        return None

    def _deliver(self, run: _Run) -> RunResult:
        run.delivered = True
        self.clock.busy(self.inputs.head_receive_s)
        message = run.message
        rows = [self.text.token(p + 1) for p, wanted in zip(message.positions, message.outputs) if wanted]
        if message.output_kind != Output.ARGMAX:
            raise SimulationError("the simulated pipeline answers greedy (argmax) runs only")
        return RunResult(message.run_id, Output.ARGMAX, np.asarray(rows, dtype=np.int32))

    def _settle(self) -> None:
        """Retire the oldest runs that are over (nothing later can change them) into the settled state."""
        now = self.clock.now()
        while self._pending and self._pending[0].done_at <= now and (
                self._pending[0].result_at is None or self._pending[0].delivered):
            run = self._pending.pop(0)
            for stage, _, end, _ in run.intervals:
                self._stage_free[stage] = max(self._stage_free[stage], end)
            for hop, _, end, _ in run.transfers:
                self._link_free[hop] = max(self._link_free[hop], end)
            self.retired.append(run)

    def _schedule(self) -> None:
        stage_free = list(self._stage_free)
        link_free = list(self._link_free)
        for run in self._pending:
            if not run.delivered:
                self._schedule_run(run, stage_free, link_free)
            else:  # its result is taken: it happened as scheduled
                for stage, _, end, _ in run.intervals:
                    stage_free[stage] = max(stage_free[stage], end)
                for hop, _, end, _ in run.transfers:
                    link_free[hop] = max(link_free[hop], end)

    def _schedule_run(self, run: _Run, stage_free: list[float], link_free: list[float]) -> None:
        inputs, message = self.inputs, run.message
        stages, hops = inputs.stages, inputs.hops
        n_rows, n_out = message.n_tokens, sum(message.outputs)
        ops_bytes = HEADER_BYTES + KV_OP_BYTES * len(message.kv_ops)
        run.intervals, run.transfers, run.result_at = [], [], None
        nbytes = ops_bytes + ROW_BYTES * n_rows
        t = _transfer(run, 0, hops[0], run.sent, nbytes, link_free)
        cancel_reaches = run.cancel_at + hops[0].delay_s
        for k, stage in enumerate(stages):
            last = k == len(stages) - 1
            start = max(t, stage_free[k])
            compute = stage.compute_s(n_rows, n_out, last)
            if n_rows == 0 or cancel_reaches <= start:  # ops only, or skipped: cancelled before it started
                end, computed = start, False
            elif cancel_reaches < start + compute:  # aborted while computing
                end, computed = cancel_reaches, False
            else:
                end, computed = start + compute, True
            stage_free[k] = end
            run.intervals.append((k, start, end, computed))
            if not computed or n_rows == 0:
                if not message.kv_ops or last:
                    break
                nbytes = ops_bytes  # the stage forwards only the KV operations
            elif last:
                if n_out:
                    width = inputs.n_vocab * 4 if inputs.logits else RESULT_ROW_BYTES
                    run.result_at = _transfer(run, k + 1, hops[k + 1], end, HEADER_BYTES + width * n_out, link_free)
                break
            else:
                nbytes = ops_bytes + ROW_BYTES * n_rows + encoded_nbytes((n_rows, inputs.n_embd), inputs.wire_dtype)
            t = _transfer(run, k + 1, hops[k + 1], end, nbytes, link_free)
        ends = [end for _, _, end, _ in run.intervals] + [arrive for *_, arrive in run.transfers]
        run.done_at = max(ends)


def _transfer(run: _Run, hop: int, link: LinkSpec, ready: float, nbytes: float, link_free: list[float]) -> float:
    start = max(ready, link_free[hop])
    end = start + link.serialisation_s(nbytes)
    link_free[hop] = end
    arrive = end + link.delay_s
    run.transfers.append((hop, start, end, arrive))
    return arrive


# -- the draft ----------------------------------------------------------------------------------

@dataclass
class _Ask:
    request: DraftRequest
    arrives: float
    start: float = 0.0
    end: float = 0.0
    reply_at: float | None = None
    delivered: bool = False


class SimDraft:
    """A `DraftClient` on a simulated draft rank behind `inputs.draft_link`."""

    def __init__(self, inputs: ModelInputs, clock: SimClock, text: TargetText) -> None:
        self.inputs = inputs
        self.clock = clock
        self.text = text
        self._free = 0.0
        self._asks: list[_Ask] = []
        self.served: list[_Ask] = []  # settled requests, for the busy time
        clock.sources.append(self)

    @property
    def asks(self) -> list[_Ask]:
        """Every request so far, in arrival order."""
        return self.served + self._asks

    def request(self, request: DraftRequest) -> None:
        self.clock.busy(self.inputs.head_send_s)
        self._settle()
        link = self.inputs.draft_link
        nbytes = DRAFT_HEADER_BYTES + 8 * len(request.context)
        self._asks.append(_Ask(request, self.clock.now() + link.serialisation_s(nbytes) + link.delay_s))
        self._schedule()

    def poll(self) -> DraftReply | None:
        now = self.clock.now()
        for ask in self._asks:
            if ask.reply_at is not None and not ask.delivered and ask.reply_at <= now:
                ask.delivered = True
                self.clock.busy(self.inputs.head_receive_s)
                start = len(ask.request.context)
                tokens = tuple(self.text.draft_token(p) for p in range(start, start + ask.request.max_new))
                return DraftReply(ask.request.request_id, tokens, (1.0,) * len(tokens))
        return None

    def next_event(self, now: float) -> float | None:
        times = [a.reply_at for a in self._asks if a.reply_at is not None and not a.delivered and a.reply_at > now]
        return min(times) if times else None

    def _settle(self) -> None:
        now = self.clock.now()
        while self._asks and self._asks[0].end <= now and (self._asks[0].reply_at is None or self._asks[0].delivered):
            ask = self._asks.pop(0)
            self._free = max(self._free, ask.end)
            self.served.append(ask)

    def _schedule(self) -> None:
        """Each request in arrival order; one that a newer request reaches before its last token is
        abandoned at its next token boundary (no reply)."""
        inputs, free = self.inputs, self._free
        for index, ask in enumerate(self._asks):
            if ask.delivered:
                free = max(free, ask.end)
                continue
            n = ask.request.max_new
            ask.start = max(ask.arrives, free)
            ask.end = ask.start + inputs.draft_call_s + inputs.draft_token_s * n
            ask.reply_at = None
            newer = self._asks[index + 1].arrives if index + 1 < len(self._asks) else math.inf
            checks = [ask.start + inputs.draft_call_s + inputs.draft_token_s * i for i in range(1, n)]
            abandoned = next((c for c in checks if c >= newer), None)
            if abandoned is not None:
                ask.end = abandoned
            else:
                link = inputs.draft_link
                ask.reply_at = ask.end + link.serialisation_s(DRAFT_HEADER_BYTES + 24 * n) + link.delay_s
            free = ask.end
