"""Fault injection for the fault-matrix tests (tests/test_fault_matrix.py): a rank that dies, stalls
or sends a corrupt message at an exact moment, which a signal from outside cannot hit.

Off unless $PIPEINFER_FAULTS is set (mpiexec passes it to every rank), as `RANK:FAULT:N[:TAG]`
entries separated by `;`: on rank RANK, the N-th message it sends with TAG (run, the default:
along the pipeline; reply: to the head's control messages; draft: draft replies) is

    die        not sent: the rank kills itself (SIGKILL), as a crashed node would
    stall=S    sent S seconds late (a rank that answers too late)
    truncate   cut to half its bytes
    version    sent with another wire format version in its first byte

e.g. PIPEINFER_FAULTS="2:die:1" kills rank 2 at its first run (the prompt's prefill), and
"1:truncate:10" corrupts rank 1's tenth.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

import numpy as np

from pipeinfer_cpu.errors import UserError
from pipeinfer_cpu.wire.runs import Tag

FAULTS_ENV = "PIPEINFER_FAULTS"
_TAGS = {"run": Tag.RUN, "reply": Tag.REPLY, "draft": Tag.DRAFT}
_KINDS = ("die", "stall", "truncate", "version")


@dataclass(frozen=True)
class Fault:
    rank: int
    kind: str
    nth: int  # the n-th message (from 1) of `tag` the rank sends
    tag: int = Tag.RUN
    stall_s: float = 0.0


def parse_faults(text: str) -> tuple[Fault, ...]:
    """The faults of a $PIPEINFER_FAULTS value; a UserError for a malformed entry."""
    faults = []
    for entry in filter(None, (part.strip() for part in text.split(";"))):
        fields = entry.split(":")
        try:
            rank, what, nth = int(fields[0]), fields[1], int(fields[2])
            kind, _, value = what.partition("=")
            tag = _TAGS[fields[3]] if len(fields) > 3 else Tag.RUN
            if kind not in _KINDS or len(fields) > 4 or nth < 1 or bool(value) != (kind == "stall"):
                raise ValueError
            faults.append(Fault(rank, kind, nth, tag, float(value or 0)))
        except (ValueError, IndexError, KeyError):
            raise UserError(f"bad {FAULTS_ENV} entry {entry!r}: expected RANK:FAULT:N[:TAG] with FAULT one of "
                            f"die, stall=SECONDS, truncate, version and TAG one of {', '.join(_TAGS)}") from None
    return tuple(faults)


class FaultInjector:
    """This rank's faults: counts its sends per tag and applies the fault due, if any."""

    def __init__(self, rank: int, faults: tuple[Fault, ...]) -> None:
        self.faults = {(f.tag, f.nth): f for f in faults if f.rank == rank}
        self.sent: dict[int, int] = {}

    @staticmethod
    def from_env(rank: int) -> "FaultInjector | None":
        text = os.environ.get(FAULTS_ENV)
        return FaultInjector(rank, parse_faults(text)) if text else None

    def apply(self, tag: int, buffer: np.ndarray) -> np.ndarray:
        """The buffer to send in place of `buffer` (which the caller must not reuse)."""
        self.sent[tag] = self.sent.get(tag, 0) + 1
        fault = self.faults.get((tag, self.sent[tag]))
        if fault is None:
            return buffer
        if fault.kind == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        if fault.kind == "stall":
            time.sleep(fault.stall_s)
        if fault.kind == "truncate":
            return buffer[: buffer.nbytes // 2].copy()
        if fault.kind == "version":
            corrupt = buffer.copy()
            corrupt[0] ^= 0x40
            return corrupt
        return buffer
