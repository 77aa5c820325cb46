"""Control messages between the head and the other ranks: typed, JSON on the wire.

The head sends on `Tag.CONTROL`, a rank answers on `Tag.REPLY`. A job starts like this:

    head -> rank   Setup          how to start llama.cpp (the CPU backend variant to force, if any), and
                                  the emulated links (wire/links.py), which the rank applies at once
    rank -> head   Hello          host, cores, memory available, wire version, the CPU backend it loaded (or why none)
    head -> rank   Assign         a stage's layer range and shard (or the whole draft model)
    rank -> head   HAVE_FILE | NEED_FILE   (NEED_FILE: the head sends the shard's bytes on Tag.FILE)
    rank -> head   Ready          loaded; then runs flow on Tag.RUN (wire/runs.py)

then, any time: RESET_STATS, DECODE_STARTED (no answer), STATS -> StageReport, KvUsageRequest -> KvUsage, and at the end
SHUTDOWN -> BYE. A rank that fails answers Failure and waits for the head's word. Messages with a
body are frozen dataclasses; those without one are the members of `Signal`.

A calibration job (`hosts calibrate`) sends Calibrate instead of Assign: the rank answers HAVE_FILE
or NEED_FILE for each of its shards in turn, then a CalibrationReport, then waits for SHUTDOWN.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from typing import Any

import numpy as np

from pipeinfer_cpu.llama.cpubackend import BackendReport
from pipeinfer_cpu.llama.settings import LlamaSettings
from pipeinfer_cpu.modelfiles.planning import LayerRange
from pipeinfer_cpu.modelfiles.shards import ShardFile
from pipeinfer_cpu.stats import StageStats
from pipeinfer_cpu.wire.links import LinkMap
from pipeinfer_cpu.wire.runs import WIRE_VERSION, WireVersionError


class Role(str, Enum):
    STAGE = "stage"  # a layer range of the target
    DRAFT = "draft"  # the whole draft model


@dataclass(frozen=True)
class Assignment:
    """What the head asks a rank to run: a layer range of the target (or, for the draft, all of it)."""

    index: int  # the stage's number (-1: the draft)
    layers: LayerRange
    shard: ShardFile
    n_ctx: int
    n_batch: int
    n_threads: int
    n_seq_max: int
    upstream: int  # the rank runs come from
    downstream: int  # the rank results go to
    cancellation: bool  # watch for cancels while computing (pipeinfer)
    role: Role = Role.STAGE
    llama: LlamaSettings = LlamaSettings()  # KV-cache type, flash attention, loading: the same on every stage


class Signal(str, Enum):
    """The messages that carry nothing but their kind."""

    RESET_STATS = "reset-stats"  # head -> rank: start counting a new request
    DECODE_STARTED = "decode-started"  # head -> stage: the prompt is in; what it sends from now on is decode traffic
    STATS = "stats"  # head -> rank: send a StageReport
    SHUTDOWN = "shutdown"  # head -> rank: stop (answered by BYE)
    HAVE_FILE = "have-file"  # rank -> head: this host can read the assigned shard
    NEED_FILE = "need-file"  # rank -> head: send the shard's bytes (Tag.FILE)
    BYE = "bye"  # rank -> head: leaving


@dataclass(frozen=True)
class Setup:
    """head -> rank, first of all: how to start llama.cpp."""

    cpu_variant: str | None  # None: the best variant this rank's CPU runs
    wire: int = WIRE_VERSION
    links: LinkMap | None = None  # emulated links: the rank shapes its sends by them before it answers


@dataclass(frozen=True)
class Assign:
    """head -> rank: the work; answered by HAVE_FILE or NEED_FILE, then Ready."""

    assignment: Assignment


@dataclass(frozen=True)
class Calibrate:
    """head -> rank, instead of Assign: time decode runs of the model's first layers (rank/calibration.py)."""

    shards: tuple[ShardFile, ...]  # layers [0, k) of the model, for two k (one when the model is that shallow)
    n_threads: int
    token_counts: tuple[int, ...]  # tokens per timed run
    budget_s: float  # about how long to keep repeating the runs (at least a few repetitions each)
    llama: LlamaSettings = LlamaSettings()


@dataclass(frozen=True)
class KvUsageRequest:
    """head -> stage: which positions do these KV sequences hold? (tests)"""

    seqs: tuple[int, ...]


