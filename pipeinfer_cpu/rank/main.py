"""A non-head rank from start to end: set up llama.cpp as the head says, get its shard, serve.

A rank reads nothing of the user's: no command line, no hostfile, no prompt. Everything comes
from the head over MPI (wire/control.py), so a rank on another machine needs only pipeinfer-cpu
and, at most, its own cache of shards.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import traceback
from pathlib import Path

from pipeinfer_cpu.files import atomic_output
from pipeinfer_cpu.llama.cpubackend import NoUsableVariant
from pipeinfer_cpu.llama.drafter import Drafter
from pipeinfer_cpu.llama.runtime import Stage, StageConfig, cpu_backend
from pipeinfer_cpu.modelfiles.shards import ShardFile, check_readable, default_cache_dir, verify_shard
from pipeinfer_cpu.rank.draft_loop import serve_drafts
from pipeinfer_cpu.rank.stage_loop import StageLoop
from pipeinfer_cpu.stats import peak_rss_bytes
from pipeinfer_cpu.wire import control as C
from pipeinfer_cpu.wire.runs import HEAD, WIRE_VERSION, Tag, WireVersionError
from pipeinfer_cpu.wire.transport import MpiTransport, Transport, wait

ASSIGN_TIMEOUT_S = 3600.0  # the head may be writing shards of a large model meanwhile
FILE_CHUNK_TIMEOUT_S = 120.0
HEAD_STOP_WAIT_S = 30.0  # after reporting an error, how long a rank waits for the head to stop the job


def main() -> int:
    """`python -m pipeinfer_cpu.rank`: one rank of the job, to completion; returns its exit code."""
    transport = MpiTransport()
    code = serve(transport)
    transport.finalize()
    return code


def serve(transport: Transport) -> int:
    """Greet the head, run what it assigns, and leave when it says so."""
    try:
        setup = _receive(transport, C.Setup, C.Shutdown)
        if setup is None:
            return 1
        if isinstance(setup, C.Shutdown):  # the head gave up before starting anything (bad input)
            _send(transport, C.Bye())
            return 0
        hello = _hello(setup)
        _send(transport, hello)
        if hello.backend is None:
            return leave_when_the_head_stops(transport)
        assign = _receive(transport, C.Assign, C.Shutdown)
        if assign is None:
            return 1
        if isinstance(assign, C.Shutdown):  # the head gave up before assigning work (bad input)
            _send(transport, C.Bye())
            return 0
        _run(transport, assign.assignment)
        return 0
    except Exception as exc:  # report any failure to the head, which tells the user and stops the job
        detail = traceback.format_exc() if os.environ.get("PIPEINFER_DEBUG") else ""
        _send(transport, C.Failure(f"{exc}", detail))
        return leave_when_the_head_stops(transport)


def _hello(setup: C.Setup) -> C.Hello:
    """Who this rank is, and the CPU backend it loaded (or, in backend_error, why it has none)."""
    me = dict(host=socket.gethostname(), pid=os.getpid(), cpus=os.cpu_count() or 1, wire=WIRE_VERSION)
    if setup.wire != WIRE_VERSION:
        return C.Hello(**me, backend=None, backend_error=f"the head speaks wire format version {setup.wire}, this "
                       f"rank {WIRE_VERSION}: install the same pipeinfer-cpu version on every node")
    try:
        return C.Hello(**me, backend=cpu_backend(setup.cpu_variant))
    except NoUsableVariant as exc:  # the head names this host and stops the job
        return C.Hello(**me, backend=None, backend_error=str(exc))


def _run(transport: Transport, assignment: C.Assignment) -> None:
    path = obtain_shard(transport, assignment.shard)
    stage = Stage(StageConfig(path, assignment.is_first, assignment.is_last, assignment.n_ctx, assignment.n_batch,
                              assignment.n_threads, assignment.n_seq_max))
    _send(transport, C.Ready(peak_rss_bytes()))
    if assignment.role == C.Role.DRAFT:
        serve_drafts(transport, Drafter(stage, assignment.n_batch))
    else:
        StageLoop(transport, stage, assignment).serve()
    stage.close()


def leave_when_the_head_stops(transport: Transport) -> int:
    """After reporting a failure: wait (bounded) for the head's word, then leave quietly.

    A rank that exits non-zero at once makes mpiexec kill the whole job, the head too, perhaps
    before the head's one-line explanation reaches the user; the head sets the job's exit code.
    """
    if wait(transport, [(HEAD, Tag.CONTROL)], HEAD_STOP_WAIT_S) is None:
        return 1
    _send(transport, C.Bye())
    return 0


def obtain_shard(transport: Transport, shard: ShardFile) -> Path:
    """The shard's local path: this host's cache of received shards, the head's path if this host
    can read it (same machine, shared disk), else a copy the head sends now."""
    cached = default_cache_dir() / "received" / f"{shard.sha256[:16]}-{Path(shard.path).name}"
    for path in (cached, Path(shard.path)):
        if check_readable(dataclasses.replace(shard, path=str(path))):
            _send(transport, C.HaveFile())
            return path
    _send(transport, C.NeedFile())
    with atomic_output(cached) as tmp, open(tmp, "wb") as out:
        received = 0
        while received < shard.size_bytes:
            message = wait(transport, [(HEAD, Tag.FILE)], FILE_CHUNK_TIMEOUT_S)
            if message is None:
                raise TimeoutError("the head stopped sending the shard file")
            out.write(message.data.tobytes())
            received += message.data.nbytes
        out.flush()
        verify_shard(tmp, shard.sha256)
    return cached


def _send(transport: Transport, message: C.ControlMessage) -> None:
    transport.send(HEAD, int(Tag.REPLY), C.encode(message))


def _receive(transport: Transport, *kinds: type) -> C.ControlMessage | None:
    """The head's next control message, which must be one of `kinds`; None if none comes in time."""
    message = wait(transport, [(HEAD, Tag.CONTROL)], ASSIGN_TIMEOUT_S)
    if message is None:
        return None
    command = C.decode(message.data)
    if not isinstance(command, kinds):
        raise WireVersionError(f"expected {' or '.join(k.kind for k in kinds)} from the head, got {command.kind}")
    return command
