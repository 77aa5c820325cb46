"""Ping-pong between ranks 0 and 1: rank 0 sends SIZE bytes, rank 1 answers with one byte.

    mpiexec -n 2 python pingpong.py [SIZE] [REPEATS]

Rank 0 prints one JSON line: the hosts of both ranks and the median round-trip time in seconds.
"""

import json
import socket
import statistics
import sys
import time

import numpy as np
from mpi4py import MPI


def main() -> None:
    comm = MPI.COMM_WORLD
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    message, answer = np.ones(size, dtype=np.uint8), np.zeros(1, dtype=np.uint8)
    hosts = comm.gather(socket.gethostname())
    times = []
    for _ in range(repeats + 1):  # the first round sets up the connection: not timed
        comm.Barrier()
        started = time.perf_counter()
        if comm.rank == 0:
            comm.Send(message, dest=1)
            comm.Recv(answer, source=1)
        elif comm.rank == 1:
            comm.Recv(message, source=0)
            comm.Send(answer, dest=0)
        times.append(time.perf_counter() - started)
    if comm.rank == 0:
        print(json.dumps({"hosts": hosts, "bytes": size, "round_trip_s": statistics.median(times[1:])}), flush=True)


if __name__ == "__main__":
    main()
