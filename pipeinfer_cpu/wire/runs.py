"""The wire's channels (tags), its format version, and run messages (binary).

A *run* is one batch of tokens travelling head -> stage 1 -> ... -> last stage -> head. It carries
the KV-cache operations each stage applies before computing it, so every stage applies them in the
same order relative to the runs, with one message per decision.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from pipeinfer_cpu.errors import PipeinferError
from pipeinfer_cpu.wire import hidden

HEAD = 0


class Tag(IntEnum):
    CONTROL = 10  # head -> rank: control messages (wire/control.py)
    REPLY = 11  # rank -> head: their answers (wire/control.py)
    RUN = 12  # along the pipeline: RunMessage
    FILE = 13  # head -> worker: raw chunks of a shard file
    CANCEL = 14  # head -> every stage, directly: int64 run ids that became stale
    DRAFT = 15  # head <-> draft rank: draft requests and replies (wire/drafts.py)


class KvKind(IntEnum):
    RM = 1  # remove seq a from positions [p0, p1)
    CP = 2  # add seq b to the cells of seq a in [p0, p1) (no data copied)
    KEEP = 3  # drop every sequence but a
    CLEAR = 4  # empty the cache


class Output(IntEnum):
    """What the last stage returns for each output row."""

    LOGITS = 0  # float32 [n_out, n_vocab]
    ARGMAX = 1  # int32 [n_out]: enough for greedy decoding, 1/n_vocab of the bytes


@dataclass(frozen=True)
class KvOp:
    kind: KvKind
    a: int = 0
    b: int = 0
    p0: int = -1
    p1: int = -1


@dataclass(frozen=True)
class RunMessage:
    """A batch of tokens (or only KV operations when `positions` is empty)."""

    run_id: int
    positions: tuple[int, ...] = ()
    seq_ids: tuple[tuple[int, ...], ...] = ()
    tokens: tuple[int, ...] = ()
    outputs: tuple[bool, ...] = ()  # which rows the last stage returns
    kv_ops: tuple[KvOp, ...] = ()
    output_kind: Output = Output.LOGITS
    payload: np.ndarray | None = field(default=None, compare=False)

    @property
    def n_tokens(self) -> int:
        return len(self.positions)

    @property
    def is_ops_only(self) -> bool:
        return not self.positions

    def with_payload(self, payload: np.ndarray | None, tokens: tuple[int, ...] = ()) -> "RunMessage":
        return RunMessage(self.run_id, self.positions, self.seq_ids, tokens, self.outputs, self.kv_ops,
                          self.output_kind, payload)

    def ops_only(self) -> "RunMessage":
        return RunMessage(-1, kv_ops=self.kv_ops)


# A run message is one uint8 buffer: an int64 header, int64 sections, then the payload's raw bytes.
# The header's first int64 is the format version (so its first byte is the version byte); change
# WIRE_VERSION whenever the layout changes: a rank never guesses at another version's layout.
# Version 3: hidden states may travel as f16 or q8 (wire/hidden.py), payload kinds 3 and 4.
WIRE_VERSION = 3
TEST_VERSION_ENV = "PIPEINFER_TEST_WIRE_VERSION"  # tests only: the version this process writes
_HEADER_FIELDS = ("version", "run_id", "n_tokens", "n_seq_ids", "n_token_ids", "n_kv_ops", "output_kind",
                  "payload_kind", "payload_rows", "payload_cols")
_HEADER = len(_HEADER_FIELDS)
_PAYLOAD_NONE, _PAYLOAD_F32, _PAYLOAD_I32, _PAYLOAD_F16, _PAYLOAD_Q8 = 0, 1, 2, 3, 4
_PAYLOAD_DTYPES = {_PAYLOAD_F32: np.float32, _PAYLOAD_I32: np.int32}
_HIDDEN_KINDS = {"f32": _PAYLOAD_F32, "f16": _PAYLOAD_F16, "q8": _PAYLOAD_Q8}  # a float32 payload's wire dtype
_HIDDEN_DTYPES = {kind: dtype for dtype, kind in _HIDDEN_KINDS.items()}
_NO_COLUMNS = -1  # a 1-D payload (argmax ids); a 2-D one with 0 columns stays 2-D


class WireVersionError(PipeinferError):
    """A message in another format version (a rank of another pipeinfer-cpu version, or corruption)."""


def written_version() -> int:
    return int(os.environ.get(TEST_VERSION_ENV, WIRE_VERSION))


def check_version(version: int, what: str) -> None:
    if version != WIRE_VERSION:
        raise WireVersionError(f"{what} is in wire format version {version}, but this rank speaks version "
                               f"{WIRE_VERSION}: install the same pipeinfer-cpu version on every node")


def encode_run(msg: RunMessage, wire_dtype: str = "f32") -> np.ndarray:
    """Flatten a run into one uint8 buffer (see above); a float32 payload (hidden states) goes in
    `wire_dtype` (wire/hidden.py) and comes out of decode_run as float32 again."""
    counts = [len(ids) for ids in msg.seq_ids]
    flat_ids = [s for ids in msg.seq_ids for s in ids]
    ops = [v for op in msg.kv_ops for v in (int(op.kind), op.a, op.b, op.p0, op.p1)]
    payload_kind, rows, cols = _payload_shape(msg.payload, wire_dtype)
    header = [written_version(), msg.run_id, msg.n_tokens, len(flat_ids), len(msg.tokens), len(msg.kv_ops),
              int(msg.output_kind), payload_kind, rows, cols]
    ints = np.array(header + list(msg.positions) + counts + flat_ids + list(msg.tokens)
                    + [int(o) for o in msg.outputs] + ops, dtype=np.int64)
    parts = [ints.view(np.uint8)]
    if msg.payload is not None and payload_kind in _HIDDEN_DTYPES:
        parts.append(hidden.encode(msg.payload, wire_dtype))
    elif msg.payload is not None:
        parts.append(np.ascontiguousarray(msg.payload).view(np.uint8).reshape(-1))
    return np.concatenate(parts)


def _payload_shape(payload: np.ndarray | None, wire_dtype: str) -> tuple[int, int, int]:
    if payload is None:
        return _PAYLOAD_NONE, 0, 0
    kind = next((k for k, dtype in _PAYLOAD_DTYPES.items() if payload.dtype == dtype), None)
    if kind is None or payload.ndim not in (1, 2):
        raise TypeError(f"payload must be a 1-D or 2-D float32 or int32 array, got {payload.dtype} {payload.shape}")
    if kind == _PAYLOAD_F32:
        kind = _HIDDEN_KINDS[hidden.checked_dtype(wire_dtype)]
    cols = payload.shape[1] if payload.ndim == 2 else _NO_COLUMNS
    return kind, payload.shape[0], cols


def decode_run(data: np.ndarray) -> RunMessage:
    if data.nbytes < _HEADER * 8:
        raise WireVersionError(f"a run message of {data.nbytes} bytes is shorter than any version's header")
    header = dict(zip(_HEADER_FIELDS, (int(v) for v in data[: _HEADER * 8].view(np.int64))))
    check_version(header["version"], "a run message")
    n, n_ids, n_tok, n_ops = (header[k] for k in ("n_tokens", "n_seq_ids", "n_token_ids", "n_kv_ops"))
    n_ints = _HEADER + 3 * n + n_ids + n_tok + 5 * n_ops
    if min(n, n_ids, n_tok, n_ops) < 0 or data.nbytes < n_ints * 8:
        raise WireVersionError(f"a corrupt run message: {data.nbytes} bytes, shorter than its header says")
    ints = data[: n_ints * 8].view(np.int64)
    at = _HEADER
    positions = tuple(int(v) for v in ints[at:at + n]); at += n
    counts = ints[at:at + n]; at += n
    flat = ints[at:at + n_ids]; at += n_ids
    tokens = tuple(int(v) for v in ints[at:at + n_tok]); at += n_tok
    outputs = tuple(bool(v) for v in ints[at:at + n]); at += n
    ops = tuple(KvOp(KvKind(int(o[0])), *(int(v) for v in o[1:])) for o in ints[at:at + 5 * n_ops].reshape(-1, 5))
    seq_ids, start = [], 0
    for count in counts:
        seq_ids.append(tuple(int(v) for v in flat[start:start + count]))
        start += count
    try:
        payload = _decode_payload(data[n_ints * 8:], header["payload_kind"], header["payload_rows"],
                                  header["payload_cols"])
    except (ValueError, KeyError) as exc:  # a payload cut short, or of no known kind
        raise WireVersionError(f"a corrupt run message: {exc}") from None
    return RunMessage(header["run_id"], positions, tuple(seq_ids), tokens, outputs, ops,
                      Output(header["output_kind"]), payload)


def _decode_payload(raw: np.ndarray, kind: int, rows: int, cols: int) -> np.ndarray | None:
    if kind == _PAYLOAD_NONE:
        return None
    shape = (rows,) if cols == _NO_COLUMNS else (rows, cols)
    if kind in _HIDDEN_DTYPES:
        return hidden.decode(raw, _HIDDEN_DTYPES[kind], shape)
    return raw.view(_PAYLOAD_DTYPES[kind]).reshape(shape)


def encode_ids(ids: list[int]) -> np.ndarray:
    return np.asarray(ids, dtype=np.int64).view(np.uint8)


def decode_ids(data: np.ndarray) -> list[int]:
    return [int(v) for v in data.view(np.int64)]
