"""The engine worker: the one owner of the model's client. HTTP handlers queue jobs; the worker
answers them one at a time, in order, on the thread that started the engine (under your own
mpiexec that thread is MPI's), and hands each job's events back through the job's `deliver`.

Every job gets exactly one final event: the engine's `done` or `error`, or `dropped` (its client
left while it waited: it never ran), or `unavailable` (the engine died, or the server is stopping).
A job's `cancel` is set by its HTTP handler when the client leaves; a running job then stops at
once through the engine's interrupt (early cancellation on every stage).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from pipeinfer_cpu.app.client import Client, JobEnded
from pipeinfer_cpu.app.serve.metrics import Metrics

IDLE_CHECK_S = 0.25  # how often an idle worker checks that the job is still alive


@dataclass(frozen=True)
class Job:
    """One request for the engine, and the way back to its HTTP handler (`deliver` is thread-safe)."""

    request: dict
    deliver: Callable[[dict], None]
    cancel: threading.Event = field(default_factory=threading.Event)


class EngineUnavailable(Exception):
    """The engine cannot take requests: it died (the message names the rank) or the server is stopping."""


class EngineWorker:
    def __init__(self, client: Client, answer_wait_s: float, metrics: Metrics) -> None:
        self.client = client
        self.answer_wait_s = answer_wait_s
        self.metrics = metrics
        self.dead: str | None = None  # why the engine can take no more requests
        self._jobs: queue.Queue[Job] = queue.Queue()
        self._running: Job | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # orders submit() against the worker closing

    def submit(self, job: Job) -> None:
        """Queue a job (from any thread); EngineUnavailable when no more can be answered."""
        with self._lock:
            if self.dead is not None:
                raise EngineUnavailable(self.dead)
            self._jobs.put(job)
            self.metrics.waiting.set(self._jobs.qsize())

    def queue_state(self) -> dict:
        return {"running": int(self._running is not None), "waiting": self._jobs.qsize()}

    def request_stop(self) -> None:
        """Stop soon: the running job at once, then the loop (safe in a signal handler: it only sets flags)."""
        self._stopping.set()
        running = self._running
        if running is not None:
            running.cancel.set()

    def run(self) -> None:
        """Answer jobs until request_stop(), or until the engine dies: then `dead` says why, every job
        is told, and the failure (JobEnded, or the engine's own error) is raised."""
        try:
            while not self._stopping.is_set():
                self._next()
        except Exception as exc:  # JobEnded, or the engine's own failure when it runs in this process
            self._close(str(exc) if isinstance(exc, JobEnded) else f"the engine failed: {exc}")
            raise
        self._close("the server is stopping")

    def _next(self) -> None:
        try:
            job = self._jobs.get(timeout=IDLE_CHECK_S)
        except queue.Empty:
            self.client.check()
            return
        self.metrics.waiting.set(self._jobs.qsize())
        if job.cancel.is_set():
            self.metrics.outcome("dropped")
            job.deliver({"event": "dropped"})
            return
        self._running = job
        self.metrics.running.set(1)
        final = self.client.ask(job.request, lambda text: job.deliver({"event": "token", "text": text}),
                                self.answer_wait_s, job.cancel)
        self._running = None
        self.metrics.running.set(0)
        if final["event"] == "done":  # a refusal is counted where it is answered, with the HTTP layer's own
            self.metrics.answered(final["stats"], cancelled=job.cancel.is_set())
        job.deliver(final)

    def _close(self, reason: str) -> None:
        """Take no more jobs; tell the running one (if the engine died under it) and the waiting ones why."""
        with self._lock:
            self.dead = reason
            waiting = [self._running] if self._running is not None else []
            while not self._jobs.empty():
                waiting.append(self._jobs.get_nowait())
        for job in waiting:
            job.deliver({"event": "unavailable", "message": reason})
        self._running = None
        self.metrics.running.set(0)
        self.metrics.waiting.set(0)
