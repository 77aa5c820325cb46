"""Where the head's runs are computed: in this process (`single` mode) or through the MPI pipeline.

Both executors take `RunMessage`s and hand back results in launch order, so the decoding loop is
the same for every mode. A result is the last stage's reply: logits or argmax ids of the run's
output rows. Runs without output rows produce no result.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from pipeinfer_cpu.errors import ClusterError
from pipeinfer_cpu.head.cluster import Cluster
from pipeinfer_cpu.llama.kvcache import apply_kv_ops
from pipeinfer_cpu.llama.runtime import Stage
from pipeinfer_cpu.wire import control as C
from pipeinfer_cpu.wire import runs as P
from pipeinfer_cpu.wire.runs import Output, RunMessage, Tag
from pipeinfer_cpu.wire.transport import wait


@dataclass(frozen=True)
class RunResult:
    run_id: int
    output_kind: Output
    payload: np.ndarray  # float32 [n_out, n_vocab] logits or int32 [n_out] argmax ids


class Executor(Protocol):
    def launch(self, run: RunMessage) -> None: ...

    def poll(self) -> RunResult | None: ...

    def wait(self) -> RunResult: ...

    def cancel(self, run_ids: list[int]) -> None: ...


class LocalExecutor:
    """The whole model in the head's process: the reference every other mode must match."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self._results: deque[RunResult] = deque()
        self.compute_s = 0.0

    def launch(self, run: RunMessage) -> None:
        apply_kv_ops(self.stage, run.kv_ops)
        if run.is_ops_only:
            return
        started = time.perf_counter()
        logits = self.stage.decode(run.positions, run.seq_ids, tokens=run.tokens, outputs=run.outputs)
        self.compute_s += time.perf_counter() - started
        if logits is None or not any(run.outputs):
            return
        payload = np.argmax(logits, axis=1).astype(np.int32) if run.output_kind == Output.ARGMAX else logits
        self._results.append(RunResult(run.run_id, run.output_kind, payload))

    def poll(self) -> RunResult | None:
        return self._results.popleft() if self._results else None

    def wait(self) -> RunResult:
        if not self._results:
            raise RuntimeError("no run in flight")
        return self._results.popleft()

    def cancel(self, run_ids: list[int]) -> None:
        """Local runs finish inside `launch`, so there is never anything left to cancel."""


SILENT_PROBE_S = 1.0  # after a pipeline timeout, how long each stage has to answer a probe


class PipelineExecutor:
    """Runs travel head -> stage ranks in order -> head; cancels go to every stage directly."""

    def __init__(self, cluster: Cluster, stage_ranks: list[int], timeout_s: float) -> None:
        self.cluster = cluster
        self.transport = cluster.transport
        self.stage_ranks = stage_ranks
        self.timeout_s = timeout_s

    def launch(self, run: RunMessage) -> None:
        self.transport.send(self.stage_ranks[0], int(Tag.RUN), P.encode_run(run))

    def poll(self) -> RunResult | None:
        message = self.transport.poll([(self.stage_ranks[-1], Tag.RUN)])
        return None if message is None else _result(message.data)

    def wait(self) -> RunResult:
        last = self.stage_ranks[-1]
        message = wait(self.transport, [(last, Tag.RUN), (-1, Tag.REPLY)], self.timeout_s)
        if message is None:
            silent = self.cluster.silent_ranks(self.stage_ranks, SILENT_PROBE_S)
            who = (f"{' and '.join(map(self.cluster.describe, silent))} does not answer" if silent
                   else f"last stage is rank {last} ({self.cluster.host(last)})")
            raise ClusterError(f"no result from the pipeline within {self.timeout_s:.0f} s; {who}; "
                               "a stage may be stuck or dead")
        if message.tag == Tag.REPLY:
            reply = C.decode(message.data)
            rank = message.source
            text = reply.message if isinstance(reply, C.Failure) else f"unexpected {C.kind_of(reply)}"
            raise ClusterError(f"rank {rank} ({self.cluster.host(rank)}): {text}")
        try:
            return _result(message.data)
        except P.WireVersionError as exc:
            raise ClusterError(f"from rank {message.source} ({self.cluster.host(message.source)}): {exc}") from None

    def cancel(self, run_ids: list[int]) -> None:
        data = P.encode_ids(run_ids)
        for rank in self.stage_ranks:
            self.transport.send(rank, int(Tag.CANCEL), data)


def _result(data: np.ndarray) -> RunResult:
    run = P.decode_run(data)
    assert run.payload is not None
    return RunResult(run.run_id, run.output_kind, run.payload)
