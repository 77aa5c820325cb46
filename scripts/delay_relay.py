#!/usr/bin/env python3
"""A TCP relay that adds a fixed one-way delay in each direction, keeping order (no netem in this kernel).

    delay_relay.py --listen 127.0.0.1:50100 --connect 10.77.0.12:50052 --delay-ms 2 [--stats FILE]

Each accepted connection gets its own upstream connection. In each direction one task reads chunks and
stamps each with (arrival + delay); a second task writes them in FIFO order once their time has come
(asyncio.sleep until then: no spinning). Bandwidth is left to the kernel (tc tbf on the link); with the
relay on the sending host, the delay sits in front of the shaped link for that direction and behind it
for the other: a link of the given one-way delay both ways. TCP_NODELAY on both sides (llama.cpp's RPC
sets it too). On SIGTERM/SIGINT it writes per-direction counters (bytes, reads, and "bursts": runs of reads
separated by more than 0.5 ms idle, about one message each) and its own CPU time to --stats (JSON);
--trace logs every read (time, direction, bytes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import socket
import time

CHUNK = 256 * 1024
QUEUE_CHUNKS = 256  # bounded: a fast sender waits for the link rather than filling memory
BURST_GAP_S = 0.5e-3


class Counters:
    def __init__(self, name: str = "", trace=None) -> None:
        self.name = name
        self.trace = trace
        self.bytes = 0
        self.reads = 0
        self.bursts = 0
        self.last_read = -1.0

    def note(self, n: int, now: float) -> None:
        self.bytes += n
        self.reads += 1
        if now - self.last_read > BURST_GAP_S:
            self.bursts += 1
        self.last_read = now
        if self.trace is not None:
            self.trace.write(f"{now:.6f} {self.name} {n}\n")


def host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float,
               counters: Counters) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE_CHUNKS)

    async def read_side() -> None:
        while True:
            data = await reader.read(CHUNK)
            now = time.monotonic()
            if data:
                counters.note(len(data), now)
            await queue.put((now + delay_s, data))
            if not data:
                return

    async def write_side() -> None:
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    try:
        await asyncio.gather(read_side(), write_side())
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


def nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT to accept on")
    parser.add_argument("--connect", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay added in each direction")
    parser.add_argument("--stats", help="write counters and CPU time here (JSON) on exit")
    parser.add_argument("--trace", help="write one line per read here: monotonic time, direction, bytes")
    args = parser.parse_args()
    delay_s = args.delay_ms / 1e3
    up_host, up_port = host_port(args.connect)
    trace = open(args.trace, "w", buffering=1 << 20) if args.trace else None
    up, down = Counters("up", trace), Counters("down", trace)  # up: client -> server, down: server -> client
    connections = 0
    started = time.monotonic()

    async def handle(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            s_reader, s_writer = await asyncio.open_connection(up_host, up_port)
        except OSError:
            c_writer.close()
            return
        nodelay(c_writer)
        nodelay(s_writer)
        await asyncio.gather(pump(c_reader, s_writer, delay_s, up), pump(s_reader, c_writer, delay_s, down))

    host, port = host_port(args.listen)
    server = await asyncio.start_server(handle, host, port, reuse_address=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"delay_relay: {args.listen} -> {args.connect}, {args.delay_ms:g} ms each way", flush=True)
    async with server:
        await stop.wait()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.monotonic() - started
    cpu = usage.ru_utime + usage.ru_stime
    if trace is not None:
        trace.close()
    report = {"delay_ms": args.delay_ms, "connections": connections, "wall_s": round(wall, 3),
              "cpu_s": round(cpu, 3), "cpu_share_of_one_core": round(cpu / wall, 4) if wall else None,
              "client_to_server": {k: getattr(up, k) for k in ("bytes", "reads", "bursts")},
              "server_to_client": {k: getattr(down, k) for k in ("bytes", "reads", "bursts")}}
    if args.stats:
        with open(args.stats, "w") as f:
            json.dump(report, f, indent=1)
    print("delay_relay:", json.dumps(report), flush=True)
    os._exit(0)  # open connections need no goodbye


if __name__ == "__main__":
    asyncio.run(main())
