"""The head of a calibration job (`hosts calibrate`): every worker rank times the model on its host.

The job is laid out as a pipeline with one stage per hostfile line (the head beside the first), so
each worker runs the llama.cpp build and CPU backend that its stage would, with the thread count
its stage would get (the hostfile's `threads=`, else --threads, else the host's cores shared by
its ranks). The head writes two small shards of the model's first layers (cached like any shard),
sends them to workers that cannot read them, and collects what each worker measured
(rank/calibration.py) as one event for the user-facing process.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from pipeinfer_cpu.errors import UserError
from pipeinfer_cpu.head.cluster import Cluster
from pipeinfer_cpu.modelfiles.models import check_supported, read_model_info
from pipeinfer_cpu.modelfiles.planning import LayerRange
from pipeinfer_cpu.modelfiles.shards import shard_model
from pipeinfer_cpu.wire import control as C
from pipeinfer_cpu.wire.transport import Transport

TOKEN_COUNTS = (1, 2, 4, 8)  # tokens per timed run
BUDGET_S = 5.0  # seconds of timed rounds per rank (they run at once), after loading and warming up
SHARD_LAYERS = (2, 6)  # the two depths whose difference is the cost of one layer
REPORT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class CalibrationSettings:
    """What the user-facing process asks of the head of a calibration job."""

    model: Path
    host_threads: tuple[int, ...]  # per hostfile line (worker rank 1, 2, ...): its `threads=`, 0 if none
    n_threads: int = 0  # --threads: for a line without threads=; 0 = the host's cores shared by its ranks
    cpu_variant: str | None = None
    budget_s: float = BUDGET_S
    timeout_s: float = 60.0

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "model": str(Path(self.model).resolve())}

    @staticmethod
    def from_json(data: dict) -> "CalibrationSettings":
        return CalibrationSettings(**{**data, "model": Path(data["model"]),
                                      "host_threads": tuple(data["host_threads"])})


def shard_layers(n_layer: int) -> tuple[int, ...]:
    """The depths of the calibration shards: SHARD_LAYERS, cut to a shallower model (one shard for one layer)."""
    deep = min(SHARD_LAYERS[1], n_layer)
    shallow = min(SHARD_LAYERS[0], deep - 1)
    return (shallow, deep) if shallow >= 1 else (deep,)


def calibrate(settings: CalibrationSettings, transport: Transport) -> dict:
    """Time the model on every worker; the `calibration` event for the user-facing process, one host per worker."""
    info = read_model_info(settings.model)
    check_supported(info)
    if transport.size - 1 != len(settings.host_threads):
        raise UserError(f"the calibration job has {transport.size - 1} worker ranks for "
                        f"{len(settings.host_threads)} hosts")
    cluster = Cluster(transport, settings.timeout_s)
    cluster.greet(settings.cpu_variant)
    plan = shard_model(info, tuple(LayerRange(0, k, info.n_layer) for k in shard_layers(info.n_layer)))
    requests = {rank: C.Calibrate(plan.shards, asked or cluster.threads_for(rank, settings.n_threads), TOKEN_COUNTS,
                                  settings.budget_s)
                for rank, asked in zip(cluster.workers, settings.host_threads)}
    reports = cluster.calibrate(requests, REPORT_TIMEOUT_S)
    cluster.shutdown()
    hosts = [{"host": cluster.host(rank), "threads": requests[rank].n_threads,
              "backend": cluster.backends[rank].variant, "layer": reports[rank].layer,
              "output": reports[rank].output, "run": reports[rank].run, "repeats": reports[rank].repeats, "spread": reports[rank].spread}
             for rank in cluster.workers]
    return {"event": "calibration", "model": info.path.name, "n_layers": info.n_layer,
            "shard_layers": [s.end for s in plan.shards], "hosts": hosts}
