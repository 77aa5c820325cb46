"""The speculation state machine of the head (pure: no I/O, no clocks, no randomness).

The target's KV sequence 0 on every stage holds `fed`: tokens already sent through the pipeline,
position i holding fed[i]. fed[:L] equals the decided tokens `decided[:L]` (L = len(decided))
wherever both exist; beyond that, fed holds speculative draft tokens that runs in flight compute.
A run that fed position p yields the target's choice for position p+1. Results are processed in
launch order:

- the choice for position L is decided (appended to `decided`);
- if fed already holds a draft token there and it equals the choice, it is confirmed and the next
  row of the result decides the next position;
- if it differs, every later fed token is stale: the runs carrying them are cancelled and
  `RM(seq 0, p+1..)` is queued, to travel with the next run, so every stage drops their KV entries
  after it has finished (or skipped) the stale runs and before it computes anything new.

Because every stage handles runs in launch order and stale entries are removed in that same
stream, one KV sequence is enough for a linear chain of speculation.

Draft token trees: a speculative run may also carry branches, the draft's second choice at some
of its positions (never the first, whose verdict comes from an earlier run). A branch token lives
in a KV sequence of its own: the run first tags the fed prefix with that sequence (`CP 0 -> s`,
no data copied), and the run's main-path tokens before the branch point carry both ids. If the
target rejects the main token at a branch's position but chooses the branch's token, the branch
is adopted: its output row decides the next position, so the rejection still yields two decided
tokens, which the next run feeds (see `_adopt` for why the branch's cell is not reused). Every
branch sequence is removed (`RM s`) once its run is verified or cancelled, and returns to the
pool of free sequences.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable

from pipeinfer_cpu.llama.kvcache import COMMITTED_SEQ
from pipeinfer_cpu.wire.runs import KvKind, KvOp

MAX_BRANCHES_PER_RUN = 2


@dataclass(frozen=True)
class Branch:
    """A second-choice draft token beside the main path: same position, a KV sequence of its own."""

    position: int
    token: int
    seq: int


@dataclass(frozen=True)
class Launch:
    """A run to send: main-path tokens at consecutive positions from `start`, which of them want a
    result, and branches (each wants one); `rows()` lays them out as llama.cpp's batch."""

    run_id: int
    start: int
    tokens: tuple[int, ...]
    outputs: tuple[bool, ...]
    n_draft: int  # how many of the main tokens are draft guesses
    kv_ops: tuple[KvOp, ...]
    branches: tuple[Branch, ...] = ()

    def rows(self) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...], tuple[int, ...], tuple[bool, ...]]:
        """(positions, seq ids, tokens, outputs) of the batch, in `batch_order`: the main path in
        the committed sequence and in every branch's sequence it precedes; each branch in its own."""
        rows = []
        for kind, index in batch_order(self.start, len(self.tokens), self.branches):
            if kind == "branch":
                branch = self.branches[index]
                rows.append((branch.position, (branch.seq,), branch.token, True))
            else:
                position = self.start + index
                seqs = (COMMITTED_SEQ,) + tuple(b.seq for b in self.branches if b.position > position)
                rows.append((position, seqs, self.tokens[index], self.outputs[index]))
        if not rows:
            return (), (), (), ()
        positions, seq_ids, tokens, outputs = zip(*rows)
        return positions, seq_ids, tokens, outputs

    def output_rows(self) -> dict[tuple[str, int], int]:
        """Which row of the result answers ("main", position) or ("branch", index)."""
        wanted = [(kind, self.start + i if kind == "main" else i)
                  for kind, i in batch_order(self.start, len(self.tokens), self.branches)
                  if kind == "branch" or self.outputs[i]]
        return {entry: row for row, entry in enumerate(wanted)}


