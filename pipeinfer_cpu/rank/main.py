"""A non-head rank from start to end: set up llama.cpp as the head says, get its shard, serve.

A rank reads nothing of the user's: no command line, no hostfile, no prompt. Everything comes
from the head over MPI (wire/control.py), so a rank on another machine needs only pipeinfer-cpu
and, at most, its own cache of shards.
"""

from __future__ import annotations

import os
import socket
import traceback
from pathlib import Path

import psutil

from pipeinfer_cpu.files import atomic_output
from pipeinfer_cpu.llama.cpubackend import NoUsableVariant
from pipeinfer_cpu.llama.drafter import Drafter
from pipeinfer_cpu.llama.runtime import Stage, StageConfig, cpu_backend
from pipeinfer_cpu.modelfiles.shards import ShardFile, default_cache_dir, shard_intact, verify_shard
from pipeinfer_cpu.rank.calibration import measure
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


class _HeadStopped(Exception):
    """The head said SHUTDOWN before this rank had work (bad input elsewhere): leave quietly."""


class _HeadSilent(Exception):
    """The head sent nothing in time."""


def serve(transport: Transport) -> int:
    """Greet the head, run what it assigns, and leave when it says so."""
    try:
        setup = _expect(transport, C.Setup)
        if setup.links is not None:
            transport.use_links(setup.links)  # before this rank sends anything
        hello = _hello(setup)
        _send(transport, hello)
        if hello.backend is None:
            return leave_when_the_head_stops(transport)
        work = _expect(transport, (C.Assign, C.Calibrate))
        if isinstance(work, C.Calibrate):
            _calibrate(transport, work)
        else:
            _run(transport, work.assignment)
        return 0
    except _HeadStopped:
        _send(transport, C.Signal.BYE)
        return 0
    except _HeadSilent:
        return 1
    except Exception as exc:  # report any failure to the head, which tells the user and stops the job
        detail = traceback.format_exc() if os.environ.get("PIPEINFER_DEBUG") else ""
        _send(transport, C.Failure(f"{exc}", detail))
        return leave_when_the_head_stops(transport)


def _hello(setup: C.Setup) -> C.Hello:
    """Who this rank is, and the CPU backend it loaded (or, in backend_error, why it has none)."""
    me = dict(host=socket.gethostname(), pid=os.getpid(), cpus=os.cpu_count() or 1, wire=WIRE_VERSION,
              mem_available=psutil.virtual_memory().available)
    if setup.wire != WIRE_VERSION:
        return C.Hello(**me, backend=None, backend_error=f"the head speaks wire format version {setup.wire}, this "
                       f"rank {WIRE_VERSION}: install the same pipeinfer-cpu version on every node")
    try:
        return C.Hello(**me, backend=cpu_backend(setup.cpu_variant))
    except NoUsableVariant as exc:  # the head names this host and stops the job
        return C.Hello(**me, backend=None, backend_error=str(exc))


def _run(transport: Transport, assignment: C.Assignment) -> None:
    path = obtain_shard(transport, assignment.shard)
    layers = assignment.layers
    stage = Stage(StageConfig(path, layers.is_first, layers.is_last, assignment.n_ctx, assignment.n_batch,
                              assignment.n_threads, assignment.n_seq_max, assignment.llama))
    _send(transport, C.Ready(peak_rss_bytes()))
    if assignment.role == C.Role.DRAFT:
        serve_drafts(transport, Drafter(stage, assignment.n_batch))
    else:
        StageLoop(transport, stage, assignment).serve()
    stage.close()


def _calibrate(transport: Transport, request: C.Calibrate) -> None:
    """Time this host (rank/calibration.py), report, and wait for the head's SHUTDOWN (serve says bye)."""
    paths = [obtain_shard(transport, shard) for shard in request.shards]
    _send(transport, measure(paths, request))
    _expect(transport, ())  # only SHUTDOWN may come now


def leave_when_the_head_stops(transport: Transport) -> int:
    """After reporting a failure: wait (bounded) for the head's word, then leave quietly.

    A rank that exits non-zero at once makes mpiexec kill the whole job, the head too, perhaps
    before the head's one-line explanation reaches the user; the head sets the job's exit code.
    """
    if wait(transport, [(HEAD, Tag.CONTROL)], HEAD_STOP_WAIT_S) is None:
        return 1
    _send(transport, C.Signal.BYE)
    return 0


def obtain_shard(transport: Transport, shard: ShardFile) -> Path:
    """The shard's local path: this host's cache of received shards, the head's path if this host
    can read it (same machine, shared disk), else a copy the head sends now."""
    cached = default_cache_dir() / "received" / f"{shard.sha256[:16]}-{Path(shard.path).name}"
    for path in (cached, Path(shard.path)):
        if shard_intact(path, shard, default_cache_dir()):
            _send(transport, C.Signal.HAVE_FILE)
            return path
    _send(transport, C.Signal.NEED_FILE)
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


def _expect(transport: Transport, kind: type | tuple[type, ...]):
    """The head's next control message, which must be a `kind` (or SHUTDOWN: _HeadStopped)."""
    message = wait(transport, [(HEAD, Tag.CONTROL)], ASSIGN_TIMEOUT_S)
    if message is None:
        raise _HeadSilent()
    command = C.decode(message.data)
    if command == C.Signal.SHUTDOWN:
        raise _HeadStopped()
    if not isinstance(command, kind):
        expected = " or ".join(C.kind_of(k) for k in (kind if isinstance(kind, tuple) else (kind,))) or "shutdown"
        raise WireVersionError(f"expected {expected} from the head, got {C.kind_of(command)}")
    return command
