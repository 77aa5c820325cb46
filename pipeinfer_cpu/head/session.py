"""The committed context of the head: what KV sequence 0 holds on every stage, and the run ids.

One object owns both, so the plain decoder and the speculative loops never write each other's
state: each takes the `Context`, feeds through its executor, and tells it what the stages now hold.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeinfer_cpu.head.clock import REAL_CLOCK, Clock
from pipeinfer_cpu.head.executors import Executor
from pipeinfer_cpu.llama.kvcache import COMMITTED_SEQ
from pipeinfer_cpu.wire.runs import KvKind, KvOp, RunMessage


class Context:
    """The committed tokens of the stages behind one executor, kept between requests.

    Run ids come from here too: they must be unique across requests and loops, because a stale
    result of an earlier request can still arrive and must not be taken for a new run's.
    """

    def __init__(self, executor: Executor, clock: Clock = REAL_CLOCK) -> None:
        self.executor = executor
        self.clock = clock  # what every loop on this context reads the time from
        self._tokens: list[int] = []  # tokens whose KV entries are in sequence 0 on every stage
        self._next_run = 0

    @property
    def tokens(self) -> tuple[int, ...]:
        return tuple(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    def new_run_id(self) -> int:
        self._next_run += 1
        return self._next_run

    def extend(self, tokens: Sequence[int]) -> None:
        """Record tokens just launched after the committed ones (the plain decoder, as it feeds)."""
        self._tokens.extend(tokens)

    def commit(self, tokens: Sequence[int]) -> None:
        """Record what a speculative request left in sequence 0 (it launched the KV removals itself)."""
        self._tokens = list(tokens)

    def reset(self) -> None:
        """Forget the context on every stage."""
        self.executor.launch(RunMessage(self.new_run_id(), kv_ops=(KvOp(KvKind.CLEAR),)))
        self._tokens = []

    def truncate(self, n_keep: int) -> None:
        """Drop committed tokens from position n_keep on (e.g. an interrupted turn's tail)."""
        if n_keep < len(self._tokens):
            op = KvOp(KvKind.RM, COMMITTED_SEQ, 0, n_keep, -1)
            self.executor.launch(RunMessage(self.new_run_id(), kv_ops=(op,)))
            self._tokens = self._tokens[:n_keep]
