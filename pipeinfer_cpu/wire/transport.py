"""Message transport between ranks. The only module that imports mpi4py.

Messages are flat byte buffers (numpy uint8) sent with non-blocking MPI calls; nothing on the hot
path is pickled. Waiting never spins: MPICH's blocking receive busy-polls a core, which on a small
machine halves the speed of the rank that is computing. Nor does it poll with blind sleeps, which
wake late (a hop cost ~1.3 ms that way): every send also rings the receiver's doorbell
(wire/doorbell.py), and a waiting rank sleeps in the kernel until it is rung, polling MPI at once.

Emulated slow links (wire/links.py) are applied here, on the sending side only: `use_links` gives
the transport one `LinkState` per shaped destination, and `send` hands a shaped message to a
`Shaper` thread that issues its `Isend` when the message would have arrived (its last bit left at
the link's rate behind the messages queued before it, plus the one-way delay). The caller's `send`
returns at once, so pacing never blocks compute; the thread sleeps on a condition between sends.
Delaying at the sender, not holding at the receiver, keeps the timing independent of when the
receiver happens to poll (a rank that computes while a message flies would otherwise add the delay
after its compute) and needs no clock shared between machines; `poll` and `pending` are unchanged.
"""

from __future__ import annotations

import ctypes
import heapq
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

import numpy as np

from pipeinfer_cpu.errors import PipeinferError
from pipeinfer_cpu.wire.doorbell import IDLE_POLL_S, Doorbell
from pipeinfer_cpu.wire.faults import FaultInjector
from pipeinfer_cpu.wire.links import LinkMap, LinkState

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

    def idle(self, at_most_s: float) -> None:
        """Sleep until a message may have come for this rank, or `at_most_s` has passed."""
        ...

    def use_links(self, links: LinkMap) -> None: ...


class Backoff:
    """Sleep intervals for a poll loop that no doorbell can end (sends completing, a head whose every
    source of results is in its own process): short at first, growing to 5 ms the longer it waits.
    """

    def __init__(self, fast_s: float = 0.0001, fast_window_s: float = 0.02, slow_s: float = 0.005) -> None:
        self.fast_s, self.fast_window_s, self.slow_s = fast_s, fast_window_s, slow_s
        self.started = time.perf_counter()

    def sleep(self) -> None:
        idle = time.perf_counter() - self.started
        if idle < self.fast_window_s:
            time.sleep(self.fast_s)
        else:
            time.sleep(min(self.slow_s, self.fast_s * (1 + idle / self.fast_window_s)))


def wait(transport: Transport, channels: Iterable[tuple[int, int]], timeout_s: float | None) -> Message | None:
    """Poll until a message arrives on one of (source, tag) channels, idling in between; None after `timeout_s`."""
    channels = tuple(channels)
    deadline = None if timeout_s is None else time.perf_counter() + timeout_s
    while True:
        message = transport.poll(channels)
        if message is not None:
            return message
        left = IDLE_POLL_S if deadline is None else deadline - time.perf_counter()
        if left <= 0:
            return None
        transport.idle(left)


class TransportIdler:
    """The head's idle step between polls of several sources (runs, drafts): the transport's `idle`."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    def sleep(self) -> None:
        self.transport.idle(IDLE_POLL_S)


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


class Shaper:
    """Sender-side link emulation: `submit` queues a message on its destination's link; a thread
    hands it to `isend` at its arrival time (heap order; per destination that is FIFO order).

    A timed wait wakes late (on Linux ~60-90 us: the timer slack and the scheduler), so the thread
    asks to wake earlier by its recent lateness (a running average, at most MAX_LEAD_S) and lowers
    its own timer slack where the OS allows; it never spins.
    """

    MAX_LEAD_S = 0.0005

    def __init__(self, links: dict[int, LinkState], isend: Callable[[int, int, np.ndarray], None],
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self._links = dict(links)
        self._isend = isend
        self._clock = clock
        self._due: list[tuple[float, int, int, int, np.ndarray]] = []  # (arrival, order, dest, tag, buffer)
        self._order = 0
        self._in_hand = 0  # taken from the heap, Isend not yet issued
        self._lead_s = 0.0  # how much earlier than due to ask to be woken
        self._closed = False
        self._condition = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="link-shaper", daemon=True)
        self._thread.start()

    def shapes(self, dest: int) -> bool:
        return dest in self._links

    def submit(self, dest: int, tag: int, buffer: np.ndarray) -> None:
        with self._condition:
            self._links[dest], timing = self._links[dest].send(self._clock(), buffer.nbytes)
            heapq.heappush(self._due, (timing.arrives_s, self._order, dest, tag, buffer))
            self._order += 1
            self._condition.notify()

    def idle(self) -> bool:
        """Nothing queued or being handed over."""
        with self._condition:
            return not self._due and not self._in_hand

    def close(self) -> None:
        """Stop the thread once the queue is empty (callers flush first)."""
        with self._condition:
            self._closed = True
            self._condition.notify()

    def _run(self) -> None:
        fine_timer_slack()
        while True:
            with self._condition:
                while True:
                    if self._closed and not self._due:
                        return
                    wake_s = self._due[0][0] - self._lead_s if self._due else None
                    wait_s = None if wake_s is None else wake_s - self._clock()
                    if wait_s is not None and wait_s <= 0:
                        _, _, dest, tag, buffer = heapq.heappop(self._due)
                        self._in_hand += 1
                        break
                    if not self._condition.wait(wait_s) and wake_s is not None:  # timed out: it woke this late
                        late = min(self.MAX_LEAD_S, max(0.0, self._clock() - wake_s))
                        self._lead_s = 0.9 * self._lead_s + 0.1 * late
            try:
                self._isend(dest, tag, buffer)
            finally:
                with self._condition:
                    self._in_hand -= 1


def fine_timer_slack() -> None:
    """Let this thread's timed waits end within ~1 us of their deadline (Linux prctl PR_SET_TIMERSLACK;
    elsewhere, or if refused, nothing changes)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).prctl(29, 1000, 0, 0, 0)  # PR_SET_TIMERSLACK, in nanoseconds
    except (OSError, AttributeError):
        pass


