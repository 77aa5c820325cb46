"""Message transport between ranks. The only module that imports mpi4py.

Messages are flat byte buffers (numpy uint8) sent with non-blocking MPI calls; nothing on the hot
path is pickled. Waiting never spins: MPICH's blocking receive busy-polls a core, which on a small
machine halves the speed of the rank that is computing, so `wait` polls with short sleeps that grow
the longer a rank stays idle.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Protocol

import numpy as np

ANY = -1


@dataclass(frozen=True)
class Message:
    source: int
    tag: int
    data: np.ndarray  # uint8


class Transport(Protocol):
    """What ranks need from the network: send, poll, and a bounded wait."""

    rank: int
    size: int
    bytes_sent: int

    def send(self, dest: int, tag: int, data: np.ndarray) -> None: ...

    def poll(self, channels: Iterable[tuple[int, int]]) -> Message | None: ...

    def pending(self, channels: Iterable[tuple[int, int]]) -> bool: ...


class Backoff:
    """Sleep intervals for an idle poll loop: short while a message is likely soon, longer later.

    A pipeline stage usually waits a few milliseconds for the next activation, so the first 20 ms
    poll every ~0.1 ms (a few percent of a core); a rank idle for longer (a chat waiting for the
    user) backs off to 5 ms, costing almost nothing. `first_sleep_s` lets a caller that knows the
    message cannot come sooner skip the polls before it.
    """

    def __init__(self, fast_s: float = 0.0001, fast_window_s: float = 0.02, slow_s: float = 0.005,
                 first_sleep_s: float = 0.0) -> None:
        self.fast_s, self.fast_window_s, self.slow_s = fast_s, fast_window_s, slow_s
        self.first_sleep_s = first_sleep_s
        self.started = time.perf_counter()

    def sleep(self) -> None:
        if self.first_sleep_s > 0:
            time.sleep(self.first_sleep_s)
            self.first_sleep_s = 0.0
            return
        idle = time.perf_counter() - self.started
        if idle < self.fast_window_s:
            time.sleep(self.fast_s)
        else:
            time.sleep(min(self.slow_s, self.fast_s * (1 + idle / self.fast_window_s)))


def wait(transport: Transport, channels: Iterable[tuple[int, int]], timeout_s: float | None,
         backoff: Backoff | None = None) -> Message | None:
    """Poll until a message arrives on one of (source, tag) channels; None after `timeout_s`."""
    channels = tuple(channels)
    backoff = backoff or Backoff()
    deadline = None if timeout_s is None else time.perf_counter() + timeout_s
    while True:
        message = transport.poll(channels)
        if message is not None:
            return message
        if deadline is not None and time.perf_counter() > deadline:
            return None
        backoff.sleep()


class Waiter:
    """`wait` for a loop that waits again and again: it learns how soon messages come.

    In a steady pipeline a rank waits about as long each time (the other stages' compute), so it
    first sleeps through most of the shortest recent wait in one go, then polls. That cuts the
    wake-ups of idle ranks, which on a small machine preempt the rank that computes. The shortest
    recent wait is a safe guess: one early message costs at most 80% of it, and after a long idle
    spell (a chat between turns) the first sleep is capped.
    """

    HISTORY = 8
    CAP_S = 0.01

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self._recent: dict[tuple, list[float]] = {}

    def wait(self, channels: Iterable[tuple[int, int]], timeout_s: float | None) -> Message | None:
        channels = tuple(channels)
        recent = self._recent.setdefault(channels, [])
        first = min(self.CAP_S, 0.8 * min(recent)) if len(recent) == self.HISTORY else 0.0
        started = time.perf_counter()
        message = wait(self.transport, channels, timeout_s, Backoff(first_sleep_s=first))
        if message is not None:
            recent.append(time.perf_counter() - started)
            del recent[:-self.HISTORY]
        return message


def under_mpi() -> bool:
    """True when this process was started by mpiexec (MPICH hydra, Open MPI, Intel MPI, Slurm PMI)."""
    markers = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MPI_LOCALRANKID")
    return any(name in os.environ for name in markers)


def rank_from_environment() -> int | None:
    """This process's rank as mpiexec announced it, before MPI is started (None: not known)."""
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return None


class MpiTransport:
    """`Transport` over an MPI communicator (COMM_WORLD by default)."""

    def __init__(self) -> None:
        from mpi4py import MPI

        self._mpi = MPI
        self._comm = MPI.COMM_WORLD
        self.rank = self._comm.Get_rank()
        self.size = self._comm.Get_size()
        self.bytes_sent = 0
        # Sends in progress, with the buffers MPI still reads. A stage's cancel watcher polls (and so
        # reaps) from its own thread while the main thread sends: the lock makes this list one owner's.
        self._pending: list[tuple[object, np.ndarray]] = []
        self._pending_lock = threading.Lock()

    def send(self, dest: int, tag: int, data: np.ndarray) -> None:
        buffer = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        with self._pending_lock:
            request = self._comm.Isend([buffer, self._mpi.BYTE], dest=dest, tag=tag)
            self._pending.append((request, buffer))  # the buffer must live until the send completes
            self.bytes_sent += buffer.nbytes
        self._reap()

    def _reap(self) -> None:
        with self._pending_lock:
            self._pending = [(r, b) for r, b in self._pending if not r.Test()]

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait (without spinning) until every send has completed; False on timeout."""
        deadline = time.perf_counter() + timeout_s
        backoff = Backoff()
        while self._pending:
            self._reap()
            if time.perf_counter() > deadline:
                return False
            if self._pending:
                backoff.sleep()
        return True

    def poll(self, channels: Iterable[tuple[int, int]]) -> Message | None:
        self._reap()
        status = self._mpi.Status()
        for source, tag in channels:
            source = self._mpi.ANY_SOURCE if source == ANY else source
            tag = self._mpi.ANY_TAG if tag == ANY else tag
            handle = self._comm.Improbe(source=source, tag=tag, status=status)
            if handle is None:
                continue
            buffer = np.empty(status.Get_count(self._mpi.BYTE), dtype=np.uint8)
            handle.Recv([buffer, self._mpi.BYTE])
            return Message(status.Get_source(), status.Get_tag(), buffer)
        return None

    def pending(self, channels: Iterable[tuple[int, int]]) -> bool:
        """True when a message waits on one of the channels (it is left there)."""
        for source, tag in channels:
            source = self._mpi.ANY_SOURCE if source == ANY else source
            tag = self._mpi.ANY_TAG if tag == ANY else tag
            if self._comm.Iprobe(source=source, tag=tag):
                return True
        return False

    def abort(self, code: int) -> None:
        """Kill every rank of the job (used after an error the head has already reported)."""
        self._comm.Abort(code)

    def drain(self) -> int:
        """Receive and drop whatever is still queued (stale results, cancels, draft replies).

        MPICH refuses to finalize a communicator holding unmatched messages.
        """
        dropped = 0
        while self.poll([(ANY, ANY)]) is not None:
            dropped += 1
        return dropped

    def finalize(self) -> None:
        self.flush(5.0)
        self.drain()
        self._mpi.Finalize()
