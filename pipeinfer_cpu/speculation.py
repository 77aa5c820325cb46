"""The speculation state machine of the head (pure: no I/O, no clocks, no randomness).

The target's KV sequence 0 on every stage holds `fed`: tokens already sent through the pipeline,
position i holding fed[i]. fed[:L] equals the decided tokens `accepted[:L]` (L = len(accepted))
wherever both exist; beyond that, fed holds speculative draft tokens that runs in flight compute.
A run that fed position p yields the target's choice for position p+1. Results are processed in
launch order:

- the choice for position L is decided (appended to `accepted`);
- if fed already holds a draft token there and it equals the choice, it is confirmed and the next
  row of the result decides the next position;
- if it differs, every later fed token is stale: the runs carrying them are cancelled and
  `RM(seq 0, p+1..)` is queued, to travel with the next run, so every stage drops their KV entries
  after it has finished (or skipped) the stale runs and before it computes anything new.

Because every stage handles runs in launch order and stale entries are removed in that same
stream, one KV sequence is enough for a linear chain of speculation.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .kvcache import COMMITTED_SEQ
from .protocol import KvKind, KvOp



@dataclass(frozen=True)
class Launch:
    """A run to send: tokens at consecutive positions from `start`; which rows want a result."""

    run_id: int
    start: int
    tokens: tuple[int, ...]
    outputs: tuple[bool, ...]
    n_draft: int  # how many of the tokens are draft guesses
    kv_ops: tuple[KvOp, ...]


@dataclass(frozen=True)
class Verdict:
    """What one result decided."""

    decided: tuple[int, ...]  # newly decided tokens, in order
    confirmed: int  # draft tokens that turned out right
    rejected: bool  # a draft token turned out wrong (later speculation was dropped)
    cancelled: tuple[int, ...]  # run ids made stale


@dataclass
class _InFlight:
    run_id: int
    start: int
    n_tokens: int
    first_output: int  # position of the first row with an output


@dataclass
class Chain:
    """Decided tokens, fed tokens and runs in flight of one request."""

    accepted: list[int]
    fed: list[int]
    limit: int  # stop once len(accepted) reaches this (prompt + max new tokens)
    new_run_id: Callable[[], int]  # run ids are unique across requests: stale results can still arrive
    epoch: int = 0  # bumped whenever speculation is dropped; drafts of an older epoch are stale
    inflight: deque = field(default_factory=deque)
    pending_ops: list[KvOp] = field(default_factory=list)

    @staticmethod
    def for_prompt(committed: list[int], prompt: list[int], limit: int, new_run_id: Callable[[], int]) -> "Chain":
        """A chain whose stages already hold `committed`, about to be fed `prompt` after it."""
        return Chain(list(committed) + list(prompt), list(committed), limit, new_run_id)

    @property
    def decided_count(self) -> int:
        return len(self.accepted)

    @property
    def done(self) -> bool:
        return len(self.accepted) >= self.limit

    @property
    def speculative_depth(self) -> int:
        """Draft tokens fed beyond the decided ones."""
        return max(0, len(self.fed) - len(self.accepted))

    def needs_feed(self) -> bool:
        """True when decided tokens are not yet fed (the prompt, or a correction after a rejection)."""
        return len(self.fed) < len(self.accepted) and not self.done

    def feed_decided(self, max_tokens: int) -> Launch:
        """A run feeding the next decided-but-unfed tokens; the last row of the last one has an output."""
        start = len(self.fed)
        tokens = self.accepted[start:start + max_tokens]
        last = start + len(tokens) == len(self.accepted)
        outputs = tuple(last and i == len(tokens) - 1 for i in range(len(tokens)))
        return self._launch(tokens, outputs, n_draft=0)

    def speculate(self, draft: list[int], epoch: int, base: int) -> Launch | None:
        """A run feeding draft tokens that continue `fed`, if the draft is still current.

        The draft was made when fed had `base` tokens. If tokens were fed since (a decided token
        the draft had guessed), the draft's first tokens must equal them and the rest is used.
        """
        if epoch != self.epoch or len(self.fed) < len(self.accepted) or base > len(self.fed):
            return None
        overlap = len(self.fed) - base
        if list(draft[:overlap]) != self.fed[base:]:
            return None
        draft = list(draft[overlap:])[:max(0, self.limit - len(self.fed))]  # never past the last token needed
        if not draft:
            return None
        return self._launch(draft, (True,) * len(draft), n_draft=len(draft))

    def feed_with_draft(self, draft: list[int]) -> Launch:
        """One run feeding the decided-but-unfed tokens followed by draft tokens (synchronous mode)."""
        decided = self.accepted[len(self.fed):]
        if not decided:
            raise ValueError("feed_with_draft needs a decided token to feed first")
        draft = draft[:max(0, self.limit - len(self.accepted))]
        outputs = (False,) * (len(decided) - 1) + (True,) * (1 + len(draft))
        return self._launch(decided + draft, outputs, n_draft=len(draft))

    def _launch(self, tokens: list[int], outputs: tuple[bool, ...], n_draft: int) -> Launch:
        start = len(self.fed)
        launch = Launch(self.new_run_id(), start, tuple(tokens), outputs, n_draft, tuple(self.pending_ops))
        self.pending_ops = []
        self.fed.extend(tokens)
        if any(outputs):
            first = start + outputs.index(True)
            self.inflight.append(_InFlight(launch.run_id, start, len(tokens), first))
        return launch

    def is_live(self, run_id: int) -> bool:
        return any(run.run_id == run_id for run in self.inflight)

    def on_result(self, run_id: int, choose: Callable[[int], int]) -> Verdict | None:
        """Process the result of a run; `choose(row)` gives the target's token for an output row
        (called only for rows that decide something, in order). None for a stale run's result."""
        if not self.inflight or self.inflight[0].run_id != run_id:
            if self.is_live(run_id):
                raise RuntimeError(f"result of run {run_id} arrived before older runs' results")
            return None
        run = self.inflight.popleft()
        decided: list[int] = []
        confirmed = 0
        for position in range(run.first_output, run.start + run.n_tokens):
            if position != len(self.accepted) - 1 or self.done:
                break
            token = choose(position - run.first_output)
            self.accepted.append(token)
            decided.append(token)
            nxt = position + 1
            if nxt >= len(self.fed):
                break  # nothing speculative fed there: the next run feeds the decided token
            if self.fed[nxt] == token:
                confirmed += 1
                continue
            return Verdict(tuple(decided), confirmed, True, self._drop_from(nxt))
        return Verdict(tuple(decided), confirmed, False, ())

    def _drop_from(self, position: int) -> tuple[int, ...]:
        """Forget fed tokens from `position` on: cancel their runs and queue their KV removal."""
        del self.fed[position:]
        self.pending_ops.append(KvOp(KvKind.RM, COMMITTED_SEQ, 0, position, -1))
        cancelled = tuple(run.run_id for run in self.inflight)
        self.inflight.clear()
        self.epoch += 1
        return cancelled

    def finish(self) -> tuple[tuple[int, ...], tuple[KvOp, ...]]:
        """End the request: cancel what is in flight and keep only decided tokens in the KV cache.

        The last decided token stays unfed (as after plain decoding): the next request starts with it.
        """
        keep = min(len(self.fed), len(self.accepted) - 1)
        cancelled = tuple(run.run_id for run in self.inflight)
        self.inflight.clear()
        ops = tuple(self.pending_ops)
        if len(self.fed) > keep:
            ops += (KvOp(KvKind.RM, COMMITTED_SEQ, 0, keep, -1),)
            del self.fed[keep:]
        self.pending_ops = []
        return cancelled, ops