def batch_order(start: int, n_tokens: int, branches: Sequence[Branch]) -> list[tuple[str, int]]:
    """The rows of a run in batch order: ("main", index) and ("branch", index) by position, a
    branch before the main token at its position. Why: llama.cpp wants each sequence's positions
    increasing in a batch, and (measured) its CPU attention without flash attention gives a token
    wrong logits when another sequence's token at the same position precedes it."""
    keyed = [((start + i, 1), ("main", i)) for i in range(n_tokens)]
    keyed += [((b.position, 0), ("branch", j)) for j, b in enumerate(branches)]
    return [entry for _, entry in sorted(keyed)]


@dataclass(frozen=True)
class Verdict:
    """What one result decided."""

    decided: tuple[int, ...]  # newly decided tokens, in order
    confirmed: int  # draft tokens that turned out right (an adopted branch included)
    rejected: bool  # a main-path draft token turned out wrong (later speculation was dropped)
    cancelled: tuple[int, ...]  # run ids made stale
    branch_adopted: bool = False  # the target chose a branch's token where the main path was wrong


@dataclass
class _InFlight:
    run_id: int
    start: int
    n_tokens: int
    first_output: int  # position of the first main-path row with an output
    branches: tuple[Branch, ...]
    output_rows: dict  # ("main", position) or ("branch", index) -> row of the result

    def main_row(self, position: int) -> int:
        return self.output_rows[("main", position)]

    def branch_for(self, position: int, token: int) -> tuple[int, Branch] | None:
        """(output row, branch) of the branch holding `token` at `position`, if there is one."""
        for index, branch in enumerate(self.branches):
            if branch.position == position and branch.token == token:
                return self.output_rows[("branch", index)], branch
        return None


