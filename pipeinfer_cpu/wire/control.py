"""Control messages between the head and the other ranks: typed, JSON on the wire.

The head sends on `Tag.CONTROL`, a rank answers on `Tag.REPLY`. A job starts like this:

    head -> rank   Setup          how to start llama.cpp (the CPU backend variant to force, if any)
    rank -> head   Hello          host, cores, wire version, the CPU backend it loaded (or why none)
    head -> rank   Assign         a stage's layer range and shard (or the whole draft model)
    rank -> head   HaveFile | NeedFile   (NeedFile: the head sends the shard's bytes on Tag.FILE)
    rank -> head   Ready          loaded; then runs flow on Tag.RUN (wire/runs.py)

then, any time: ResetStats, StatsRequest -> StageReport, KvUsageRequest -> KvUsage, and at the end
Shutdown -> Bye. A rank that fails answers Failure and waits for the head's word.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from typing import Any, ClassVar

import numpy as np

from pipeinfer_cpu.llama.cpubackend import BackendReport
from pipeinfer_cpu.modelfiles.shards import ShardFile
from pipeinfer_cpu.stats import StageStats
from pipeinfer_cpu.wire.runs import WIRE_VERSION, WireVersionError


class Role(str, Enum):
    STAGE = "stage"  # a layer range of the target
    DRAFT = "draft"  # the whole draft model


@dataclass(frozen=True)
class Assignment:
    """What the head asks a rank to run; `[start, end)` is its half-open layer range."""

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
    role: Role = Role.STAGE

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.n_layer


# -- head -> rank ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setup:
    cpu_variant: str | None  # None: the best variant this rank's CPU runs
    wire: int = WIRE_VERSION
    kind: ClassVar[str] = "setup"


@dataclass(frozen=True)
class Assign:
    assignment: Assignment
    kind: ClassVar[str] = "assign"


@dataclass(frozen=True)
class ResetStats:
    kind: ClassVar[str] = "reset-stats"


@dataclass(frozen=True)
class StatsRequest:
    kind: ClassVar[str] = "stats"


@dataclass(frozen=True)
class KvUsageRequest:
    seqs: tuple[int, ...]
    kind: ClassVar[str] = "kv-usage?"


@dataclass(frozen=True)
class Shutdown:
    kind: ClassVar[str] = "shutdown"


# -- rank -> head ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Hello:
    host: str
    pid: int
    cpus: int
    wire: int
    backend: BackendReport | None  # None when no CPU backend variant runs here: see backend_error
    backend_error: str | None = None
    kind: ClassVar[str] = "hello"


@dataclass(frozen=True)
class HaveFile:
    kind: ClassVar[str] = "have-file"


@dataclass(frozen=True)
class NeedFile:
    kind: ClassVar[str] = "need-file"


@dataclass(frozen=True)
class Ready:
    rss: int  # peak resident bytes after loading
    kind: ClassVar[str] = "ready"


@dataclass(frozen=True)
class StageReport:
    stats: StageStats  # since the last ResetStats
    bytes_sent: int
    kind: ClassVar[str] = "stats-report"


@dataclass(frozen=True)
class KvUsage:
    seqs: dict[int, tuple[int, int]] = field(default_factory=dict)  # seq -> (min, max) position
    kind: ClassVar[str] = "kv-usage"


@dataclass(frozen=True)
class Failure:
    message: str
    detail: str = ""  # a traceback, with PIPEINFER_DEBUG
    kind: ClassVar[str] = "error"


@dataclass(frozen=True)
class Bye:
    kind: ClassVar[str] = "bye"


ControlMessage = (Setup | Assign | ResetStats | StatsRequest | KvUsageRequest | Shutdown | Hello | HaveFile
                  | NeedFile | Ready | StageReport | KvUsage | Failure | Bye)
_BY_KIND: dict[str, type] = {cls.kind: cls for cls in (
    Setup, Assign, ResetStats, StatsRequest, KvUsageRequest, Shutdown, Hello, HaveFile, NeedFile, Ready,
    StageReport, KvUsage, Failure, Bye)}


def encode(message: ControlMessage) -> np.ndarray:
    body = {"type": message.kind, **_plain(message)}
    return np.frombuffer(json.dumps(body).encode(), dtype=np.uint8)


def decode(data: np.ndarray) -> ControlMessage:
    """The message in `data`; a WireVersionError when it is not one this version knows."""
    try:
        body = json.loads(data.tobytes().decode())
        cls = _BY_KIND[body.pop("type")]
    except (ValueError, KeyError, AttributeError, TypeError):
        raise WireVersionError("a control message this version of pipeinfer-cpu does not know") from None
    return _build(cls, body)


def _plain(value: Any) -> Any:
    """Dataclasses, enums, tuples and int-keyed dicts as JSON data."""
    if isinstance(value, StageStats):
        return value.to_json_dict()
    if isinstance(value, BackendReport):
        return value.to_json()
    if is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _build(cls: type, body: dict) -> ControlMessage:
    """The inverse of _plain for the few fields that are not plain JSON types."""
    if cls is Hello and body.get("backend") is not None:
        body["backend"] = BackendReport.from_json(body["backend"])
    elif cls is Assign:
        data = dict(body["assignment"], shard=ShardFile(**body["assignment"]["shard"]))
        body["assignment"] = Assignment(**dict(data, role=Role(data["role"])))
    elif cls is StageReport:
        body["stats"] = StageStats.from_json_dict(body["stats"])
    elif cls is KvUsage:
        body["seqs"] = {int(k): (int(v[0]), int(v[1])) for k, v in body["seqs"].items()}
    elif cls is KvUsageRequest:
        body["seqs"] = tuple(body["seqs"])
    return cls(**body)
