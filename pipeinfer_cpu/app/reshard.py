"""Keep going when a node dies (`--on-failure reshard`).

MPI cannot shrink a running job portably (MPICH and Open MPI as installed here have no ULFM), so
the honest design is a new job: this process, outside the MPI job and holding the tokens already
shown, notices that the job failed and which rank it was, drops that rank's hostfile line, starts a
job on the lines that are left (the split re-planned over them, shards from the cache or written and
sent again), and asks it to continue the answer from the last token the user saw. The new head
rebuilds the KV cache in the shapes the failed job used (head/engine.py `replay`), so a greedy or
seeded `pipeline` answer goes on exactly as it would have without the failure.

Which rank died comes from mpiexec: Open MPI names it; MPICH names only its host, and where that host
ran several stages, the last of them is taken (on one host they are interchangeable).
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeinfer_cpu.app.client import JobClient, JobEnded, who_died
from pipeinfer_cpu.app.hostfile import parse_hostfile, without_host_line
from pipeinfer_cpu.app.options import EngineOptions
from pipeinfer_cpu.errors import UserError
from pipeinfer_cpu.modelfiles.planning import parse_weights


@dataclass(frozen=True)
class Failure:
    """What mpiexec said of the job's end: the rank that died (Open MPI) or its host (MPICH)."""

    rank: int | None
    host: str | None


def failed_stage(placement: tuple[str, ...], n_stages: int, failure: Failure) -> int | None:
    """The stage (0-based) whose rank died; None when it was not a stage (the head or the draft
    rank, whose hosts stay) or when mpiexec did not say. Rank 0 is the head, 1..n_stages the stages."""
    if failure.rank is not None:
        return failure.rank - 1 if 1 <= failure.rank <= n_stages else None
    there = [stage for stage in range(n_stages) if placement[stage + 1] == failure.host]
    return there[-1] if there else None


def without_stage(options: EngineOptions, stage: int, tmp: Path) -> EngineOptions:
    """The options of a job on the stages that are left: the stage's hostfile line dropped (written
    to a new hostfile in `tmp`), or one stage fewer where --stages put several on one line."""
    n_stages = len(options.topology.stage_hosts)
    if n_stages < 2:
        raise UserError("no stage is left to continue on")
    weights = None
    if options.weights is not None:
        kept = [w for i, w in enumerate(parse_weights(options.weights, n_stages)) if i != stage]
        weights = ",".join(f"{w:g}" for w in kept)
    stages = None if options.stages is None else options.stages - 1
    if options.hostfile is None or (options.stages is not None and options.stages > len(parse_hostfile(options.hostfile))):
        return dataclasses.replace(options, stages=stages, weights=weights)
    text = without_host_line(options.hostfile.read_text(), stage, str(options.hostfile))
    hostfile = tmp / f"hosts-{n_stages - 1}-stages.txt"
    hostfile.write_text(text)
    return dataclasses.replace(options, hostfile=hostfile, stages=stages, weights=weights)


@dataclass(frozen=True)
class Recovery:
    """One failure survived: what died, after how many tokens of the answer, and what it cost."""

    failed: str  # the rank in words, and how it died
    after_tokens: int  # tokens of the answer the user had seen
    stages: int  # stages of the new job
    restart_s: float  # from the failure to the new job being ready (start, shards, loads)
    shards: str  # how the new job's stages got their shards: from the cache or written, sent or not
    recover_s: float | None = None  # from the failure to the answer's next token (the rebuild too)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class ReshardingClient:
    """A JobClient that survives a stage's death by going on with the stages that are left."""

    def __init__(self, options: EngineOptions) -> None:
        self.options = options
        self.job = JobClient.launch(options, hold_errors=True)
        self.start_wait_s = 0.0
        self._failed_at = 0.0  # when the last failure was noticed
        self.recoveries: list[Recovery] = []
        self._replayed: list[int] = []  # of the answer being asked for: the tokens failed jobs had shown
        self._tmp = tempfile.TemporaryDirectory(prefix="pipeinfer-reshard-")

    reported = False  # the job's error lines are held back (we may go on); a failure we cannot survive is raised
    @property
    def decided_ids(self) -> list[int]:
        return self._replayed + self.job.decided_ids

    def start(self, wait_s: float) -> dict:
        self.start_wait_s = wait_s
        return self._start_job()

    def _start_job(self) -> dict:
        """Wait until the job is ready; a job that does not start is a JobEnded with its own error lines."""
        try:
            return self.job.start(self.start_wait_s)
        except JobEnded as exc:
            raise JobEnded("; ".join(self.job.held_errors or [str(exc)])) from None

    def ask(self, request: dict, on_token: Callable[[str], None], wait_s: float,
            interrupt: threading.Event | None = None) -> dict:
        """As JobClient.ask; when the job fails, again on a new job, with the tokens shown so far replayed."""
        self._replayed = []
        first_recovery = len(self.recoveries)
        while True:
            asked = {**request, "replay": self._replayed} if self._replayed else request
            try:
                final = self.job.ask(asked, self._timing(on_token), wait_s, interrupt)
            except JobEnded as exc:
                self._replayed, self.job.decided_ids = self.decided_ids, []  # the failed job's, taken over
                self._recover(exc, len(self._replayed))
                continue
            if final.get("event") == "done" and len(self.recoveries) > first_recovery:
                final["stats"]["recoveries"] = [r.to_json() for r in self.recoveries[first_recovery:]]
            return final

    def _timing(self, on_token: Callable[[str], None]) -> Callable[[str], None]:
        """on_token, which also notes when the first token after a recovery came."""
        def show(text: str) -> None:
            last = self.recoveries[-1] if self.recoveries else None
            if last is not None and last.recover_s is None:
                self.recoveries[-1] = dataclasses.replace(last, recover_s=time.monotonic() - self._failed_at)
            on_token(text)
        return show

    def check(self) -> None:
        try:
            self.job.check()
        except JobEnded as exc:
            self._recover(exc, 0)

    def _recover(self, exc: JobEnded, after_tokens: int) -> None:
        """Start a job on the stages that are left, or raise `exc` when there is none to go on with."""
        self._failed_at = time.monotonic()
        job = self.job
        job.close()
        what = "; ".join(job.held_errors or [str(exc)])  # the head's own word on it, where it had one
        failure = Failure(job.dead_rank, job.dead_host)
        stage = failed_stage(self.options.topology.placement, len(self.options.topology.stage_hosts), failure)
        if stage is None:
            raise JobEnded(f"{what} (--on-failure reshard: no stage is known to have failed)") from None
        try:
            options = without_stage(self.options, stage, Path(self._tmp.name))
            options.preflight()
        except UserError as why:
            raise JobEnded(f"{what}; cannot reshard: {why}") from None
        n_stages = len(options.topology.stage_hosts)
        print(f"warning: {what}; going on with {n_stages} stage{'s' * (n_stages > 1)} (--on-failure reshard)",
              file=sys.stderr, flush=True)
        self.options = options
        self.job = JobClient.launch(options, hold_errors=True)
        ready = self._start_job()
        who = who_died(job.ranks, job.placement, job.dead_rank, job.dead_host)
        recovery = Recovery(f"{who}: {job.death or what}", after_tokens, n_stages,
                            time.monotonic() - self._failed_at, ready.get("shards") or "")
        print(f"(the {n_stages} stages were ready {recovery.restart_s:.1f} s after the failure: {recovery.shards})",
              file=sys.stderr, flush=True)
        self.recoveries.append(recovery)

    def close(self) -> int:
        code = self.job.close()
        self._tmp.cleanup()
        return code