@dataclass
class Chain:
    """Decided tokens, fed tokens and runs in flight of one request."""

    decided: list[int]  # the target's own tokens so far: the prompt, then what it chose
    fed: list[int]
    limit: int  # stop once len(decided) reaches this (prompt + max new tokens)
    new_run_id: Callable[[], int]  # run ids are unique across requests: stale results can still arrive
    epoch: int = 0  # bumped whenever speculation is dropped; drafts of an older epoch are stale
    inflight: deque = field(default_factory=deque)
    pending_ops: list[KvOp] = field(default_factory=list)
    free_seqs: list[int] = field(default_factory=list)  # KV sequences for branches (none: no trees)

    @staticmethod
    def for_prompt(committed: list[int], prompt: list[int], limit: int, new_run_id: Callable[[], int],
                   branch_seqs: Sequence[int] = ()) -> "Chain":
        """A chain whose stages already hold `committed`, about to be fed `prompt` after it."""
        return Chain(list(committed) + list(prompt), list(committed), limit, new_run_id, free_seqs=list(branch_seqs))

    @property
    def done(self) -> bool:
        return len(self.decided) >= self.limit

    def needs_feed(self) -> bool:
        """True when decided tokens are not yet fed (the prompt, or a correction after a rejection)."""
        return len(self.fed) < len(self.decided) and not self.done

    def feed_decided(self, max_tokens: int) -> Launch:
        """A run feeding the next decided-but-unfed tokens; the last row of the last one has an output."""
        start = len(self.fed)
        tokens = self.decided[start:start + max_tokens]
        last = start + len(tokens) == len(self.decided)
        outputs = tuple(last and i == len(tokens) - 1 for i in range(len(tokens)))
        return self._launch(tokens, outputs, n_draft=0)

    def speculate(self, draft: list[int], epoch: int, base: int,
                  alternatives: Sequence[tuple[int, int]] = ()) -> Launch | None:
        """A run feeding draft tokens that continue `fed`, if the draft is still current.

        The draft was made when fed had `base` tokens. If tokens were fed since (a decided token
        the draft had guessed), the draft's first tokens must equal them and the rest is used.
        `alternatives` are (index into draft, token) branch candidates, the most wanted first; those
        that still fit become branches while free KV sequences last.
        """
        if epoch != self.epoch or len(self.fed) < len(self.decided) or base > len(self.fed):
            return None
        overlap = len(self.fed) - base
        if list(draft[:overlap]) != self.fed[base:]:
            return None
        draft = list(draft[overlap:])[:max(0, self.limit - len(self.fed))]  # never past the last token needed
        if not draft:
            return None
        branches = self._branches(draft, [(index - overlap, token) for index, token in alternatives])
        return self._launch(draft, (True,) * len(draft), n_draft=len(draft), branches=branches)

    def feed_with_draft(self, draft: list[int], alternatives: Sequence[tuple[int, int]] = ()) -> Launch:
        """One run feeding the decided-but-unfed tokens followed by draft tokens (and branches)."""
        unfed = self.decided[len(self.fed):]
        if not unfed:
            raise ValueError("feed_with_draft needs a decided token to feed first")
        draft = draft[:max(0, self.limit - len(self.decided))]
        outputs = (False,) * (len(unfed) - 1) + (True,) * (1 + len(draft))
        branches = self._branches(unfed + draft, [(len(unfed) + index, token) for index, token in alternatives])
        return self._launch(unfed + draft, outputs, n_draft=len(draft), branches=branches)

    def join(self, draft: list[int], epoch: int, n_decided: int,
             alternatives: Sequence[tuple[int, int]] = ()) -> Launch | None:
        """feed_with_draft for a draft asked when `n_decided` tokens were decided, if it is still current."""
        if epoch != self.epoch or n_decided != len(self.decided) or not self.needs_feed():
            return None
        return self.feed_with_draft(draft, alternatives)

    def _branches(self, tokens: list[int], alternatives: Sequence[tuple[int, int]]) -> tuple[Branch, ...]:
        """Branches for a run about to feed `tokens` from len(fed): (index into tokens, token) candidates
        that fit, while free KV sequences last. Never at the run's first position: the row deciding
        that one belongs to an earlier run."""
        start = len(self.fed)
        branches: list[Branch] = []
        for at, token in alternatives:
            if 1 <= at < len(tokens) and token != tokens[at] and self.free_seqs and len(branches) < MAX_BRANCHES_PER_RUN:
                branches.append(Branch(start + at, token, self.free_seqs.pop(0)))
        # The branch sequences see the fed prefix (cells are tagged, not copied) before the run computes.
        self.pending_ops.extend(KvOp(KvKind.CP, COMMITTED_SEQ, b.seq, 0, start) for b in branches)
        return tuple(branches)

    def _launch(self, tokens: list[int], outputs: tuple[bool, ...], n_draft: int,
                branches: tuple[Branch, ...] = ()) -> Launch:
        start = len(self.fed)
        launch = Launch(self.new_run_id(), start, tuple(tokens), outputs, n_draft, tuple(self.pending_ops), branches)
        self.pending_ops = []
        self.fed.extend(tokens)
        if any(outputs):
            first = start + outputs.index(True)
            self.inflight.append(_InFlight(launch.run_id, start, len(tokens), first, branches, launch.output_rows()))
        return launch

    def is_live(self, run_id: int) -> bool:
        return any(run.run_id == run_id for run in self.inflight)

    def on_result(self, run_id: int, choose: Callable[[int], int]) -> Verdict | None:
        """Process the result of a run; `choose(row)` gives the target's token for an output row
        (called only for rows that decide something, in order, each time with `decided` holding
        exactly the tokens before the position the row decides: a choice that depends on them, as
        a repetition penalty does, reads them there). None for a stale run's result."""
        if not self.inflight or self.inflight[0].run_id != run_id:
            if self.is_live(run_id):
                raise RuntimeError(f"result of run {run_id} arrived before older runs' results")
            return None
        run = self.inflight.popleft()
        new: list[int] = []
        confirmed = 0
        verdict = None
        for position in range(run.first_output, run.start + run.n_tokens):
            if position != len(self.decided) - 1 or self.done:
                break
            token = choose(run.main_row(position))
            self.decided.append(token)
            new.append(token)
            nxt = position + 1
            if nxt >= len(self.fed):
                break  # nothing speculative fed there: the next run feeds the decided token
            if self.fed[nxt] == token:
                confirmed += 1
                continue
            cancelled = self._drop_from(nxt)
            adopted = run.branch_for(nxt, token)
            if adopted is not None:
                confirmed += 1
                new.extend(self._adopt(adopted[0], choose))
            verdict = Verdict(tuple(new), confirmed, True, cancelled, adopted is not None)
            break
        self._release(run)
        return verdict or Verdict(tuple(new), confirmed, False, ())

    def _adopt(self, row: int, choose: Callable[[int], int]) -> list[int]:
        """The target chose a branch's token: the branch's output `row` decides the next position too.

        The branch's KV cell is not moved into the committed sequence (CP s -> 0): the token is fed
        again with the next run instead. Measured: llama.cpp's result for a token then depends on
        the slot order of the cells it attends to, and an adopted cell sits in a slot after cells of
        later positions, so a copy would change the target's logits (by up to 0.33) and break
        losslessness. Re-feeding costs one more row in a run that feeds the decided token anyway.
        """
        if self.done:
            return []
        token = choose(row)
        self.decided.append(token)
        return [token]

    def _release(self, run: _InFlight) -> None:
        """Remove a finished or cancelled run's branch sequences on every stage and reuse them."""
        for branch in run.branches:
            self.pending_ops.append(KvOp(KvKind.RM, branch.seq, 0, -1, -1))
            self.free_seqs.append(branch.seq)

    def _drop_from(self, position: int) -> tuple[int, ...]:
        """Forget fed tokens from `position` on: cancel their runs and queue their KV removal."""
        del self.fed[position:]
        self.pending_ops.append(KvOp(KvKind.RM, COMMITTED_SEQ, 0, position, -1))
        return self._cancel_inflight()

    def _cancel_inflight(self) -> tuple[int, ...]:
        cancelled = tuple(run.run_id for run in self.inflight)
        for run in self.inflight:
            self._release(run)
        self.inflight.clear()
        self.epoch += 1
        return cancelled

    def finish(self) -> tuple[tuple[int, ...], tuple[KvOp, ...]]:
        """End the request: cancel what is in flight and keep only decided tokens in the KV cache.

        The last decided token stays unfed (as after plain decoding): the next request starts with it.
        """
        keep = min(len(self.fed), len(self.decided) - 1)
        cancelled = self._cancel_inflight()
        ops = tuple(self.pending_ops)
        if len(self.fed) > keep:
            ops += (KvOp(KvKind.RM, COMMITTED_SEQ, 0, keep, -1),)
            del self.fed[keep:]
        self.pending_ops = []
        return cancelled, ops


