"""Hostfiles: the machines of the cluster, in MPICH / Open MPI syntax, with an optional split weight
and thread count.

Accepted lines (one host each, in rank order):

    node1                 # one slot
    node2:4               # MPICH: 4 slots
    node3 slots=4         # Open MPI: 4 slots
    node4:2  # weight=2.5   our extension: a share of the layers proportional to 2.5
    node5  # weight=2 threads=6 a faster box: its stage runs llama.cpp with 6 threads

The settings live in a comment, so the same file stays a valid hostfile for `mpiexec`. Blank lines
and lines that hold only a comment are ignored. Each host runs one pipeline stage; a weight says
how fast that host is relative to the others (the default is 1); threads, how many llama.cpp
threads its stage runs (the default: --threads, else the host's cores shared by its ranks).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pipeinfer_cpu.errors import HostfileError

_HOST = r"(?P<host>[A-Za-z0-9_.\-]+?)"
_LINE = re.compile(
    rf"^{_HOST}(?::(?P<colon_slots>\d+)|\s+slots\s*=\s*(?P<slots>\d+))?"
    rf"(?:\s+max[-_]slots\s*=\s*\d+)?\s*$"
)
_SETTING = re.compile(r"^(?P<key>weight|threads)\s*=\s*(?P<value>[^\s=]+)(?P<rest>.*)$", re.DOTALL)
_NUMBER = re.compile(r"^[0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?$")


@dataclass(frozen=True)
class Host:
    """One machine of the cluster."""

    name: str
    slots: int = 1
    weight: float = 1.0
    threads: int = 0  # 0: not given here


def parse_hostfile(path: Path) -> tuple[Host, ...]:
    """Read a hostfile; raise `HostfileError` naming the file and line of the first bad line."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise HostfileError(f"cannot read hostfile {path}: {exc.strerror or exc}") from None
    hosts = tuple(
        host
        for number, line in enumerate(text.splitlines(), start=1)
        if (host := parse_line(line, f"{path}:{number}")) is not None
    )
    if not hosts:
        raise HostfileError(f"{path}: no hosts listed")
    return hosts


def parse_line(line: str, where: str) -> Host | None:
    """Parse one hostfile line; None for a blank or comment-only line."""
    body, _, comment = line.partition("#")
    body = body.strip()
    if not body:
        return None
    match = _LINE.match(body)
    if match is None:
        raise HostfileError(
            f"{where}: cannot parse {body!r} (expected 'host', 'host:slots' or 'host slots=N')"
        )
    slots = int(match["colon_slots"] or match["slots"] or 1)
    if slots < 1:
        raise HostfileError(f"{where}: slots must be at least 1, got {slots}")
    settings = _parse_settings(comment, where)
    return Host(name=match["host"], slots=slots, **settings)


def _parse_settings(comment: str, where: str) -> dict[str, float | int]:
    """The `weight=W threads=T` a comment starts with (either, both, any order); the rest is free text."""
    settings: dict[str, float | int] = {}
    rest = comment.strip()
    while (match := _SETTING.match(rest)) is not None:
        key, value = match["key"], match["value"]
        if key == "weight":
            if not _NUMBER.match(value) or float(value) <= 0:
                raise HostfileError(f"{where}: bad weight {value!r} (expected '# weight=<positive number>')")
            settings["weight"] = float(value)
        else:
            if not value.isdigit() or int(value) < 1:
                raise HostfileError(f"{where}: bad threads {value!r} (expected '# threads=<whole number >= 1>')")
            settings["threads"] = int(value)
        rest = match["rest"].strip()
    if rest.split("=")[0].strip() in ("weight", "threads"):
        raise HostfileError(f"{where}: bad setting {rest!r} (expected '# weight=<number> threads=<number>')")
    return settings


def machinefile_lines(placement: tuple[str, ...]) -> list[str]:
    """Lines of an MPICH/Open MPI machinefile that put rank i on placement[i], in order.

    Consecutive ranks on one host are grouped as `host:count`, which both hydra and Open MPI's
    sequential filling honour.
    """
    lines: list[str] = []
    previous, count = None, 0
    for host in placement:
        if host == previous:
            count += 1
            continue
        if previous is not None:
            lines.append(f"{previous}:{count}")
        previous, count = host, 1
    if previous is not None:
        lines.append(f"{previous}:{count}")
    return lines
