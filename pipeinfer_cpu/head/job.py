"""Rank 0 of an MPI job: start the engine, answer the front end's requests, stop every rank on failure.

`python -m pipeinfer_cpu.head` is started by the user-facing process (app/), which talks to it in
JSON lines over the job's stdin/stdout (head/server.py): its first line is
`{"type": "start", "settings": EngineSettings.to_json(), "debug": bool}` (or, for `hosts calibrate`,
`{"type": "calibrate", "settings": CalibrationSettings.to_json(), ...}`). Anything else that
writes to stdout (a library's stray print) is sent to stderr, so stdout holds only events.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from typing import Callable

from pipeinfer_cpu.errors import PipeinferError
from pipeinfer_cpu.head.calibration import CalibrationSettings, calibrate
from pipeinfer_cpu.head.engine import Engine, EngineSettings
from pipeinfer_cpu.head.server import EngineServer, LineReader, json_line_writer, next_whole_request, serve_json_lines
from pipeinfer_cpu.wire import control as C
from pipeinfer_cpu.wire.runs import Tag
from pipeinfer_cpu.wire.transport import MpiTransport, wait

STOP_GRACE_S = 3.0  # after an error, how long the head lets the workers leave before aborting the job
# MPI_Abort makes mpiexec kill every process at once, and MPICH's mpiexec may then drop what the head
# wrote to stderr just before but it has not yet passed on (seen: exit 1 with an empty stderr, when
# every worker said bye within milliseconds). So the error line gets this long to travel first.
FORWARD_S = 0.5


def main() -> int:
    events = json_line_writer(os.fdopen(os.dup(1), "w", encoding="utf-8"))
    os.dup2(2, 1)
    reader = LineReader(sys.stdin.fileno())
    start = next_whole_request(reader, events) or {}
    transport = MpiTransport()
    return as_head(lambda: _serve(start, transport, reader, events), transport, bool(start.get("debug")))


def _serve(start: dict, transport: MpiTransport, reader: LineReader, emit) -> None:
    if start.get("type") == "calibrate":
        emit(calibrate(CalibrationSettings.from_json(start["settings"]), transport))
        return
    if start.get("type") != "start":
        raise PipeinferError("the head of the job expected a start request first")
    with Engine.start(EngineSettings.from_json(start["settings"]), transport) as engine:
        serve_json_lines(EngineServer(engine), reader, emit)


def as_head(body: Callable[[], object], transport: MpiTransport | None, debug: bool) -> int:
    """Run the head's work; on failure print one line, stop every rank, and return non-zero.

    Returns the body's own exit code when it gives one (an int), else 0.
    """
    try:
        result = body()
    except (PipeinferError, KeyboardInterrupt) as exc:
        if debug or os.environ.get("PIPEINFER_DEBUG"):
            traceback.print_exc()
        message = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc)
        print(f"error: {message}", file=sys.stderr, flush=True)
        return stop_all(transport, 130 if isinstance(exc, KeyboardInterrupt) else 1)
    except Exception:  # a bug: show it, and still leave no rank behind
        traceback.print_exc()
        return stop_all(transport, 1)
    if transport is not None:
        transport.finalize()
    return result if isinstance(result, int) else 0


def stop_all(transport: MpiTransport | None, code: int) -> int:
    """Tell every worker to stop, let them say bye (briefly), then abort the job with `code`."""
    if transport is None:
        return code
    for rank in range(1, transport.size):
        transport.send(rank, int(Tag.CONTROL), C.encode(C.Signal.SHUTDOWN))
    started = time.perf_counter()
    transport.flush(2.0)
    _await_goodbyes(transport, STOP_GRACE_S)  # meanwhile mpiexec passes the head's error line on
    time.sleep(max(0.0, started + FORWARD_S - time.perf_counter()))
    transport.abort(code)  # kills any rank that is stuck; mpiexec then exits with `code`
    return code


def _await_goodbyes(transport: MpiTransport, grace_s: float) -> None:
    """Wait, at most `grace_s` in all, until every worker has said bye (skipping its other replies)."""
    deadline = time.perf_counter() + grace_s
    for rank in range(1, transport.size):
        while (left := deadline - time.perf_counter()) > 0:
            message = wait(transport, [(rank, Tag.REPLY)], left)
            if message is None or _is_bye(message.data):
                break


def _is_bye(data) -> bool:
    try:
        return C.decode(data) == C.Signal.BYE
    except C.WireVersionError:
        return False
