"""The head's view of the worker ranks: start-up, shard hand-out, statistics, shutdown.

Every wait here is bounded; a rank that reports an error or stops answering becomes a
`ClusterError` naming the rank and its host.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeinfer_cpu.errors import ClusterError
from pipeinfer_cpu.llama.cpubackend import BackendReport
from pipeinfer_cpu.llama.kvcache import COMMITTED_SEQ
from pipeinfer_cpu.llama.settings import LlamaSettings
from pipeinfer_cpu.modelfiles.models import ModelInfo
from pipeinfer_cpu.modelfiles.planning import LayerRange
from pipeinfer_cpu.modelfiles.shards import ShardFile, ShardPlan, default_cache_dir, shard_model, source_hash
from pipeinfer_cpu.stats import StageStats
from pipeinfer_cpu.wire import control as C
from pipeinfer_cpu.wire.control import Assignment, Role
from pipeinfer_cpu.wire.links import LinkMap
from pipeinfer_cpu.wire.runs import HEAD, WIRE_VERSION, Tag, WireVersionError
from pipeinfer_cpu.wire.transport import Transport, wait

FILE_CHUNK_BYTES = 4 << 20
HELLO_TIMEOUT_S = 60.0
LOAD_TIMEOUT_S = 600.0
SHUTDOWN_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class StageSettings:
    """How every stage's llama.cpp context is set up."""

    n_ctx: int
    n_batch: int
    n_threads: int
    n_seq_max: int
    cancellation: bool
    llama: LlamaSettings = LlamaSettings()
    stage_threads: tuple[int, ...] | None = None  # per stage, the hostfile's threads (0: n_threads)


