"""How the head's loops read the time and wait idle: the real clock, or a simulated one.

The loops never call `time` themselves: they ask the `Clock` of their `Context`. The real clock
reads `time.perf_counter` and idles until the transport is rung (`TransportIdler`); the performance model
(pipeinfer_cpu/plan/) passes a simulated clock whose idling jumps to the next simulated event, so
the same scheduling code predicts a pipeline's speed without running one.
"""

from __future__ import annotations

import time
from typing import Protocol

from pipeinfer_cpu.wire.transport import Backoff, Transport, TransportIdler


class Idler(Protocol):
    """Waits a little while a poll loop has nothing to do (`Backoff` is one)."""

    def sleep(self) -> None: ...


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since an arbitrary origin, monotonic."""
        ...

    def idler(self) -> Idler:
        """A fresh idler for one wait (its intervals may grow the longer it waits)."""
        ...


class RealClock:
    """Wall time: `time.perf_counter`, idling until the transport is rung (with a `Backoff` when there is
    none: every source of results is then in this process and answers at once)."""

    def __init__(self, transport: Transport | None = None) -> None:
        self.transport = transport

    def now(self) -> float:
        return time.perf_counter()

    def idler(self) -> Idler:
        return Backoff() if self.transport is None else TransportIdler(self.transport)


REAL_CLOCK = RealClock()
