"""How the user-facing process reaches the model: an EngineServer in this process, or the head of
an MPI job it starts, over JSON lines (one thread reads its events, another forwards its stderr
minus mpiexec's noise). Either way the requests and events are those of head/server.py."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from contextlib import contextmanager
from typing import Callable, Iterator, Protocol

from pipeinfer_cpu.app import launcher
from pipeinfer_cpu.app.options import EngineOptions
from pipeinfer_cpu.head.server import EngineServer

QUIT_WAIT_S = 15.0
PART_CHARS = 16_000  # a long request line travels in parts of this many characters (see JobClient._send)
PART_WAIT_S = 60.0  # how long the head may take to read one (it is idle between requests)
# Where mpiexec says which process died: Open MPI names its rank, MPICH only its host (its PID is
# the first process of that host's proxy, not the one that died).
_DEAD_RANK = re.compile(r"process rank (\d+)")
_DEAD_HOST = re.compile(r"RUNNING AT (\S+)")
_COMPLAINT = re.compile(r"error|fail|lost|abort", re.IGNORECASE)
_SILENT_RANK = re.compile(r"rank (\d+) \([^)]*\) does not answer")  # the head's line after a pipeline timeout


class JobEnded(Exception):
    """The model's process is gone or stopped answering: the session cannot go on."""


class Client(Protocol):
    reported: bool  # did the model's side already explain a failure in an `error:` line?
    decided_ids: list[int]  # the token ids of the answer asked for last, as far as the user saw it

    def start(self, wait_s: float) -> dict: ...

    def ask(self, request: dict, on_token: Callable[[str], None], wait_s: float,
            interrupt: threading.Event | None = None) -> dict: ...

    def check(self) -> None: ...

    def close(self) -> int: ...


@contextmanager
def on_signals(handler: Callable[[], None], signals: tuple[int, ...] = (signal.SIGINT,)) -> Iterator[None]:
    """While active, each of `signals` calls `handler` instead of its usual action (main thread only)."""
    previous = {sig: signal.signal(sig, lambda signum, frame: handler()) for sig in signals}
    try:
        yield
    finally:
        for sig, action in previous.items():
            signal.signal(sig, action)


@contextmanager
def _interrupt_flag(given: threading.Event | None) -> Iterator[threading.Event]:
    """While active, Ctrl-C sets a flag instead of raising, so no event or state is half handled.
    A caller that has a flag of its own (the HTTP server: a client that left) passes it instead."""
    if given is not None:
        yield given
        return
    flag = threading.Event()
    with on_signals(flag.set):
        yield flag


class LocalClient:
    """The EngineServer in this process."""

    reported = False  # its failures are exceptions, reported by `as_head`

    def __init__(self, server: EngineServer) -> None:
        self.server = server
        self.decided_ids: list[int] = []  # not kept: a failure here ends this process

    def start(self, wait_s: float) -> dict:
        return self.server.ready_event()

    def ask(self, request: dict, on_token: Callable[[str], None], wait_s: float,
            interrupt: threading.Event | None = None) -> dict:
        final: dict = {}

        def emit(event: dict) -> None:
            if event["event"] == "token":
                on_token(event["text"])
            else:
                final.update(event)

        with _interrupt_flag(interrupt) as interrupted:
            self.server.handle(request, emit, interrupted.is_set)
        return final

    def check(self) -> None:
        """Nothing to check: a failure of the model here is an exception where it happens."""

    def close(self) -> int:
        self.server.engine.close()
        return 0


