"""The head's view of the worker ranks: start-up, shard hand-out, statistics, shutdown.

Every wait here is bounded; a rank that reports an error or stops answering becomes a
`ClusterError` naming the rank and its host.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeinfer_cpu.wire import runs as P
from pipeinfer_cpu.llama.cpubackend import BackendReport
from pipeinfer_cpu.errors import ClusterError
from pipeinfer_cpu.wire.runs import HEAD, Tag
from pipeinfer_cpu.modelfiles.shards import ShardPlan
from pipeinfer_cpu.stats import StageStats
from pipeinfer_cpu.wire.transport import Transport, wait
from pipeinfer_cpu.rank.worker import Assignment

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


class Cluster:
    """The worker ranks 1..N as seen from the head (rank 0)."""

    def __init__(self, transport: Transport, timeout_s: float) -> None:
        self.transport = transport
        self.timeout_s = timeout_s
        self.hosts: dict[int, str] = {HEAD: "head"}
        self._bytes_sent: dict[int, int] = {}
        self.cpus: dict[int, int] = {}
        self.backends: dict[int, BackendReport] = {}  # the llama.cpp CPU backend each worker loaded

    @property
    def workers(self) -> range:
        return range(1, self.transport.size)

    def host(self, rank: int) -> str:
        return self.hosts.get(rank, "?")

    def greet(self) -> None:
        """Collect every worker's hello: its host, cores, wire format and CPU backend."""
        for rank in self.workers:
            reply = self.expect(rank, "hello", HELLO_TIMEOUT_S)
            self.hosts[rank] = reply["host"]
            self.cpus[rank] = reply["cpus"]
            try:
                P.check_version(reply.get("wire", 1), "its hello")
            except P.WireVersionError as exc:
                raise ClusterError(f"rank {rank} ({self.host(rank)}): {exc}") from None
            if "backend_error" in reply:
                raise ClusterError(f"rank {rank} ({self.host(rank)}): {reply['backend_error']}")
            self.backends[rank] = BackendReport.from_json(reply["backend"])

    def threads_for(self, rank: int, requested: int) -> int:
        """The requested thread count, or (0 = auto) the host's cores shared by the computing ranks on it.

        Two llama.cpp processes whose threads together exceed the cores slow each other down many
        times over (their thread pools spin between graph nodes), so auto never oversubscribes.
        """
        if requested:
            return requested
        sharing = sum(1 for r in self.workers if self.hosts[r] == self.hosts[rank])
        return max(1, self.cpus[rank] // sharing)

    def expect(self, rank: int, kind: str | tuple[str, ...], timeout_s: float | None = None) -> dict:
        """Wait for a reply of `kind` (or one of several) from `rank`; raise ClusterError on an
        error, a timeout or junk."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        message = wait(self.transport, [(rank, Tag.REPLY)], timeout_s)
        if message is None:
            raise ClusterError(f"rank {rank} ({self.host(rank)}) did not answer within {timeout_s:.0f} s")
        reply = P.decode_json(message.data)
        if reply["type"] == "error":
            detail = f"\n{reply['detail']}" if reply.get("detail") else ""
            raise ClusterError(f"rank {rank} ({self.host(rank)}): {reply['message']}{detail}")
        if reply["type"] not in ((kind,) if isinstance(kind, str) else kind):
            raise ClusterError(f"rank {rank} ({self.host(rank)}): expected {kind!r}, got {reply['type']!r}")
        return reply

    def load_stages(self, plan: ShardPlan, stage_ranks: list[int], settings: StageSettings) -> None:
        """Assign shard i to stage_ranks[i], send files to hosts that cannot read them, wait for loads."""
        for index, rank in enumerate(stage_ranks):
            shard = plan.shards[index]
            upstream = HEAD if index == 0 else stage_ranks[index - 1]
            downstream = HEAD if index == len(stage_ranks) - 1 else stage_ranks[index + 1]
            assignment = Assignment(index, shard.start, shard.end, plan.n_layer, shard, settings.n_ctx,
                                    settings.n_batch, self.threads_for(rank, settings.n_threads),
                                    settings.n_seq_max, upstream,
                                    downstream, settings.cancellation)
            self.send_control(rank, {"type": "assign", "assignment": asdict(assignment)})
        for index, rank in enumerate(stage_ranks):
            reply = self.expect(rank, ("have-file", "need-file"))
            if reply["type"] == "need-file":
                self._send_file(rank, Path(plan.shards[index].path))
        for rank in stage_ranks:
            self.expect(rank, "ready", LOAD_TIMEOUT_S)

    def load_draft(self, rank: int, path: Path, settings: StageSettings) -> None:
        """Start the whole draft model on its own rank."""
        from pipeinfer_cpu.modelfiles.models import file_sha256, read_model_info
        from pipeinfer_cpu.modelfiles.shards import ShardFile

        info = read_model_info(path)
        shard = ShardFile(-1, 0, info.n_layer, str(path.resolve()), path.stat().st_size, file_sha256(path))
        assignment = Assignment(-1, 0, info.n_layer, info.n_layer, shard, settings.n_ctx, settings.n_batch,
                                self.threads_for(rank, settings.n_threads), 1, HEAD, HEAD, False, "draft")
        self.send_control(rank, {"type": "assign", "assignment": asdict(assignment)})
        if self.expect(rank, ("have-file", "need-file"))["type"] == "need-file":
            self._send_file(rank, path)
        self.expect(rank, "ready", LOAD_TIMEOUT_S)

    def _send_file(self, rank: int, path: Path) -> None:
        size = path.stat().st_size
        label = f"shard -> rank {rank} ({self.host(rank)})"
        with open(path, "rb") as source, tqdm(total=size, unit="B", unit_scale=True, desc=label, leave=False) as bar:
            while chunk := source.read(FILE_CHUNK_BYTES):
                self.transport.send(rank, int(Tag.FILE), _bytes_array(chunk))
                self.transport.flush(self.timeout_s)
                bar.update(len(chunk))

    def send_control(self, rank: int, command: dict) -> None:
        self.transport.send(rank, int(Tag.CONTROL), P.encode_json(command))

    def broadcast(self, command: dict, ranks=None) -> None:
        for rank in self.workers if ranks is None else ranks:
            self.send_control(rank, command)

    def reset_stats(self) -> None:
        self.broadcast({"type": "reset-stats"})

    def stage_stats(self, ranks: list[int]) -> tuple[StageStats, ...]:
        self.broadcast({"type": "stats"}, ranks)
        stats = []
        for rank in ranks:
            r = self.expect(rank, "stats")
            stats.append(StageStats(rank=rank, host=r["host"], layers=tuple(r["layers"]),
                                    compute_s=r["compute_s"], wall_s=r["wall_s"],
                                    peak_rss_bytes=r["peak_rss_bytes"], runs_computed=r["runs_computed"],
                                    runs_cancelled_before=r["runs_cancelled_before"],
                                    runs_cancelled_during=r["runs_cancelled_during"],
                                    compute_saved_s=r["compute_saved_s"], prefill_tokens=r["prefill_tokens"],
                                    idle_cpu_s=r["idle_cpu_s"], idle_wall_s=r["idle_wall_s"]))
            self._bytes_sent[rank] = r["bytes_sent"]
        return tuple(stats)

    def worker_bytes_sent(self) -> int:
        """Bytes all workers had sent when their statistics were last collected."""
        return sum(self._bytes_sent.values())

    def kv_usage(self, rank: int, seqs: list[int]) -> dict[int, tuple[int, int]]:
        self.send_control(rank, {"type": "kv-usage", "seqs": seqs})
        reply = self.expect(rank, "kv-usage")
        return {int(k): (v[0], v[1]) for k, v in reply["seqs"].items()}

    def shutdown(self) -> None:
        """Stop every worker and wait (bounded) until each says goodbye: a stuck rank is an error,
        so the job is aborted rather than left waiting for it."""
        self.broadcast({"type": "shutdown"})
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
            if P.decode_json(message.data)["type"] == "bye":
                return


def _bytes_array(chunk: bytes) -> np.ndarray:
    return np.frombuffer(chunk, dtype=np.uint8)