EAGER_WINDOW_S = 0.002  # after a ring, how long to keep polling for its message before sleeping again
EAGER_SLEEP_S = 0.00005


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
        self._shaper: Shaper | None = None
        # Every rank learns every other's doorbell once, at the start (each process makes one transport).
        fine_timer_slack()  # the short sleeps after a ring end when asked to
        self._doorbell = Doorbell(self.rank)
        self._doorbell.know_peers(self._comm.allgather(self._doorbell.address))
        self._eager_until = 0.0
        self._faults = FaultInjector.from_env(self.rank)  # tests only (wire/faults.py)

    def use_links(self, links: LinkMap) -> None:
        """Shape this rank's sends by `links` from now on (every rank calls it, with the head's map, before
        it sends anything shaped: the head in Cluster.greet, a worker on the head's Setup)."""
        outgoing = links.outgoing(self.rank, self.size)
        if not outgoing or self._shaper is not None:
            return
        if self._mpi.Query_thread() < self._mpi.THREAD_MULTIPLE:
            raise PipeinferError("emulated links need an MPI with MPI_THREAD_MULTIPLE (the sends leave from a thread)")
        self._shaper = Shaper(outgoing, self._isend)

    def send(self, dest: int, tag: int, data: np.ndarray) -> None:
        buffer = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        if self._faults is not None:
            buffer = self._faults.apply(tag, buffer)
        if self._shaper is not None and self._shaper.shapes(dest):
            with self._pending_lock:
                self.bytes_sent += buffer.nbytes
            self._shaper.submit(dest, tag, buffer.copy())  # the caller may reuse its array before it leaves
        else:
            self._isend(dest, tag, buffer, count=True)
        self._reap()

    def _isend(self, dest: int, tag: int, buffer: np.ndarray, count: bool = False) -> None:
        with self._pending_lock:
            request = self._comm.Isend([buffer, self._mpi.BYTE], dest=dest, tag=tag)
            self._pending.append((request, buffer))  # the buffer must live until the send completes
            if count:
                self.bytes_sent += buffer.nbytes
        self._doorbell.ring(dest)  # after the Isend: a rung rank must find the message soon

    def _reap(self) -> None:
        with self._pending_lock:
            self._pending = [(r, b) for r, b in self._pending if not r.Test()]

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait (without spinning) until every send has completed; False on timeout."""
        deadline = time.perf_counter() + timeout_s
        backoff = Backoff()
        while self._shaper is not None and not self._shaper.idle():
            if time.perf_counter() > deadline:
                return False
            backoff.sleep()
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
            self._doorbell.received(status.Get_source())
            return Message(status.Get_source(), status.Get_tag(), buffer)
        return None

    def idle(self, at_most_s: float) -> None:
        """Sleep until rung (or `at_most_s`, at most IDLE_POLL_S). A ring can come before MPI shows its
        message (over TCP the data may trail the datagram): then poll in short sleeps for a little while."""
        if self._doorbell.take_rings():
            self._eager_until = time.perf_counter() + EAGER_WINDOW_S
            return  # poll again at once: MPI usually shows the message on the next progress call
        if self._doorbell.expecting() and time.perf_counter() < self._eager_until:
            time.sleep(min(at_most_s, EAGER_SLEEP_S))
            return
        self._doorbell.sleep(min(at_most_s, IDLE_POLL_S))

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
        if self._shaper is not None:
            self._shaper.close()
        self.drain()
        self._doorbell.close()
        self._mpi.Finalize()
