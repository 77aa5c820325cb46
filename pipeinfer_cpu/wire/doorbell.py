"""Doorbells: a waiting rank sleeps in the kernel and wakes the moment a message is sent to it.

MPI has no wait that neither spins nor sleeps blindly: MPICH's and Open MPI's blocking receives
busy-poll a core, and polling with sleeps wakes late (a Linux sleep overshoots by ~60 us, and a
sleep long enough to cost no CPU is a millisecond late on average). So every rank also owns a UDP
socket, its doorbell: after each send, the sender rings the receiver's (one datagram, a few
microseconds), and a waiting rank blocks in `select` on its own doorbell between polls of MPI.

A doorbell is only a hint, never a message: MPI still carries the data and its order. A ring may
arrive before MPI shows the message (the rank then polls briefly), may be spurious (it polls and
sleeps again), or may be lost (a firewall dropping UDP): the waiting rank still polls MPI every
`IDLE_POLL_S`, so a lost ring costs latency, never correctness.

Where to ring: a peer in the same network namespace of the same boot (the same machine, or the
same lab "host") is rung on loopback; another machine on each of its IPv4 addresses, since a rank
cannot tell which of them its peers can reach (a ring to a wrong one is lost, which is harmless).
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import psutil

IDLE_POLL_S = 0.005  # the longest a waiting rank sleeps without polling MPI (bounds a lost ring's cost)
_RING = struct.Struct("<iq")  # sender rank, messages it has sent to the receiver so far


@dataclass(frozen=True)
class DoorbellAddress:
    """Where a rank's doorbell can be rung: its machine's identity, its UDP port and its IPv4 addresses."""

    place: str  # boot id and network namespace: equal for ranks that reach each other on loopback
    port: int
    addresses: tuple[str, ...]


def this_place() -> str:
    """Identifies this boot of this machine and this network namespace."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        netns = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return socket.gethostname()
    return f"{boot}/{netns}"


def external_addresses() -> tuple[str, ...]:
    """This host's IPv4 addresses other than loopback."""
    found = []
    for entries in psutil.net_if_addrs().values():
        found.extend(e.address for e in entries if e.family == socket.AF_INET and not e.address.startswith("127."))
    return tuple(found)


def ring_targets(me: DoorbellAddress, peer: DoorbellAddress) -> tuple[tuple[str, int], ...]:
    """The (address, port) pairs to ring `peer` on, seen from `me`."""
    if peer.place == me.place:
        return (("127.0.0.1", peer.port),)
    return tuple((address, peer.port) for address in peer.addresses)


class Doorbell:
    """This rank's doorbell socket, its peers' doorbell addresses, and which rings are still unanswered.

    A ring carries the sender's rank and how many messages it has sent to this rank so far, so
    duplicates (a peer rung on several addresses) and losses are harmless, and the receiver knows
    whether a message it was told about has not shown up in MPI yet (`expecting`).
    """

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("0.0.0.0", 0))
        self._socket.setblocking(False)
        self.address = DoorbellAddress(this_place(), self._socket.getsockname()[1], external_addresses())
        self._targets: list[tuple[tuple[str, int], ...]] = []
        self._sent: dict[int, int] = {}  # per destination: messages rung for
        self._announced: dict[int, int] = {}  # per source: the most messages it said it sent
        self._received: dict[int, int] = {}  # per source: messages taken from MPI
        self._lock = threading.Lock()  # a rank's shaper thread rings while its main thread sends

    def know_peers(self, peers: list[DoorbellAddress]) -> None:
        """The doorbell addresses of every rank, indexed by rank."""
        self._targets = [ring_targets(self.address, peer) for peer in peers]

    def ring(self, rank: int) -> None:
        """Tell `rank` that one more message is on its way to it."""
        with self._lock:
            count = self._sent[rank] = self._sent.get(rank, 0) + 1
        payload = _RING.pack(self.rank, count)
        for target in self._targets[rank] if rank < len(self._targets) else ():
            try:
                self._socket.sendto(payload, target)
            except OSError:  # full buffer, unreachable network: the receiver's periodic poll covers it
                pass

    def received(self, source: int) -> None:
        """One message from `source` was taken from MPI."""
        with self._lock:
            self._received[source] = self._received.get(source, 0) + 1

    def expecting(self) -> bool:
        """A peer announced a message that has not been received yet."""
        return any(count > self._received.get(source, 0) for source, count in self._announced.items())

    def take_rings(self) -> bool:
        """Read every ring that came (without waiting); True if one announced a new message."""
        news = False
        while True:
            try:
                data = self._socket.recv(64)
            except (BlockingIOError, InterruptedError):
                return news
            except OSError:
                return news
            if len(data) != _RING.size:
                continue
            source, count = _RING.unpack(data)
            if count > self._announced.get(source, 0):
                self._announced[source] = count
                news = True

    def sleep(self, timeout_s: float) -> None:
        """Sleep until a ring comes or `timeout_s` passes (the ring is left for `take_rings`)."""
        select.select([self._socket], [], [], max(0.0, timeout_s))

    def close(self) -> None:
        self._socket.close()
