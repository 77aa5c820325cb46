"""A worker rank: receives its shard, loads it, and runs the stage loop until told to stop.

The loop is simple on purpose: apply the KV operations a run carries, skip the run if the head
cancelled it, compute it otherwise (aborting mid-graph if it is cancelled meanwhile), and pass the
result on. Every decision about what to run is the head's.
"""

from __future__ import annotations

import os
import resource
import socket
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

from pipeinfer_cpu.wire import runs as P
from pipeinfer_cpu.llama.cpubackend import NoUsableVariant
from pipeinfer_cpu.llama.runtime import Stage, StageConfig, cpu_backend
from pipeinfer_cpu.rank.drafter import Drafter, serve_drafts
from pipeinfer_cpu.llama.kvcache import apply_kv_ops
from pipeinfer_cpu.wire.runs import HEAD, Output, RunMessage, Tag
from pipeinfer_cpu.files import atomic_output
from pipeinfer_cpu.modelfiles.shards import ShardFile, check_readable, default_cache_dir, verify_shard
from pipeinfer_cpu.wire.transport import Transport, Waiter, wait

ASSIGN_TIMEOUT_S = 3600.0  # the head may be writing shards of a large model meanwhile
FILE_CHUNK_TIMEOUT_S = 120.0
HEAD_STOP_WAIT_S = 30.0  # after reporting an error, how long a worker waits for the head to stop the job


@dataclass(frozen=True)
class Assignment:
    """What the head asks a worker to run."""

    index: int
    start: int
    end: int
    n_layer: int
    shard: ShardFile
    n_ctx: int
    n_batch: int
    n_threads: int
    n_seq_max: int
    upstream: int
    downstream: int
    cancellation: bool
    role: str = "stage"  # "stage" (a layer range of the target) or "draft" (the whole draft model)

    @staticmethod
    def from_json(data: dict) -> "Assignment":
        data = dict(data)
        data["shard"] = ShardFile(**data["shard"])
        return Assignment(**data)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (the kernel's high-water mark, or psutil's reading)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return max(peak, psutil.Process().memory_info().rss)