@dataclass(frozen=True)
class Hello:
    """rank -> head, answering Setup: who this rank is and what it runs."""

    host: str
    pid: int
    cpus: int
    wire: int
    backend: BackendReport | None  # None when no CPU backend variant runs here: see backend_error
    backend_error: str | None = None
    mem_available: int = 0  # bytes of memory the host has available (0: unknown)


@dataclass(frozen=True)
class Ready:
    """rank -> head: the model is loaded."""

    rss: int  # peak resident bytes after loading


@dataclass(frozen=True)
class StageReport:
    """stage -> head, answering STATS: what the stage did since the last RESET_STATS."""

    stats: StageStats
    bytes_sent: int
    decode_bytes_sent: int | None = None  # since DECODE_STARTED (None: it did not come)


@dataclass(frozen=True)
class CalibrationReport:
    """rank -> head, answering Calibrate: median seconds per run, by tokens per run, of one layer and of
    the output layer (as timings.HostTiming holds them), how many runs each median is of, and how far
    the medians lie above the fastest runs (typically: a busy host's spread is well above 1)."""

    layer: tuple[tuple[int, float], ...]
    output: tuple[tuple[int, float], ...]
    repeats: int
    spread: float = 1.0
    run: tuple[tuple[int, float], ...] = ()  # a run's own cost, beside its layers


@dataclass(frozen=True)
class KvUsage:
    """stage -> head, answering KvUsageRequest: seq -> (min, max) position held."""

    seqs: dict[int, tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class Failure:
    """rank -> head: this rank failed; the head reports it, naming rank and host, and stops the job."""

    message: str
    detail: str = ""  # a traceback, with PIPEINFER_DEBUG


ControlMessage = (Signal | Setup | Assign | Calibrate | KvUsageRequest | Hello | Ready | StageReport | KvUsage
                  | CalibrationReport | Failure)
_KINDS: dict[type, str] = {Setup: "setup", Assign: "assign", KvUsageRequest: "kv-usage?", Hello: "hello",
                           Ready: "ready", StageReport: "stats-report", KvUsage: "kv-usage", Failure: "error",
                           Calibrate: "calibrate", CalibrationReport: "calibration-report"}
_BY_KIND: dict[str, type] = {kind: cls for cls, kind in _KINDS.items()}


def kind_of(message: ControlMessage | type) -> str:
    """The name a message (or a message class) has on the wire, for error messages."""
    if isinstance(message, Signal):
        return message.value
    return _KINDS[message if isinstance(message, type) else type(message)]


def encode(message: ControlMessage) -> np.ndarray:
    body = {"type": message.value} if isinstance(message, Signal) else {"type": kind_of(message), **_plain(message)}
    return np.frombuffer(json.dumps(body).encode(), dtype=np.uint8)


def decode(data: np.ndarray) -> ControlMessage:
    """The message in `data`; a WireVersionError when it is not one this version knows."""
    try:
        body = json.loads(data.tobytes().decode())
        kind = body.pop("type")
        if kind in Signal._value2member_map_:
            return Signal(kind)
        cls = _BY_KIND[kind]
    except (ValueError, KeyError, AttributeError, TypeError):
        raise WireVersionError("a control message this version of pipeinfer-cpu does not know") from None
    return _build(cls, body)


def _plain(value: Any) -> Any:
    """Dataclasses, enums, tuples and int-keyed dicts as JSON data."""
    if isinstance(value, StageStats):
        return value.to_json_dict()
    if isinstance(value, BackendReport):
        return value.to_json()
    if isinstance(value, LinkMap):
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
        data = body["assignment"]
        body["assignment"] = Assignment(**dict(data, layers=LayerRange(**data["layers"]),
                                               shard=ShardFile(**data["shard"]), role=Role(data["role"]),
                                               llama=LlamaSettings(**data["llama"])))
    elif cls is Setup and body.get("links") is not None:
        body["links"] = LinkMap.from_json(body["links"])
    elif cls is StageReport:
        body["stats"] = StageStats.from_json_dict(body["stats"])
    elif cls is KvUsage:
        body["seqs"] = {int(k): (int(v[0]), int(v[1])) for k, v in body["seqs"].items()}
    elif cls is KvUsageRequest:
        body["seqs"] = tuple(body["seqs"])
    elif cls is Calibrate:
        body.update(shards=tuple(ShardFile(**shard) for shard in body["shards"]),
                    token_counts=tuple(body["token_counts"]), llama=LlamaSettings(**body["llama"]))
    elif cls is CalibrationReport:
        body.update({name: tuple((int(n), float(s)) for n, s in body.get(name, ())) for name in ("layer", "output", "run")})
    return cls(**body)
