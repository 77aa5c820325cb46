"""`python -m pipeinfer_cpu.wire.probe`: a micro-benchmark of the real transport between two ranks.

Started by `pipeinfer-cpu netlab probe` (app/netlab.py) as `mpiexec -n 2 python -m pipeinfer_cpu.wire.probe
--links JSON --sizes 8,1048576`. Both ranks shape their sends by the same `LinkMap` (given on the command
line, as the head's Setup gives it to a pipeline's ranks). For each size:

- latency: ping-pong, rank 0 -> 1 -> 0; one-way = half of each round trip; the median is reported,
  first unshaped (the baseline: MPI, Python and polling), then over the link: `added_ms` is the
  difference, what the link adds;
- throughput: rank 0 sends a stream of messages back to back; rank 1 times the arrivals:
  (n - 1) * size * 8 / (last arrival - first arrival), which needs no clock shared by the ranks.

A waiting rank waits as a pipeline stage does (asleep until its doorbell is rung, wire/doorbell.py);
the baseline holds that wake-up's cost, so `added_ms` is what the link adds.
Rank 0 prints one JSON line on stdout: {"link": "...", "rows": [{size, one_way_ms, ...}]}.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import numpy as np

from pipeinfer_cpu.wire.links import LinkMap, LinkSpec
from pipeinfer_cpu.wire.transport import MpiTransport, wait

PING, PONG, STREAM, RESULT = 101, 102, 103, 104
TIMEOUT_S = 120.0
MIN_REPEATS, MAX_REPEATS = 5, 50
MIN_STREAM, MAX_STREAM = 8, 200
WARMUP = 2


def expected_one_way_s(spec: LinkSpec | None, size: int) -> float | None:
    return None if spec is None else spec.delay_s + spec.serialisation_s(size)


def repeats_for(spec: LinkSpec | None, size: int, budget_s: float) -> int:
    """Round trips that fit in about `budget_s` on this link (within [MIN_REPEATS, MAX_REPEATS])."""
    round_trip = 2 * (expected_one_way_s(spec, size) or 0.0)
    return MAX_REPEATS if round_trip <= 0 else max(MIN_REPEATS, min(MAX_REPEATS, math.ceil(budget_s / round_trip)))


def stream_length(spec: LinkSpec | None, size: int, budget_s: float) -> int:
    """Messages in the throughput stream: about `budget_s` at the link's rate."""
    each = spec.serialisation_s(size) if spec is not None else 0.0
    return MAX_STREAM if each <= 0 else max(MIN_STREAM, min(MAX_STREAM, math.ceil(budget_s / each)))


def _receive(transport: MpiTransport, source: int, tag: int) -> np.ndarray:
    message = wait(transport, [(source, tag)], TIMEOUT_S)
    if message is None:
        raise TimeoutError(f"rank {transport.rank}: nothing from rank {source} within {TIMEOUT_S:.0f} s")
    return message.data


def ping_pong(transport: MpiTransport, size: int, repeats: int) -> list[float]:
    """One-way times (half round trips) seen by rank 0; rank 1 echoes."""
    payload = np.zeros(size, dtype=np.uint8)
    one_way = []
    for index in range(WARMUP + repeats):
        if transport.rank == 0:
            started = time.perf_counter()
            transport.send(1, PING, payload)
            _receive(transport, 1, PONG)
            if index >= WARMUP:
                one_way.append((time.perf_counter() - started) / 2)
        else:
            transport.send(0, PONG, _receive(transport, 0, PING))
    return one_way


def stream(transport: MpiTransport, size: int, count: int) -> float | None:
    """Bit/s of a stream of `count` messages 0 -> 1, measured by rank 1 and sent back to rank 0."""
    if transport.rank == 0:
        payload = np.zeros(size, dtype=np.uint8)
        for _ in range(count):
            transport.send(1, STREAM, payload)
        return json.loads(_receive(transport, 1, RESULT).tobytes())["bps"]
    arrivals = []
    for _ in range(count):
        _receive(transport, 0, STREAM)
        arrivals.append(time.perf_counter())
    span = arrivals[-1] - arrivals[0]
    bps = (count - 1) * size * 8 / span if span > 0 else None
    transport.send(0, RESULT, np.frombuffer(json.dumps({"bps": bps}).encode(), dtype=np.uint8))
    return bps


def measure(transport: MpiTransport, links: LinkMap, sizes: list[int], budget_s: float) -> list[dict]:
    """The unshaped baseline latencies, then (shaping from here on) each size's latency and throughput."""
    spec = links.spec(0, 1)
    baseline = {size: ping_pong(transport, size, MIN_REPEATS * 2) for size in sizes}
    transport.use_links(links)
    rows = []
    for size in sizes:
        shaped = ping_pong(transport, size, repeats_for(spec, size, budget_s))
        count = stream_length(spec, size, budget_s)
        bps = stream(transport, size, count)
        if transport.rank != 0:
            continue
        one_way, base = statistics.median(shaped), statistics.median(baseline[size])
        expected = expected_one_way_s(spec, size)
        rows.append({"size": size, "one_way_ms": one_way * 1e3, "baseline_ms": base * 1e3,
                     "added_ms": (one_way - base) * 1e3,
                     "expected_ms": None if expected is None else expected * 1e3,
                     "mbit_s": None if bps is None else bps / 1e6,
                     "expected_mbit_s": None if spec is None or spec.rate_bps is None else spec.rate_bps / 1e6,
                     "stream": count})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeinfer_cpu.wire.probe")
    parser.add_argument("--links", default="{}", help="LinkMap as JSON")
    parser.add_argument("--sizes", default="8,1048576", help="message sizes in bytes, comma-separated")
    parser.add_argument("--budget-s", type=float, default=1.0, help="about this long per measurement")
    args = parser.parse_args(argv)
    links = LinkMap.from_json(json.loads(args.links))
    sizes = [int(s) for s in args.sizes.split(",")]
    transport = MpiTransport()
    if transport.size != 2:
        print(f"error: the probe needs exactly 2 ranks, got {transport.size}", file=sys.stderr, flush=True)
        return 1
    try:
        rows = measure(transport, links, sizes, args.budget_s)
    except Exception as exc:  # the top of this rank: report, and end both ranks rather than leave one waiting
        print(f"error: rank {transport.rank}: {exc}", file=sys.stderr, flush=True)
        transport.abort(1)
        return 1
    if transport.rank == 0:
        spec = links.spec(0, 1)
        print(json.dumps({"link": None if spec is None else str(spec), "rows": rows}), flush=True)
    transport.finalize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