class StageCounters:
    """Per-request statistics of one stage (reset by the head at the start of each request)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self, bytes_sent: int = 0) -> None:
        self.bytes_at_reset = bytes_sent
        self.started = time.perf_counter()
        self.compute_s = 0.0
        self.runs_computed = 0
        self.cancelled_before = 0
        self.cancelled_during = 0
        self.saved_s = 0.0
        self.tokens_computed = 0
        self.prefill_tokens = 0
        self.idle_cpu_s = 0.0
        self.idle_wall_s = 0.0

    def per_token_s(self) -> float:
        return self.compute_s / self.tokens_computed if self.tokens_computed else 0.0


def send_json(transport: Transport, dest: int, tag: Tag, obj: dict) -> None:
    transport.send(dest, int(tag), P.encode_json(obj))


def worker_main(transport: Transport, cpu_variant: str | None = None) -> int:
    """Run one worker rank to completion; returns the process exit code."""
    hello = {"type": "hello", "host": socket.gethostname(), "pid": os.getpid(), "cpus": os.cpu_count() or 1,
             "wire": P.WIRE_VERSION}
    try:
        hello["backend"] = cpu_backend(cpu_variant).to_json()
    except NoUsableVariant as exc:  # the head names this host and stops the job
        hello["backend_error"] = str(exc)
    send_json(transport, HEAD, Tag.REPLY, hello)
    if "backend_error" in hello:
        return leave_when_the_head_stops(transport)
    try:
        message = wait(transport, [(HEAD, Tag.CONTROL)], ASSIGN_TIMEOUT_S)
        if message is None:
            return 1
        command = P.decode_json(message.data)
        if command["type"] != "assign":  # the head gave up before assigning work (bad input)
            send_json(transport, HEAD, Tag.REPLY, {"type": "bye"})
            return 0
        assignment = Assignment.from_json(command["assignment"])
        path = obtain_shard(transport, assignment.shard)
        stage = Stage(StageConfig(path, assignment.start == 0, assignment.end == assignment.n_layer,
                                  assignment.n_ctx, assignment.n_batch, assignment.n_threads,
                                  assignment.n_seq_max))
        send_json(transport, HEAD, Tag.REPLY, {"type": "ready", "rss": peak_rss_bytes()})
        if assignment.role == "draft":
            serve_drafts(transport, Drafter(stage, assignment.n_batch))
        else:
            StageLoop(transport, stage, assignment).serve()
        stage.close()
        return 0
    except Exception as exc:  # report any failure to the head, which tells the user and stops the job
        detail = traceback.format_exc() if os.environ.get("PIPEINFER_DEBUG") else ""
        send_json(transport, HEAD, Tag.REPLY, {"type": "error", "message": f"{exc}", "detail": detail})
        return leave_when_the_head_stops(transport)


def leave_when_the_head_stops(transport: Transport) -> int:
    """After reporting a failure: wait (bounded) for the head's word, then leave quietly.

    A worker that exits non-zero at once makes mpiexec kill the whole job, the head too, perhaps
    before the head's one-line explanation reaches the user; the head sets the job's exit code.
    """
    if wait(transport, [(HEAD, Tag.CONTROL)], HEAD_STOP_WAIT_S) is None:
        return 1
    send_json(transport, HEAD, Tag.REPLY, {"type": "bye"})
    return 0


def obtain_shard(transport: Transport, shard: ShardFile) -> Path:
    """The shard's local path: the head's path if this host can read it, else a copy sent by the head."""
    if check_readable(shard):
        send_json(transport, HEAD, Tag.REPLY, {"type": "have-file"})
        return Path(shard.path)
    target = default_cache_dir() / "received" / f"{shard.sha256[:16]}-{Path(shard.path).name}"
    if target.is_file() and target.stat().st_size == shard.size_bytes:
        send_json(transport, HEAD, Tag.REPLY, {"type": "have-file"})
        return target
    send_json(transport, HEAD, Tag.REPLY, {"type": "need-file"})
    with atomic_output(target) as tmp, open(tmp, "wb") as out:
        received = 0
        while received < shard.size_bytes:
            message = wait(transport, [(HEAD, Tag.FILE)], FILE_CHUNK_TIMEOUT_S)
            if message is None:
                raise TimeoutError("the head stopped sending the shard file")
            out.write(message.data.tobytes())
            received += message.data.nbytes
        out.flush()
        verify_shard(tmp, shard.sha256)
    return target


class StageLoop:
    """Serve runs until the head says stop."""

    def __init__(self, transport: Transport, stage: Stage, assignment: Assignment) -> None:
        self.transport = transport
        self.stage = stage
        self.assignment = assignment
        self.counters = StageCounters()
        self.cancelled: set[int] = set()
        self._lock = threading.Lock()
        self._current_run = -1
        self._computing = threading.Event()
        self._stopping = False
        self._waiter = Waiter(transport)
        if assignment.cancellation:
            threading.Thread(target=self._watch_cancels, daemon=True).start()

    def serve(self) -> None:
        channels = [(HEAD, Tag.CANCEL), (HEAD, Tag.CONTROL), (self.assignment.upstream, Tag.RUN)]
        while not self._stopping:
            message = self._wait_for_work(channels)
            if message.tag == Tag.CANCEL:
                self._note_cancelled(P.decode_ids(message.data))
            elif message.tag == Tag.CONTROL:
                self._on_control(P.decode_json(message.data))
            else:
                self._on_run(P.decode_run(message.data))
        self._stopping = True
        self._computing.set()  # release the watcher thread

    def _wait_for_work(self, channels):
        """Wait for the next message, accounting the CPU the wait itself costs (it should be ~0)."""
        wall, cpu = time.perf_counter(), time.process_time()
        message = self._waiter.wait(channels, timeout_s=None)
        self.counters.idle_wall_s += time.perf_counter() - wall
        self.counters.idle_cpu_s += time.process_time() - cpu
        return message

    # -- control ------------------------------------------------------------------------------

    def _on_control(self, command: dict) -> None:
        kind = command["type"]
        if kind == "shutdown":
            self._stopping = True
            send_json(self.transport, HEAD, Tag.REPLY, {"type": "bye"})
        elif kind == "reset-stats":
            self.counters.reset(self.transport.bytes_sent)
        elif kind == "stats":
            send_json(self.transport, HEAD, Tag.REPLY, self._stats())
        elif kind == "kv-usage":
            send_json(self.transport, HEAD, Tag.REPLY, {"type": "kv-usage", "seqs": {
                str(s): [self.stage.seq_pos_min(s), self.stage.seq_pos_max(s)] for s in command["seqs"]}})
        else:
            raise ValueError(f"unknown command {kind!r}")

    def _stats(self) -> dict:
        c, a = self.counters, self.assignment
        return {"type": "stats", "rank": self.transport.rank, "host": socket.gethostname(),
                "layers": [a.start, a.end], "compute_s": c.compute_s,
                "wall_s": time.perf_counter() - c.started, "peak_rss_bytes": peak_rss_bytes(),
                "runs_computed": c.runs_computed, "runs_cancelled_before": c.cancelled_before,
                "runs_cancelled_during": c.cancelled_during, "compute_saved_s": c.saved_s,
                "prefill_tokens": c.prefill_tokens, "idle_cpu_s": c.idle_cpu_s, "idle_wall_s": c.idle_wall_s,
                "bytes_sent": self.transport.bytes_sent - c.bytes_at_reset}

    # -- runs ---------------------------------------------------------------------------------

    def _on_run(self, run: RunMessage) -> None:
        apply_kv_ops(self.stage, run.kv_ops)
        if run.is_ops_only:
            self._forward_ops(run)
            return
        with self._lock:
            stale = run.run_id in self.cancelled
        if stale:
            self.counters.cancelled_before += 1
            self.counters.saved_s += self.counters.per_token_s() * run.n_tokens
            self._forward_ops(run)
            return
        result = self._compute(run)
        if result is None:
            self._forward_ops(run)
            return
        self._send_result(run, result)

    def _compute(self, run: RunMessage) -> np.ndarray | None:
        a = self.assignment
        tokens = run.tokens if a.start == 0 else None
        hidden = None if a.start == 0 else run.payload
        self._current_run = run.run_id
        self.stage.set_cancelled(False)
        self._computing.set()
        started = time.perf_counter()
        try:
            result = self.stage.decode(run.positions, run.seq_ids, tokens=tokens, hidden=hidden,
                                       outputs=run.outputs)
        finally:
            self._computing.clear()
            self._current_run = -1
        spent = time.perf_counter() - started
        self.counters.compute_s += spent
        if result is None:
            self.counters.cancelled_during += 1
            self.counters.saved_s += max(0.0, self.counters.per_token_s() * run.n_tokens - spent)
            return None
        self.counters.runs_computed += 1
        self.counters.tokens_computed += run.n_tokens
        if run.n_tokens > 1:
            self.counters.prefill_tokens += run.n_tokens
        return result

    def _send_result(self, run: RunMessage, result: np.ndarray) -> None:
        a = self.assignment
        if a.end != a.n_layer:
            self.transport.send(a.downstream, int(Tag.RUN), P.encode_run(run.with_payload(result)))
            return
        if not any(run.outputs):
            return  # a prefill chunk whose logits nobody asked for
        if run.output_kind == Output.ARGMAX:
            result = np.argmax(result, axis=1).astype(np.int32)
        reply = RunMessage(run.run_id, output_kind=run.output_kind, payload=result)
        self.transport.send(HEAD, int(Tag.RUN), P.encode_run(reply))

    def _forward_ops(self, run: RunMessage) -> None:
        a = self.assignment
        if run.kv_ops and a.end != a.n_layer:
            self.transport.send(a.downstream, int(Tag.RUN), P.encode_run(run.ops_only()))

    # -- cancellation -------------------------------------------------------------------------

    def _note_cancelled(self, run_ids: list[int]) -> None:
        with self._lock:
            self.cancelled.update(run_ids)
            if self._current_run in self.cancelled:
                self.stage.set_cancelled(True)

    def _watch_cancels(self) -> None:
        """While a run computes, watch for its cancellation (the main thread is inside llama.cpp)."""
        while not self._stopping:
            self._computing.wait()
            while self._computing.is_set() and not self._stopping:
                with self._lock:
                    message = self.transport.poll([(HEAD, Tag.CANCEL)])
                if message is not None:
                    self._note_cancelled(P.decode_ids(message.data))
                else:
                    time.sleep(0.0002)