@dataclass
class DraftPolicy:
    """How far to speculate, adapted online from the acceptance observed.

    PipeInfer's cut-offs: the draft stops a run once its top-1 probability falls below `p_accept`;
    a rejection raises the cut-off by `p_recovery` (speculate less), a fully confirmed run lowers
    it by `p_decay` (speculate more). Beyond PipeInfer, the run length is capped from an estimate
    of the per-token acceptance rate alpha: a draft token at depth k is useful with probability
    alpha^k, so we draft while alpha^k >= `min_useful` (and never beyond `draft_max`).
    """

    draft_max: int = 8
    p_accept: float = 0.4
    p_recovery: float = 0.05
    p_decay: float = 0.02
    min_useful: float = 0.15
    alpha: float = 0.6  # running estimate of per-token acceptance
    smoothing: float = 0.2

    def __post_init__(self) -> None:
        if self.draft_max < 1:
            raise ValueError(f"--draft-max must be at least 1, got {self.draft_max}")
        if not 0 <= self.p_accept < 1:
            raise ValueError(f"--p-accept must be in [0, 1), got {self.p_accept}")

    def run_length(self) -> int:
        """Draft tokens to ask for in the next run."""
        alpha = min(max(self.alpha, 1e-3), 0.999)
        useful = int(math.log(self.min_useful) / math.log(alpha))
        return max(1, min(self.draft_max, useful))

    def observe(self, confirmed: int, drafted: int, rejected: bool) -> None:
        """Update after a verdict on `drafted` draft tokens of which `confirmed` were right."""
        if drafted <= 0:
            return
        rate = confirmed / drafted
        self.alpha += self.smoothing * (rate - self.alpha)
        if rejected:
            self.p_accept = min(0.95, self.p_accept + self.p_recovery)
        else:
            self.p_accept = max(0.0, self.p_accept - self.p_decay)


@dataclass
class SpeculationSwitch:
    """Whether to speculate at all, chosen online from the decode speed each choice has shown.

    Speculation pays when the pipeline has idle stages to fill or verifying k tokens costs much
    less than k single-token runs; with one target stage and a weak draft it can cost more than
    it saves. So pipeinfer measures: it decodes in windows of `window` tokens, keeps a smoothed
    tokens/s for "speculate" and "don't", runs the faster choice, and tries the other one every
    `explore_every` windows so its estimate stays current. Deterministic (no random draws), so
    a run is reproducible; the output never depends on it (verification is lossless).
    """

    window: int = 16
    explore_every: int = 4
    smoothing: float = 0.5
    speculating: bool = True
    rates: dict = field(default_factory=dict)  # choice -> smoothed tokens/s
    windows: int = 0

    def observe(self, tokens: int, seconds: float) -> None:
        """Record one finished window of the current choice, then pick the next choice."""
        if tokens <= 0 or seconds <= 0:
            return
        rate = tokens / seconds
        old = self.rates.get(self.speculating)
        self.rates[self.speculating] = rate if old is None else old + self.smoothing * (rate - old)
        self.windows += 1
        self.speculating = self._next_choice()

    def _next_choice(self) -> bool:
        if len(self.rates) < 2:
            return not self.speculating  # try each choice once
        best = self.rates[True] >= self.rates[False]
        return (not best) if self.windows % self.explore_every == 0 else best