def branch_candidates(second_tokens: Sequence[int], second_probs: Sequence[float],
                      p_split: float) -> list[tuple[int, int]]:
    """(draft index, token) of the draft's runner-up tokens worth a branch (PipeInfer's p_split:
    probability at least `p_split`), the most likely first."""
    wanted = [(prob, index, token) for index, (token, prob) in enumerate(zip(second_tokens, second_probs))
              if prob >= p_split and token >= 0]
    return [(index, token) for _, index, token in sorted(wanted, key=lambda w: -w[0])]


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


STRATEGIES = ("eager", "joint", "off")


@dataclass
class SpeculationSwitch:
    """How pipeinfer feeds the pipeline, chosen online from the decode speed each way has shown.

    - eager (PipeInfer's own): a decided token is launched alone at once; speculation follows in
      further runs. Best when the pipeline has idle stages for that one-token run to fill.
    - joint: a decided token that nothing speculative follows waits for the draft's continuation
      and travels with it in one run. Only offered with one target stage: there a one-token run
      occupies the whole pipeline, while with several stages it holds only the first one and the
      others would idle during the wait (measured on 16 cores, 4 stages: trying it cost pipeinfer
      about a fifth of its lead over the pipeline).
    - off: no speculation (plain pipelined decoding), when the draft does not pay at all.

    It decodes in windows of `window` tokens, keeps a smoothed tokens/s per strategy, runs the
    fastest, and now and then spends a window on a runner-up (in turn) so the estimates stay
    current: first after `explore_every` windows; each exploration that confirms the leader
    doubles the wait (up to `max_explore_every`), one that finds a faster strategy resets it, so a
    clear winner is rarely disturbed. Deterministic (no random draws), so a run is reproducible;
    the output never depends on it (verification is lossless).
    """

    window: int = 16
    # With several target stages a speculative run of one draft token keeps the most stages busy with
    # the freshest guesses: a run enters the pipeline every stage time, and a longer run both costs more
    # per stage and waits for more draft tokens. Measured on 16 cores (README, "Speculation on 16
    # cores"): pipeinfer 1.24-1.56x the pipeline with runs of up to 8 tokens and 4 in flight,
    # 1.9-2.1x with one token per run and a run in flight per stage; `plan` predicted the same.
    run_tokens: int | None = None  # draft tokens per run at most (None: as DraftPolicy decides)
    inflight: int = 1  # runs in flight at least (beside --max-inflight): one per stage
    # With several stages, off's speed is read from the decided tokens' one-token runs while eager
    # speculates (each costs what plain pipelining costs per token), so no window is spent trying off:
    # on 8 stages such tries cost about a tenth of pipeinfer's speed in short requests (`plan`).
    off_from_runs: bool = False
    explore_every: int = 4
    max_explore_every: int = 32
    smoothing: float = 0.5
    strategies: tuple[str, ...] = STRATEGIES
    strategy: str = STRATEGIES[0]
    rates: dict = field(default_factory=dict)  # strategy -> smoothed tokens/s
    windows: int = 0
    explorations: int = 0
    _wait: int = 0  # windows between explorations now (0: not started)
    _since: int = 0  # windows since the last exploration
    _leader: str | None = None  # the leader when the current window is an exploration

    @staticmethod
    def for_stages(n_stages: int) -> "SpeculationSwitch":
        """How to feed a pipeline of `n_stages` target stages: the strategies worth trying, and with
        several stages (adaptive drafting) one draft token per run and a run in flight per stage."""
        if n_stages == 1:
            return SpeculationSwitch(strategies=STRATEGIES)
        return SpeculationSwitch(strategies=("eager", "off"), run_tokens=1, inflight=n_stages, off_from_runs=True)

    @property
    def speculating(self) -> bool:
        return self.strategy != "off"

    def observe_plain_run(self, seconds: float) -> None:
        """A decided token's one-token run took `seconds` from launch to result (while speculating):
        with `off_from_runs`, that is plain pipelining's time per token, off's estimate."""
        if not self.off_from_runs or not self.speculating or seconds <= 0:
            return
        rate, old = 1.0 / seconds, self.rates.get("off")
        self.rates["off"] = rate if old is None else old + self.smoothing * (rate - old)

    def observe(self, tokens: int, seconds: float) -> None:
        """Record one finished window of the current strategy, then pick the next one."""
        if tokens <= 0 or seconds <= 0:
            return
        rate = tokens / seconds
        old = self.rates.get(self.strategy)
        self.rates[self.strategy] = rate if old is None else old + self.smoothing * (rate - old)
        self.windows += 1
        if self._leader is not None:  # an exploration just ended
            beaten = self.rates[self.strategy] > self.rates[self._leader]
            self._wait = self.explore_every if beaten else min(2 * self._wait, self.max_explore_every)
            self._leader = None
        self.strategy = self._next_strategy()

    def _next_strategy(self) -> str:
        estimated = {"off"} if self.off_from_runs else set()
        untried = [s for s in self.strategies if s not in self.rates and s not in estimated]
        if untried:
            return untried[0]
        ranked = sorted((s for s in self.strategies if s in self.rates), key=lambda s: -self.rates[s])
        # an estimated strategy needs no exploration while another runs: it is kept current anyway
        runners_up = [s for s in ranked[1:] if s not in estimated or ranked[0] in estimated]
        self._wait = self._wait or self.explore_every
        self._since += 1
        if self._since < self._wait or not runners_up:
            return ranked[0]
        self._since = 0
        self._leader = ranked[0]
        self.explorations += 1
        return runners_up[(self.explorations - 1) % len(runners_up)]