class Cluster:
    """The worker ranks 1..N as seen from the head (rank 0)."""

    def __init__(self, transport: Transport, timeout_s: float) -> None:
        self.transport = transport
        self.timeout_s = timeout_s
        self.hosts: dict[int, str] = {HEAD: "head"}
        self._bytes_sent: dict[int, int] = {}
        self._decode_bytes_sent: dict[int, int | None] = {}
        self.cpus: dict[int, int] = {}
        self.memory: dict[str, int] = {}  # host -> bytes of memory available, as its ranks said at hello
        self.files_sent = 0  # shard files sent to ranks that lacked them
        self.roles: dict[int, str] = {}  # what each worker runs, in words, once assigned
        self.backends: dict[int, BackendReport] = {}  # the llama.cpp CPU backend each worker loaded

    @property
    def workers(self) -> range:
        return range(1, self.transport.size)

    def host(self, rank: int) -> str:
        return self.hosts.get(rank, "?")

    def describe(self, rank: int) -> str:
        """A rank in words, e.g. "rank 2 (stage 2, layers 15-30, on node-b)"."""
        role = self.roles.get(rank)
        return f"rank {rank} ({role + ', ' if role else ''}on {self.host(rank)})"

    def greet(self, cpu_variant: str | None, links: LinkMap | None = None) -> None:
        """Tell every worker how to set up llama.cpp and its links; collect its hello: host, cores, wire
        format, CPU backend. The head shapes its own sends first, so Setup itself travels shaped."""
        if links:
            self.transport.use_links(links)
        self.broadcast(C.Setup(cpu_variant, links=links or None))
        for rank in self.workers:
            hello = self.expect(rank, C.Hello, timeout_s=HELLO_TIMEOUT_S)
            self.hosts[rank] = hello.host
            self.cpus[rank] = hello.cpus
            self.memory[hello.host] = hello.mem_available
            if hello.wire != WIRE_VERSION:
                raise ClusterError(f"rank {rank} ({self.host(rank)}): its hello is in wire format version "
                                   f"{hello.wire}, but this rank speaks version {WIRE_VERSION}: install the "
                                   "same pipeinfer-cpu version on every node")
            if hello.backend is None:
                raise ClusterError(f"rank {rank} ({self.host(rank)}): {hello.backend_error}")
            self.backends[rank] = hello.backend

    def threads_for(self, rank: int, requested: int) -> int:
        """The requested thread count, or (0 = auto) the host's cores shared by the computing ranks on it.

        Two llama.cpp processes whose threads together exceed the cores slow each other down many
        times over (their thread pools spin between graph nodes), so auto never oversubscribes.
        """
        if requested:
            return requested
        sharing = sum(1 for r in self.workers if self.hosts[r] == self.hosts[rank])
        return max(1, self.cpus[rank] // sharing)

    def _stage_threads(self, rank: int, index: int, settings: StageSettings) -> int:
        """Stage `index`'s threads: the hostfile's for its host, else --threads, else auto."""
        asked = settings.stage_threads[index] if settings.stage_threads else 0
        return asked or self.threads_for(rank, settings.n_threads)

    def expect(self, rank: int, *kinds, timeout_s: float | None = None):
        """Wait for a reply of one of `kinds` (message classes or Signal members) from `rank`; raise
        ClusterError on a failure, a timeout or anything else."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        message = wait(self.transport, [(rank, Tag.REPLY)], timeout_s)
        if message is None:
            raise ClusterError(f"rank {rank} ({self.host(rank)}) did not answer within {timeout_s:.0f} s")
        try:
            reply = C.decode(message.data)
        except WireVersionError as exc:
            raise ClusterError(f"rank {rank} ({self.host(rank)}): {exc}") from None
        if isinstance(reply, C.Failure):
            detail = f"\n{reply.detail}" if reply.detail else ""
            raise ClusterError(f"rank {rank} ({self.host(rank)}): {reply.message}{detail}")
        if not (reply in kinds if isinstance(reply, C.Signal) else type(reply) in kinds):
            raise ClusterError(f"rank {rank} ({self.host(rank)}): expected {' or '.join(map(C.kind_of, kinds))}, "
                               f"got {C.kind_of(reply)}")
        return reply

    def load_stages(self, plan: ShardPlan, stage_ranks: list[int], settings: StageSettings) -> None:
        """Assign shard i to stage_ranks[i], send files to hosts that cannot read them, wait for loads."""
        assignments = {}
        for index, (rank, shard) in enumerate(zip(stage_ranks, plan.shards, strict=True)):
            upstream = HEAD if index == 0 else stage_ranks[index - 1]
            downstream = HEAD if index == len(stage_ranks) - 1 else stage_ranks[index + 1]
            assignments[rank] = Assignment(index, LayerRange(shard.start, shard.end, plan.n_layer), shard,
                                           settings.n_ctx, settings.n_batch, self._stage_threads(rank, index, settings),
                                           settings.n_seq_max, upstream, downstream, settings.cancellation,
                                           llama=settings.llama)
        need: dict[str, list[ShardFile]] = {}
        for rank, shard in zip(stage_ranks, plan.shards):
            need.setdefault(self.host(rank), []).append(shard)
        shortfall = memory_shortfall(need, self.memory)
        if shortfall:
            raise ClusterError(shortfall)
        self._load(assignments)

    def load_draft(self, rank: int, info: ModelInfo, settings: StageSettings) -> None:
        """Start the whole draft model on its own rank."""
        assignment = Assignment(-1, LayerRange(0, info.n_layer, info.n_layer), draft_file(info), settings.n_ctx,
                                settings.n_batch, self.threads_for(rank, settings.n_threads), 1, HEAD, HEAD, False,
                                Role.DRAFT, settings.llama)
        self._load({rank: assignment})

    def _load(self, assignments: dict[int, Assignment]) -> None:
        """Assign all at once (the ranks load in parallel), send each file a rank lacks, wait until all are loaded."""
        for rank, assignment in assignments.items():
            self.send_control(rank, C.Assign(assignment))
            layers = assignment.layers
            self.roles[rank] = ("the draft" if assignment.role == Role.DRAFT
                                else f"stage {assignment.index + 1}, layers {layers.start}-{layers.end}")
        for rank, assignment in assignments.items():
            if self.expect(rank, C.Signal.HAVE_FILE, C.Signal.NEED_FILE) == C.Signal.NEED_FILE:
                self._send_file(rank, Path(assignment.shard.path))
        for rank in assignments:
            self.expect(rank, C.Ready, timeout_s=LOAD_TIMEOUT_S)

    def calibrate(self, requests: dict[int, C.Calibrate], timeout_s: float) -> dict[int, C.CalibrationReport]:
        """Send each rank its calibration (they all run at once) and each shard it lacks; wait up to
        `timeout_s` for each report."""
        for rank, request in requests.items():
            self.send_control(rank, request)
        for rank, request in requests.items():
            for shard in request.shards:
                if self.expect(rank, C.Signal.HAVE_FILE, C.Signal.NEED_FILE) == C.Signal.NEED_FILE:
                    self._send_file(rank, Path(shard.path))
        return {rank: self.expect(rank, C.CalibrationReport, timeout_s=timeout_s) for rank in requests}

    def _send_file(self, rank: int, path: Path) -> None:
        self.files_sent += 1
        size = path.stat().st_size
        label = f"shard -> rank {rank} ({self.host(rank)})"
        with open(path, "rb") as source, tqdm(total=size, unit="B", unit_scale=True, desc=label, leave=False) as bar:
            while chunk := source.read(FILE_CHUNK_BYTES):
                self.transport.send(rank, int(Tag.FILE), _bytes_array(chunk))
                self.transport.flush(self.timeout_s)
                bar.update(len(chunk))

    def send_control(self, rank: int, command: C.ControlMessage) -> None:
        self.transport.send(rank, int(Tag.CONTROL), C.encode(command))

    def broadcast(self, command: C.ControlMessage, ranks=None) -> None:
        for rank in self.workers if ranks is None else ranks:
            self.send_control(rank, command)

    def reset_stats(self) -> None:
        self.broadcast(C.Signal.RESET_STATS)

    def stage_stats(self, ranks: list[int]) -> tuple[StageStats, ...]:
        self.broadcast(C.Signal.STATS, ranks)
        stats = []
        for rank in ranks:
            report = self.expect(rank, C.StageReport)
            stats.append(report.stats)
            self._bytes_sent[rank] = report.bytes_sent
            self._decode_bytes_sent[rank] = report.decode_bytes_sent
        return tuple(stats)

    def worker_bytes_sent(self) -> int:
        """Bytes all workers had sent when their statistics were last collected."""
        return sum(self._bytes_sent.values())

    def mark_decode(self, ranks: list[int]) -> None:
        """Tell the stages that the prompt is in: they count what they send from now on as decode traffic.

        Sent when the first token is decided, so each stage has sent its prefill traffic already (the
        head has its result), and before the first decode run (which the stage sees after this, on
        the same link, as control comes before runs in its poll)."""
        self.broadcast(C.Signal.DECODE_STARTED, ranks)

    def worker_decode_bytes_sent(self) -> int | None:
        """Bytes all workers sent since `mark_decode`, as last collected; None if any did not count them."""
        values = list(self._decode_bytes_sent.values())
        return None if not values or None in values else sum(values)  # type: ignore[arg-type]

    def silent_ranks(self, ranks: list[int], wait_s: float) -> list[int]:
        """The ranks that do not answer a probe within `wait_s` (all probed at once): after a pipeline
        timeout, the stage that is stuck, where an idle stage answers at once. For diagnosis only: the
        job is ending, and a late answer is never read."""
        for rank in ranks:
            self.send_control(rank, C.KvUsageRequest((COMMITTED_SEQ,)))
        deadline = time.perf_counter() + wait_s
        waiting = set(ranks)
        while waiting and (left := deadline - time.perf_counter()) > 0:
            message = wait(self.transport, [(rank, Tag.REPLY) for rank in waiting], left)
            if message is not None:
                waiting.discard(message.source)
        return sorted(waiting)

    def kv_usage(self, rank: int, seqs: list[int]) -> dict[int, tuple[int, int]]:
        self.send_control(rank, C.KvUsageRequest(tuple(seqs)))
        return self.expect(rank, C.KvUsage).seqs

    def shutdown(self) -> None:
        """Stop every worker and wait (bounded) until each says goodbye: a stuck rank is an error,
        so the job is aborted rather than left waiting for it."""
        self.broadcast(C.Signal.SHUTDOWN)
        for rank in self.workers:
            self._await_bye(rank)
        self.transport.flush(5.0)

    def _await_bye(self, rank: int) -> None:
        """Skip the rank's other late replies until its bye; bounded overall, not per message."""
        deadline = time.perf_counter() + SHUTDOWN_TIMEOUT_S
        while True:
            message = wait(self.transport, [(rank, Tag.REPLY)], max(0.0, deadline - time.perf_counter()))
            if message is None:
                raise ClusterError(f"rank {rank} ({self.host(rank)}) did not stop within {SHUTDOWN_TIMEOUT_S:.0f} s")
            if C.decode(message.data) == C.Signal.BYE:
                return


def draft_file(info: ModelInfo) -> ShardFile:
    """The file a draft rank loads: the model's own (its hash remembered, not recomputed each start), or
    for a split GGUF one file written from all parts (once, cached like shards), since a rank that cannot
    read the head's disk is sent one file."""
    whole = LayerRange(0, info.n_layer, info.n_layer)
    if info.other_parts:
        return shard_model(info, (whole,)).shards[0]
    path = info.path
    return ShardFile(-1, whole.start, whole.end, str(path.resolve()), path.stat().st_size,
                     source_hash(info.files, default_cache_dir()))


def _bytes_array(chunk: bytes) -> np.ndarray:
    return np.frombuffer(chunk, dtype=np.uint8)


def memory_shortfall(need: dict[str, list[ShardFile]], available: dict[str, int]) -> str | None:
    """Why a host cannot hold the weights of its stages (host -> their shards), if one cannot; None
    when each can (or says nothing of its memory). Only the weights are counted: a stage whose
    weights do not fit in memory pages them in from disk for every token."""
    for host, shards in need.items():
        weights = sum(shard.size_bytes for shard in shards)
        if available.get(host) and weights > available[host]:
            layers = ", ".join(f"{s.start}-{s.end}" for s in shards)
            return (f"host {host} has {available[host] / 1e9:.1f} GB of memory available, but its stage weights "
                    f"(layers {layers}) take {weights / 1e9:.1f} GB: add hosts, or give it a smaller weight")
    return None
