"""The emulated links' timing model (wire/links.py) and the transport's sender-side Shaper, without MPI."""

import threading
import time

import numpy as np
import pytest

from pipeinfer_cpu.errors import UserError
from pipeinfer_cpu.wire import control as C
from pipeinfer_cpu.wire.links import HostLink, LinkMap, LinkSpec, LinkSpecError, LinkState, uniform
from pipeinfer_cpu.wire.transport import Shaper

MBIT = 1e6


@pytest.mark.parametrize("text, expected", [
    ("bw=100mbit,delay=2ms", LinkSpec(100 * MBIT, 0.002)),
    ("delay=0.5ms, bw=1gbit", LinkSpec(1e9, 0.0005)),
    ("bw=1.5Gbit,delay=20us,jitter=5us", LinkSpec(1.5e9, 20e-6, 5e-6)),
    ("bw=64kbit", LinkSpec(64e3)),
    ("bw=9600bit,delay=1s", LinkSpec(9600, 1.0)),
    ("delay=0", LinkSpec(None, 0.0)),
])
def test_parses_rates_and_times(text, expected):
    assert LinkSpec.parse(text) == expected


@pytest.mark.parametrize("text, fragment", [
    ("bw=0mbit,delay=2ms", "bw must be above 0"),
    ("bw=-5mbit", "bw must be above 0"),
    ("bw=100mbps", "'bps' spellings are ambiguous"),
    ("bw=100M", "is not a number with one of bit, kbit, mbit, gbit"),
    ("bw=100mbit,delay=2", "delay '2' is not a number with one of us, ms, s"),
    ("bw=100mbit,latency=2ms", "unknown key 'latency'"),
    ("bw=100mbit,bw=1gbit", "bw given twice"),
    ("100mbit", "'100mbit' is not key=value"),
    ("jitter=1ms", "give bw=, delay= or both"),
    ("delay=-1ms", "delay must be 0 or more"),
])
def test_bad_settings_say_what_is_wrong(text, fragment):
    with pytest.raises(LinkSpecError, match=fragment.replace("(", r"\(").replace(")", r"\)")) as caught:
        LinkSpec.parse(text)
    assert isinstance(caught.value, UserError) and "\n" not in str(caught.value)


def test_text_form_parses_back():
    for text in ("bw=100mbit,delay=2ms", "bw=1gbit,delay=100us,jitter=30us", "delay=5ms"):
        spec = LinkSpec.parse(text)
        assert LinkSpec.parse(str(spec)) == spec


def test_a_message_leaves_after_its_serialisation_and_arrives_after_the_delay():
    link = LinkState(LinkSpec(8 * MBIT, 0.002))  # 1 byte per microsecond
    link, timing = link.send(10.0, 1000)
    assert timing.leaves_s == pytest.approx(10.001)
    assert timing.arrives_s == pytest.approx(10.003)


def test_back_to_back_messages_queue_behind_each_other():
    link = LinkState(LinkSpec(8 * MBIT, 0.002))
    timings = []
    for _ in range(3):
        link, timing = link.send(0.0, 1000)  # all handed over at once
        timings.append(timing)
    assert [t.leaves_s for t in timings] == pytest.approx([0.001, 0.002, 0.003])
    assert [t.arrives_s for t in timings] == pytest.approx([0.003, 0.004, 0.005])
    link, later = link.send(1.0, 1000)  # an idle link starts at once
    assert later.leaves_s == pytest.approx(1.001)


def test_no_rate_means_delay_only():
    link, timing = LinkState(LinkSpec(None, 0.01)).send(5.0, 10**9)
    assert (timing.leaves_s, timing.arrives_s) == (5.0, pytest.approx(5.01))


def test_jitter_stays_in_its_band_is_seeded_and_never_reorders():
    spec = LinkSpec(None, 0.002, 0.0015)
    link = LinkState(spec, seed=7)
    arrivals, delays = [], []
    for index in range(500):
        now = index * 0.0001  # faster than the jitter: a draw may want to overtake
        link, timing = link.send(now, 100)
        arrivals.append(timing.arrives_s)
        delays.append(timing.arrives_s - now)
    assert arrivals == sorted(arrivals)
    assert min(delays) >= 0.0005 - 1e-12
    assert max(delays) > 0.003  # the band is used
    assert len({round(d, 9) for d in delays}) > 100
    again, repeat = LinkState(spec, seed=7), []
    for index in range(500):
        again, timing = again.send(index * 0.0001, 100)
        repeat.append(timing.arrives_s)
    assert repeat == arrivals  # seeded: the same draws every time
    assert uniform(7, 3) == uniform(7, 3) != uniform(8, 3)


def test_link_map_pairs_win_over_the_default_and_same_host_is_unshaped_unless_named():
    fast, slow, local = LinkSpec(1e9, 0.0005), LinkSpec(1e8, 0.002), LinkSpec(1e10, 20e-6)
    hosts = ("a", "a", "b", "c", "c")
    only_pairs = LinkMap(None, (HostLink("a", "b", fast), HostLink("c", "c", local)), hosts)
    assert only_pairs.spec(0, 1) is None  # both on a, not named
    assert only_pairs.spec(1, 2) == only_pairs.spec(2, 0) == fast  # a <-> b, both ways
    assert only_pairs.spec(3, 4) == local
    assert only_pairs.spec(2, 3) is None  # b <-> c: the real network
    with_default = LinkMap(slow, only_pairs.pairs, hosts)
    assert with_default.spec(0, 1) == with_default.spec(2, 3) == slow
    assert with_default.spec(1, 2) == fast
    assert with_default.spec(2, 2) is None
    assert set(with_default.outgoing(2, 5)) == {0, 1, 3, 4}
    assert LinkMap(slow).spec(0, 7) == slow  # hosts unknown: --link still covers every pair


def test_link_map_travels_in_setup():
    links = LinkMap(LinkSpec(1e8, 0.002), (HostLink("a", "b", LinkSpec(None, 0.001, 0.0002)),), ("a", "a", "b"), 3)
    back = C.decode(C.encode(C.Setup(None, links=links)))
    assert back.links == links
    assert C.decode(C.encode(C.Setup("haswell"))).links is None


def test_shaper_paces_sends_in_order_from_its_thread():
    sent, done = [], threading.Event()

    def isend(dest, tag, buffer):
        sent.append((time.perf_counter(), dest, tag, int(buffer[0]), threading.current_thread().name))
        if len(sent) == 4:
            done.set()

    rate = 8 * MBIT  # 1000 bytes: 1 ms
    links = LinkMap(LinkSpec(rate, 0.005)).outgoing(0, 3)
    shaper = Shaper(links, isend)
    started = time.perf_counter()
    for index, dest in enumerate((1, 1, 1, 2)):
        shaper.submit(dest, 12, np.full(1000, index, dtype=np.uint8))
    assert time.perf_counter() - started < 0.004  # submit never waits for the link
    assert done.wait(2.0) and shaper.idle()
    shaper.close()
    to_1 = [s for s in sent if s[1] == 1]
    assert [s[3] for s in to_1] == [0, 1, 2]  # FIFO per destination
    offsets = [s[0] - started for s in to_1]
    # Serialised back to back, then delayed: never early; late only by scheduling (generous on a loaded machine).
    for offset, due in zip(offsets, (0.006, 0.007, 0.008)):
        assert due - 0.0003 <= offset <= due + 0.01
    assert sent[0][4] == "link-shaper"
