"""KV-cache operations as the stages apply them (the head decides them; stages only execute)."""

from __future__ import annotations

from typing import Iterable, Protocol

from pipeinfer_cpu.wire.runs import KvKind, KvOp

COMMITTED_SEQ = 0  # the KV sequence that holds the fed tokens on every stage


class KvCache(Protocol):
    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> bool: ...

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None: ...

    def seq_keep(self, seq: int) -> None: ...

    def clear(self) -> None: ...


def apply_kv_ops(cache: KvCache, ops: Iterable[KvOp]) -> None:
    """Apply operations in order: every stage applies the same list at the same point of the run stream."""
    for op in ops:
        if op.kind == KvKind.RM:
            cache.seq_rm(op.a, op.p0, op.p1)
        elif op.kind == KvKind.CP:
            cache.seq_cp(op.a, op.b, op.p0, op.p1)
        elif op.kind == KvKind.KEEP:
            cache.seq_keep(op.a)
        elif op.kind == KvKind.CLEAR:
            cache.clear()
        else:
            raise ValueError(f"unknown KV operation {op.kind!r}")
