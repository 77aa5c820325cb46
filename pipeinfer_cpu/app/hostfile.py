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

Emulated slow links between hosts (wire/links.py) are comment lines of their own:

    # link node1 node2 bw=1gbit,delay=0.5ms          ranks on node1 <-> ranks on node2, both ways
    # link node3 node3 bw=10gbit,delay=20us          the ranks sharing node3 (otherwise unshaped)

A line whose comment starts with the word `link` is this setting: two hosts listed in the file,
then a link setting `bw=RATE,delay=TIME[,jitter=TIME]` (RATE: a number and bit, kbit, mbit or
gbit; TIME: a number and us, ms or s). Pairs not named talk unshaped, unless `--link` gives every
pair a setting; a pair named here keeps its own. mpiexec ignores these lines like any comment.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pipeinfer_cpu.errors import HostfileError
from pipeinfer_cpu.wire.links import HostLink, LinkMap, LinkSpec, LinkSpecError

_HOST = r"(?P<host>[A-Za-z0-9_.\-]+?)"
_LINE = re.compile(
    rf"^{_HOST}(?::(?P<colon_slots>\d+)|\s+slots\s*=\s*(?P<slots>\d+))?"
    rf"(?:\s+max[-_]slots\s*=\s*\d+)?\s*$"
)
_SETTING = re.compile(r"^(?P<key>weight|threads)\s*=\s*(?P<value>[^\s=]+)(?P<rest>.*)$", re.DOTALL)
_NUMBER = re.compile(r"^[0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?$")
_LINK = re.compile(r"^\s*#\s*link(?:\s+|$)(?P<rest>.*)$")


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
            if not _NUMBER.match(value) or not 0 < float(value) < math.inf:  # 1e400 reads as inf
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


def parse_links(path: Path) -> tuple[HostLink, ...]:
    """The `# link A B SETTING` lines of a hostfile; a HostfileError names the file and line of a bad one."""
    hosts = {host.name for host in parse_hostfile(path)}
    links: dict[frozenset[str], int] = {}
    found = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        match = _LINK.match(line)
        if match is None:
            continue
        where = f"{path}:{number}"
        words = match["rest"].split()
        if len(words) != 3:
            raise HostfileError(f"{where}: expected '# link HOST_A HOST_B bw=RATE,delay=TIME', got {line.strip()!r}")
        a, b, text = words
        for host in (a, b):
            if host not in hosts:
                raise HostfileError(f"{where}: link names host {host!r}, which no line of the hostfile lists")
        if frozenset((a, b)) in links:
            raise HostfileError(f"{where}: link {a} {b} is already set on line {links[frozenset((a, b))]}")
        try:
            spec = LinkSpec.parse(text)
        except LinkSpecError as exc:
            raise HostfileError(f"{where}: {exc}") from None
        links[frozenset((a, b))] = number
        found.append(HostLink(a, b, spec))
    return tuple(found)


def link_map(link: str | None, hostfile: Path | None, placement: tuple[str, ...]) -> LinkMap | None:
    """The links of a job whose rank i runs on placement[i]: `link` (--link) for every pair, the hostfile's
    `# link` lines for theirs; None when nothing is emulated."""
    default = None if link is None else LinkSpec.parse(link)
    pairs = parse_links(hostfile) if hostfile is not None else ()
    return LinkMap(default, pairs, placement) if default is not None or pairs else None


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


_SETTING_AT = re.compile(r"\s*(?P<key>weight|threads)\s*=\s*(?P<value>[^\s=]+)")  # one setting, as _SETTING reads it


def set_weights(text: str, weights: Sequence[float], where: str) -> str:
    """A hostfile's `text` with `# weight=W` set on its host lines, in order (`weights[i]` on the i-th
    host line, written with 2 decimals), and everything else kept: each line's host and slots syntax,
    its `threads=` and free comment text, comment-only and blank lines, line ends. `where` names the
    file in errors."""
    lines = text.splitlines(keepends=True)
    hosts = [number for number, line in enumerate(lines) if parse_line(_content(line), f"{where}:{number + 1}")]
    if len(hosts) != len(weights):
        raise HostfileError(f"{where}: {len(weights)} weights for {len(hosts)} hosts")
    for number, weight in zip(hosts, weights):
        content = _content(lines[number])
        lines[number] = with_weight(content, weight) + lines[number][len(content):]
    return "".join(lines)


def with_weight(line: str, weight: float) -> str:
    """One host line (without its line end) with its weight set: replaced where the comment's settings
    give one, else first among them, in a comment of its own if the line has none."""
    if not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"a weight must be a positive number, got {weight}")
    value = f"{weight:.2f}"
    body, hash_mark, comment = line.partition("#")
    if not hash_mark:
        return f"{body.rstrip()}  # weight={value}"
    spans, position = [], 0
    while (setting := _SETTING_AT.match(comment, position)) is not None:
        if setting["key"] == "weight":
            spans.append(setting.span("value"))
        position = setting.end()
    for start, end in reversed(spans):
        comment = comment[:start] + value + comment[end:]
    if not spans:
        rest = comment.lstrip()
        lead = comment[:len(comment) - len(rest)] or " "
        comment = f"{lead}weight={value}" + (f" {rest}" if rest else "")
    return f"{body}#{comment}"


def without_host_line(text: str, index: int, where: str) -> str:
    """A hostfile's `text` without its `index`-th host line (0-based, in rank order) and without the
    `# link` lines that named a host no other line lists; everything else kept. `where` names the
    file in errors."""
    lines = text.splitlines(keepends=True)
    hosts = {number: host for number, line in enumerate(lines)
             if (host := parse_line(_content(line), f"{where}:{number + 1}")) is not None}
    if not 0 <= index < len(hosts):
        raise HostfileError(f"{where}: no host line {index + 1} (it has {len(hosts)})")
    dropped = sorted(hosts)[index]
    left = {host.name for number, host in hosts.items() if number != dropped}
    kept = [line for number, line in enumerate(lines) if number != dropped and _names_only(line, left)]
    return "".join(kept)


def _names_only(line: str, hosts: set[str]) -> bool:
    """False for a `# link` line that names a host outside `hosts`; True for every other line."""
    match = _LINK.match(line)
    return match is None or all(word in hosts for word in match["rest"].split()[:2])


def _content(line: str) -> str:
    """A line without its line end."""
    return (line.splitlines() or [""])[0]