class JobClient:
    """The MPI job's head, over JSON lines; a thread reads its events, another forwards its stderr."""

    @staticmethod
    def launch(options: EngineOptions, hold_errors: bool = False) -> "JobClient":
        """Start the job (head beside the first stage, then the stages, then any draft rank) and send
        it the engine settings; `start` then waits until it is ready. `hold_errors`: keep the job's
        `error:` lines in `held_errors` instead of showing them (a caller that may go on after them)."""
        start = {"type": "start", "settings": options.settings.to_json(), "debug": options.debug}  # checks first
        tmp = tempfile.TemporaryDirectory(prefix="pipeinfer-job-")
        process = launcher.start(options.topology.placement, Path(tmp.name))
        client = JobClient(process, options.debug, tmp, options.topology.placement, hold_errors)
        client._send(start)
        return client

    def __init__(self, process: subprocess.Popen, debug: bool, tmp: tempfile.TemporaryDirectory,
                 placement: tuple[str, ...] = (), hold_errors: bool = False) -> None:
        self.process = process
        self.held_errors: list[str] | None = [] if hold_errors else None  # the job's `error:` lines, not shown
        self.debug = debug
        self.tmp = tmp
        self.events: queue.Queue[dict] = queue.Queue()
        self.death: str | None = None  # mpiexec's word on a rank that died
        self.dead_rank: int | None = None  # which rank died, where mpiexec says so
        self.dead_host: str | None = None  # else the host it ran on
        self.placement = placement  # the hostfile's host of each rank
        self.ranks: dict[str, str] = {}  # rank -> it in words, from the ready event
        self.decided_ids: list[int] = []  # the tokens of the answer being asked for, as its events came
        self.mpi_complaint: str | None = None  # the last error line of mpiexec's own
        self.reported = False  # did a rank already explain a failure in an `error:` line?
        self._threads = [threading.Thread(target=target, daemon=True)
                         for target in (self._read_events, self._forward_stderr)]
        for thread in self._threads:
            thread.start()

    def _read_events(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = None
            if isinstance(event, dict) and "event" in event:
                self.events.put(event)
            elif line.strip():  # mpiexec's banners, or a worker's stray output: not ours to parse
                self._show(line)
        self.events.put({"event": "eof"})

    def _forward_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._show(line)

    def _show(self, line: str) -> None:
        """Pass a line of the job's output on, minus mpiexec's noise (kept: why a rank died, and which)."""
        noise = launcher.is_mpi_noise(line)
        if line.startswith("error: "):
            silent = _SILENT_RANK.search(line)  # the head names a stage that stopped answering
            if silent and self.dead_rank is None:
                self.dead_rank = int(silent.group(1))
            if self.held_errors is not None:
                self.held_errors.append(line.removeprefix("error: ").strip())
                return
        if self.debug or not noise:
            self.reported |= line.startswith("error: ")
            sys.stderr.write(line)
            sys.stderr.flush()
        if noise:
            if _COMPLAINT.search(line):  # hydra's own trouble (a proxy lost, say): the last word, if nothing else
                self.mpi_complaint = line.strip()
            if self.death is None and ("EXIT STRING" in line or "exited on signal" in line):
                self.death = line.split(":", 1)[-1].strip()
            rank, host = _DEAD_RANK.search(line), _DEAD_HOST.search(line)
            if rank and self.dead_rank is None:
                self.dead_rank = int(rank.group(1))
            if host and self.dead_host is None:
                self.dead_host = host.group(1)

    def _send(self, request: dict) -> None:
        """Send a request line; a long one in parts, each taken by the head before the next is sent:
        MPICH's mpiexec ends the whole job ("process manager error waiting for completion") when more
        than a pipe's worth (64 KiB) of input waits for rank 0, as a long chat's turn (the whole
        conversation) or a long prompt would (found by scripts/soak.py after ~330 turns)."""
        line = json.dumps(request)  # ASCII: a part re-encoded as a JSON string at most doubles
        if len(line) <= PART_CHARS:
            self._write(line)
            return
        for start in range(0, len(line), PART_CHARS):
            end = start + PART_CHARS >= len(line)
            self._write(json.dumps({"type": "part", "text": line[start:start + PART_CHARS], "end": end}))
            self._await_part(time.monotonic() + PART_WAIT_S)

    def _write(self, line: str) -> None:
        try:
            assert self.process.stdin is not None
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            raise JobEnded(f"the MPI job ended ({self._exit_text()})") from None

    def _await_part(self, deadline: float) -> None:
        """Wait until the head has taken the part just sent (its `part` event)."""
        while (event := self._poll(deadline, "the head to take a long request")) is None or event["event"] != "part":
            if event is not None:
                raise JobEnded(f"the head answered a part of a long request with {event['event']!r}")

    def start(self, wait_s: float) -> dict:
        deadline = time.monotonic() + wait_s
        event = None
        while event is None:
            event = self._poll(deadline, "the cluster to start")
        if event["event"] != "ready":
            raise JobEnded(event.get("message", "the MPI job did not start"))
        self.ranks = event.get("ranks") or {}
        return event

    def ask(self, request: dict, on_token: Callable[[str], None], wait_s: float,
            interrupt: threading.Event | None = None) -> dict:
        """Send a request; stream its tokens; return its final event. Ctrl-C (or `interrupt`, when
        given) sends an interrupt."""
        self.decided_ids = []
        self._send(request)
        sent_interrupt = False
        deadline = time.monotonic() + wait_s
        with _interrupt_flag(interrupt) as interrupted:
            while True:
                if interrupted.is_set() and not sent_interrupt:
                    self._send({"type": "interrupt"})
                    sent_interrupt = True
                event = self._poll(deadline, "an answer")
                if event is None:
                    continue
                deadline = time.monotonic() + wait_s
                if event["event"] != "token":
                    return event
                self.decided_ids.extend(event.get("ids", ()))
                on_token(event["text"])

    def check(self) -> None:
        """Between requests: JobEnded if the job is gone (say, a rank died while it was idle)."""
        if self.process.poll() is not None:
            raise JobEnded(f"the MPI job ended ({self._exit_text()})")

    def _poll(self, deadline: float, what: str) -> dict | None:
        """The next event, or None after a short tick; JobEnded past the deadline or when the job is gone."""
        try:
            event = self.events.get(timeout=0.05)
        except queue.Empty:
            if time.monotonic() > deadline:
                raise JobEnded(f"no reply from the MPI job in time while waiting for {what}") from None
            return None
        if event["event"] == "eof":
            raise JobEnded(f"the MPI job ended ({self._exit_text()})")
        return event

    def _exit_text(self) -> str:
        try:
            code = self.process.wait(5)
        except subprocess.TimeoutExpired:
            return "it closed its output"
        self._drain_stderr()
        if self.death is None and self.dead_rank is None and self.dead_host is None:
            said = f": mpiexec said {self.mpi_complaint!r}" if self.mpi_complaint else ""
            return f"exit code {code}{said}"
        who = who_died(self.ranks, self.placement, self.dead_rank, self.dead_host)
        return f"{who} died: {self.death or f'exit code {code}'}"

    def _drain_stderr(self) -> None:
        self._threads[1].join(timeout=5)

    def close(self) -> int:
        """Ask the job to quit, wait (bounded), and kill its process group if it lingers."""
        try:
            self._send({"type": "quit"})
            assert self.process.stdin is not None
            self.process.stdin.close()
        except (JobEnded, OSError):
            pass
        try:
            code = self.process.wait(QUIT_WAIT_S)
        except subprocess.TimeoutExpired:
            _kill_group(self.process.pid)
            code = self.process.wait(5)
        self._drain_stderr()
        self.tmp.cleanup()
        return code


def who_died(ranks: dict[str, str], placement: tuple[str, ...], dead_rank: int | None, dead_host: str | None) -> str:
    """The rank that died in words (`ranks`: the ready event's), or the ranks it may have been: those
    placed on the host mpiexec named."""
    def name(rank: int) -> str:
        return ranks.get(str(rank), f"rank {rank}")

    if dead_rank is not None:
        return name(dead_rank)
    there = [rank for rank, host in enumerate(placement) if host == dead_host]
    if len(there) == 1:
        return name(there[0])
    if there:
        return f"a process on {dead_host} (one of {', '.join(name(rank) for rank in there)})"
    return "a rank"


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
