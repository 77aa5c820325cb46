"""A pipeline stage's loop: apply each run's KV operations, skip it if cancelled, compute it otherwise
(aborting mid-graph if it is cancelled meanwhile), and pass the result on.

The loop is simple on purpose: every decision about what to run is the head's.
"""

from __future__ import annotations

import socket
import threading
import time

import numpy as np

from pipeinfer_cpu.llama.kvcache import apply_kv_ops
from pipeinfer_cpu.llama.runtime import Stage
from pipeinfer_cpu.stats import StageStats, peak_rss_bytes
from pipeinfer_cpu.wire import control as C
from pipeinfer_cpu.wire import runs as R
from pipeinfer_cpu.wire.runs import HEAD, Output, RunMessage, Tag
from pipeinfer_cpu.wire.transport import Transport, wait


class StageCounters:
    """Per-request statistics of one stage (reset by the head at the start of each request)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self, bytes_sent: int = 0) -> None:
        self.bytes_at_reset = bytes_sent
        self.bytes_at_decode: int | None = None  # bytes_sent when the head said decoding started
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



class StageLoop:
    """Serve runs until the head says stop."""

    CANCEL_POLL_S = 0.001  # the watcher's longest sleep between looks for a cancel (a ring ends it sooner)

    def __init__(self, transport: Transport, stage: Stage, assignment: C.Assignment) -> None:
        self.transport = transport
        self.stage = stage
        self.assignment = assignment
        self.counters = StageCounters()
        self.cancelled: set[int] = set()
        self._lock = threading.Lock()
        self._current_run = -1
        self._computing = threading.Event()
        self._stopping = False
        if assignment.cancellation:
            threading.Thread(target=self._watch_cancels, daemon=True).start()

    def serve(self) -> None:
        channels = [(HEAD, Tag.CANCEL), (HEAD, Tag.CONTROL), (self.assignment.upstream, Tag.RUN)]
        while not self._stopping:
            message = self._wait_for_work(channels)
            if message.tag == Tag.CANCEL:
                self._note_cancelled(R.decode_ids(message.data))
            elif message.tag == Tag.CONTROL:
                self._on_control(C.decode(message.data))
            else:
                self._on_run(_decode_run_from(message))
        self._stopping = True
        self._computing.set()  # release the watcher thread

    def _wait_for_work(self, channels):
        """Wait for the next message, accounting the CPU the wait itself costs (it should be ~0)."""
        wall, cpu = time.perf_counter(), time.process_time()
        message = wait(self.transport, channels, timeout_s=None)
        self.counters.idle_wall_s += time.perf_counter() - wall
        self.counters.idle_cpu_s += time.process_time() - cpu
        return message

    # -- control ------------------------------------------------------------------------------

    def _on_control(self, command: C.ControlMessage) -> None:
        if command == C.Signal.SHUTDOWN:
            self._stopping = True
            self._reply(C.Signal.BYE)
        elif command == C.Signal.RESET_STATS:
            self.counters.reset(self.transport.bytes_sent)
        elif command == C.Signal.DECODE_STARTED:
            self.counters.bytes_at_decode = self.transport.bytes_sent
        elif command == C.Signal.STATS:
            at_decode = self.counters.bytes_at_decode
            self._reply(C.StageReport(self._stats(), self.transport.bytes_sent - self.counters.bytes_at_reset,
                                      None if at_decode is None else self.transport.bytes_sent - at_decode))
        elif isinstance(command, C.KvUsageRequest):
            self._reply(C.KvUsage({s: (self.stage.seq_pos_min(s), self.stage.seq_pos_max(s)) for s in command.seqs}))
        else:
            raise ValueError(f"unexpected control message {C.kind_of(command)!r} while serving runs")

    def _reply(self, message: C.ControlMessage) -> None:
        self.transport.send(HEAD, int(Tag.REPLY), C.encode(message))

    def _stats(self) -> StageStats:
        c, a = self.counters, self.assignment
        return StageStats(rank=self.transport.rank, host=socket.gethostname(), layers=(a.layers.start, a.layers.end),
                          compute_s=c.compute_s, wall_s=time.perf_counter() - c.started,
                          peak_rss_bytes=peak_rss_bytes(), runs_computed=c.runs_computed,
                          runs_cancelled_before=c.cancelled_before, runs_cancelled_during=c.cancelled_during,
                          compute_saved_s=c.saved_s, prefill_tokens=c.prefill_tokens, idle_cpu_s=c.idle_cpu_s,
                          idle_wall_s=c.idle_wall_s)

    # -- runs ---------------------------------------------------------------------------------

    def _on_run(self, run: RunMessage) -> None:
        apply_kv_ops(self.stage, run.kv_ops)
        if run.is_ops_only:
            self._forward_ops(run)
            return
        with self._lock:
            stale = run.run_id in self.cancelled
            self._forget_cancels_up_to(run.run_id)
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
        tokens = run.tokens if a.layers.is_first else None
        hidden = None if a.layers.is_first else run.payload
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
        if not a.layers.is_last:
            # hidden states in the job's wire dtype; the next stage decodes them to float32 (wire/hidden.py)
            self.transport.send(a.downstream, int(Tag.RUN), R.encode_run(run.with_payload(result), a.llama.wire_dtype))
            return
        if not any(run.outputs):
            return  # a prefill chunk whose logits nobody asked for
        if run.output_kind == Output.ARGMAX:
            result = np.argmax(result, axis=1).astype(np.int32)
        reply = RunMessage(run.run_id, output_kind=run.output_kind, payload=result)
        self.transport.send(HEAD, int(Tag.RUN), R.encode_run(reply))

    def _forward_ops(self, run: RunMessage) -> None:
        a = self.assignment
        if run.kv_ops and not a.layers.is_last:
            self.transport.send(a.downstream, int(Tag.RUN), R.encode_run(run.ops_only()))

    # -- cancellation -------------------------------------------------------------------------

    def _note_cancelled(self, run_ids: list[int]) -> None:
        with self._lock:
            self.cancelled.update(run_ids)
            if self._current_run in self.cancelled:
                self.stage.set_cancelled(True)

    def _forget_cancels_up_to(self, run_id: int) -> None:
        """Runs arrive in launch order (increasing ids): a cancel for this run or an older one is spent."""
        if self.cancelled:
            self.cancelled = {r for r in self.cancelled if r > run_id}

    def _watch_cancels(self) -> None:
        """While a run computes, watch for its cancellation (the main thread is inside llama.cpp)."""
        while not self._stopping:
            self._computing.wait()
            while self._computing.is_set() and not self._stopping:
                with self._lock:
                    message = self.transport.poll([(HEAD, Tag.CANCEL)])
                if message is not None:
                    self._note_cancelled(R.decode_ids(message.data))
                else:  # a cancel rings this rank's doorbell: no need to wake up every few hundred microseconds
                    self.transport.idle(self.CANCEL_POLL_S)


def _decode_run_from(message) -> R.RunMessage:
    """A run from upstream; a corrupt one is an error naming the rank that sent it."""
    try:
        return R.decode_run(message.data)
    except R.WireVersionError as exc:
        raise R.WireVersionError(f"{exc} (sent by rank {message.source})") from None
