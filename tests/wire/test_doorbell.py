"""Doorbells: where a peer is rung, and the counting that tells a rung rank whether its message is still on the way."""

from __future__ import annotations

import struct
import time

from pipeinfer_cpu.wire.doorbell import Doorbell, DoorbellAddress, ring_targets


def test_a_peer_in_the_same_place_is_rung_on_loopback_another_on_each_of_its_addresses():
    me = DoorbellAddress("boot/1", 5000, ("10.0.0.1",))
    assert ring_targets(me, DoorbellAddress("boot/1", 6000, ("10.0.0.1",))) == (("127.0.0.1", 6000),)
    other = DoorbellAddress("boot/2", 6000, ("10.77.0.12", "192.168.1.5"))
    assert ring_targets(me, other) == (("10.77.0.12", 6000), ("192.168.1.5", 6000))


def _pair() -> tuple[Doorbell, Doorbell]:
    a, b = Doorbell(0), Doorbell(1)
    peers = [a.address, b.address]
    a.know_peers(peers)
    b.know_peers(peers)
    return a, b


def test_a_ring_wakes_a_sleeping_rank_and_announces_one_message():
    a, b = _pair()
    try:
        a.ring(1)
        started = time.perf_counter()
        b.sleep(2.0)
        assert time.perf_counter() - started < 1.0
        assert b.take_rings()
        assert b.expecting()  # announced, not yet taken from MPI
        b.received(0)
        assert not b.expecting()
        assert not b.take_rings()  # nothing new
    finally:
        a.close()
        b.close()


def test_duplicate_and_stale_rings_announce_nothing_new():
    a, b = _pair()
    try:
        a.ring(1)
        a.ring(1)
        b.sleep(1.0)
        time.sleep(0.05)
        assert b.take_rings()
        b.received(0)
        assert b.expecting()  # the second message is still to come
        b.received(0)
        assert not b.expecting()
        # The same count arriving again (a peer rung on two addresses) is not news.
        a._socket.sendto(struct.pack("<iq", 0, 2), ("127.0.0.1", b.address.port))
        b.sleep(1.0)
        assert not b.take_rings()
        assert not b.expecting()
    finally:
        a.close()
        b.close()


def test_an_idle_doorbell_sleeps_the_whole_timeout_without_spinning():
    a, _ = _pair()
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        a.sleep(0.2)
        assert time.perf_counter() - wall >= 0.19
        assert time.process_time() - cpu < 0.05
    finally:
        a.close()
