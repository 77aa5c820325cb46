"""The plain decoding loop (modes `single` and `pipeline`): one token per run, in order.

The `Decoder` feeds the committed sequence (KV sequence 0 on every stage) that its `Context` owns.
Tokens are streamed to a callback as they are sampled; the caller decides when to stop (EOS, -n,
an interrupt).
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from pipeinfer_cpu.head.clock import REAL_CLOCK, Clock
from pipeinfer_cpu.head.executors import RunResult
from pipeinfer_cpu.head.session import Context
from pipeinfer_cpu.llama.kvcache import COMMITTED_SEQ
from pipeinfer_cpu.sampling import SamplingConfig, make_rng, sample
from pipeinfer_cpu.wire.runs import Output, RunMessage


@dataclass(frozen=True)
class Generation:
    """What one request produced, with the timings statistics are made of."""

    prompt_tokens: tuple[int, ...]
    tokens: tuple[int, ...]
    prefill_s: float
    token_times_s: tuple[float, ...]  # since the request started
    first_logits: np.ndarray | None = field(default=None, compare=False)
    stopped_by: str = "length"  # "length", "eos", "interrupt" or "context" (the plain decoder only)


@dataclass
class Record:
    """The tokens a request decided, their times since it started, and why it stopped: kept the
    same way by every loop, so the statistics mean the same in every mode."""

    started: float
    tokens: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    first_token_at: float | None = None  # when the first token was decided: prefill ends, decoding starts
    stopped_by: str = "length"  # or "eos", "interrupt", "context"
    clock: Clock = field(default=REAL_CLOCK, repr=False, compare=False)

    def add(self, token: int, on_token: Callable[[int], None], is_end: Callable[[int], bool],
            decided_at: float | None = None) -> bool:
        """Record a token decided now (or at `decided_at`) and stream it; False when it ends the generation (EOS)."""
        self.tokens.append(token)
        now = self.clock.now() if decided_at is None else decided_at
        self.times.append(now - self.started)
        if len(self.tokens) == 1:
            self.first_token_at = now
        on_token(token)
        if is_end(token):
            self.stopped_by = "eos"
            return False
        return True


class TextStream:
    """Turns token pieces (bytes, possibly half a UTF-8 character) into printable text."""

    def __init__(self, piece: Callable[[int], bytes]) -> None:
        self._piece = piece
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._decoder.decode(self._piece(token))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class Decoder:
    """Sequential decoding over the executor of a context, which it extends token by token."""

    def __init__(self, context: Context, n_batch: int, n_ctx: int) -> None:
        self.context = context
        self.executor = context.executor
        self.n_batch = n_batch
        self.n_ctx = n_ctx

    def prefill(self, tokens: list[int], want_logits: bool) -> RunResult:
        """Feed tokens after the committed ones in chunks of n_batch; return the last row's result.

        The chunks are launched back to back, so in a pipeline the stages work on them concurrently.
        """
        if not tokens:
            raise ValueError("nothing to prefill")
        start = len(self.context)
        chunks = [tokens[i:i + self.n_batch] for i in range(0, len(tokens), self.n_batch)]
        for index, chunk in enumerate(chunks):
            last = index == len(chunks) - 1
            at = start + index * self.n_batch
            outputs = tuple(last and i == len(chunk) - 1 for i in range(len(chunk)))
            self.executor.launch(RunMessage(
                self.context.new_run_id(), positions=tuple(range(at, at + len(chunk))),
                seq_ids=((COMMITTED_SEQ,),) * len(chunk), tokens=tuple(chunk), outputs=outputs,
                output_kind=Output.LOGITS if want_logits else Output.ARGMAX))
        self.context.extend(tokens)
        return self.executor.wait()

    def launch_step(self, token: int, want_logits: bool) -> None:
        """Feed one sampled token; its result (for the position after it) comes from the executor."""
        position = len(self.context)
        self.executor.launch(RunMessage(
            self.context.new_run_id(), positions=(position,), seq_ids=((COMMITTED_SEQ,),), tokens=(token,),
            outputs=(True,), output_kind=Output.LOGITS if want_logits else Output.ARGMAX))
        self.context.extend((token,))

    def _stop_reason(self, token: int, n_decided: int, max_tokens: int, is_end: Callable[[int], bool],
                     should_stop: Callable[[], bool]) -> str | None:
        """Why the generation ends with `token` (the n-th decided), or None to go on."""
        if is_end(token):
            return "eos"
        if n_decided == max_tokens:
            return "length"
        if should_stop():
            return "interrupt"
        if len(self.context) + 1 >= self.n_ctx:
            return "context"
        return None

    def generate(
        self,
        new_tokens: list[int],
        max_tokens: int,
        sampling: SamplingConfig,
        is_end: Callable[[int], bool],
        on_token: Callable[[int], None] = lambda token: None,
        should_stop: Callable[[], bool] = lambda: False,
        keep_first_logits: bool = False,
        drawn: int = 0,
    ) -> Generation:
        """Prefill `new_tokens`, then sample up to `max_tokens` tokens, streaming each to on_token.

        The last sampled token is not fed back: it stays pending, and the caller's next request
        starts with it (the context says what the stages hold). `drawn`: positions an earlier job
        decided (a resumed answer), whose random draws are skipped.
        """
        rng = make_rng(sampling, drawn)
        want_logits = sampling.needs_logits or keep_first_logits
        clock = self.context.clock
        started = clock.now()
        result = self.prefill(new_tokens, want_logits)
        prefill_s = clock.now() - started
        first_logits = result.payload[0].copy() if result.output_kind == Output.LOGITS else None
        want_logits = sampling.needs_logits
        record = Record(started, clock=clock)
        while len(record.tokens) < max_tokens:
            token = choose(result, 0, sampling, rng, self.context.tokens)  # a plain run has one output row
            decided_at = clock.now()
            stop = self._stop_reason(token, len(record.tokens) + 1, max_tokens, is_end, should_stop)
            # Launch first, so that the pipeline computes the next token while this one is streamed; but
            # stream the first token before: decoding, and its statistics (decode bytes), start with it.
            launch_early = stop is None and len(record.tokens) > 0
            if launch_early:
                self.launch_step(token, want_logits)
            record.add(token, on_token, is_end, decided_at)
            if stop is not None:
                record.stopped_by = stop
                break
            if not launch_early:
                self.launch_step(token, want_logits)
            result = self.executor.wait()
        return Generation(tuple(new_tokens), tuple(record.tokens), prefill_s, tuple(record.times), first_logits,
                          record.stopped_by)


def choose(result: RunResult, row: int, sampling: SamplingConfig, rng: np.random.Generator,
           history: Sequence[int]) -> int:
    """The target's token for an output row of a result, in every mode; `history` holds every
    token before the position it decides (the penalties look at its tail). One uniform is drawn
    per decided position, also when greedy (as `sample` does), so the random stream, and so a
    seeded sample, is the same whatever decided the earlier tokens."""
    if result.output_kind == Output.ARGMAX:
        rng.random()
        return int(result.payload[row])
    return sample(result.payload[row], sampling, rng, history)
