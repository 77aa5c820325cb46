"""Emulated network links: what a link is, and when a message sent on one arrives. Pure: no MPI, no clock.

A link setting is written `bw=100mbit,delay=2ms[,jitter=0.3ms]` (keys in any order, each at most once,
at least one of bw and delay):

    bw=RATE       the link's rate: a number and one of bit, kbit, mbit, gbit (bits per second,
                  decimal: 1 kbit = 1000 bit/s, as tc writes them). No bw: no serialisation time.
    delay=TIME    one-way delay: a number and one of us, ms, s (0 alone is allowed).
    jitter=TIME   each message's delay varies uniformly in [delay - jitter, delay + jitter] (never
                  below 0, and never so that a message overtakes an earlier one on the same link).

Each direction of a pair of ranks is a link of its own (`LinkState`): a FIFO that serialises messages
at the link's rate (a message starts when the link is free: back-to-back messages queue), then adds
the delay. `LinkMap` says which setting each (sender, receiver) pair of ranks has: `--link` for every
pair, hostfile lines `# link A B SETTING` for the ranks on hosts A and B (they win over --link).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace

from pipeinfer_cpu.errors import UserError

RATE_UNITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
TIME_UNITS = {"us": 1e6, "ms": 1e3, "s": 1.0}  # per second (dividing keeps 20us exactly 2e-05)
KEYS = ("bw", "delay", "jitter")
EXAMPLE = "bw=100mbit,delay=2ms,jitter=0.3ms"
_QUANTITY = re.compile(r"^(?P<number>[-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)(?P<unit>[A-Za-z]*)$")


class LinkSpecError(UserError):
    """A link setting that cannot be read; the message says which part and what is expected."""


@dataclass(frozen=True)
class LinkSpec:
    """One link's setting: rate in bit/s (None: unlimited), one-way delay and jitter in seconds."""

    rate_bps: float | None = None
    delay_s: float = 0.0
    jitter_s: float = 0.0

    def __post_init__(self) -> None:
        if self.rate_bps is not None and not self.rate_bps > 0:
            raise LinkSpecError(f"link bw must be above 0, got {self.rate_bps:g} bit/s")
        if not self.delay_s >= 0 or not self.jitter_s >= 0:
            raise LinkSpecError("link delay and jitter must be 0 or more")

    @staticmethod
    def parse(text: str) -> "LinkSpec":
        """`bw=100mbit,delay=2ms,jitter=0.3ms` as a LinkSpec; a LinkSpecError naming the bad part."""
        values: dict[str, float] = {}
        for part in (p.strip() for p in text.split(",")):
            key, equals, value = part.partition("=")
            key = key.strip().lower()
            if not equals or not value.strip():
                raise LinkSpecError(f"bad link setting {text!r}: {part!r} is not key=value (e.g. {EXAMPLE})")
            if key not in KEYS:
                raise LinkSpecError(f"bad link setting {text!r}: unknown key {key!r} (known: {', '.join(KEYS)})")
            if key in values:
                raise LinkSpecError(f"bad link setting {text!r}: {key} given twice")
            values[key] = _rate(value.strip(), text) if key == "bw" else _time(key, value.strip(), text)
        if "bw" not in values and "delay" not in values:
            raise LinkSpecError(f"bad link setting {text!r}: give bw=, delay= or both (e.g. {EXAMPLE})")
        return LinkSpec(values.get("bw"), values.get("delay", 0.0), values.get("jitter", 0.0))

    def __str__(self) -> str:
        parts = [] if self.rate_bps is None else [f"bw={_rate_text(self.rate_bps)}"]
        parts.append(f"delay={_time_text(self.delay_s)}")
        if self.jitter_s:
            parts.append(f"jitter={_time_text(self.jitter_s)}")
        return ",".join(parts)

    def serialisation_s(self, nbytes: int) -> float:
        """How long `nbytes` take to leave at this link's rate."""
        return 0.0 if self.rate_bps is None else nbytes * 8 / self.rate_bps


def _rate(value: str, text: str) -> float:
    match = _QUANTITY.match(value)
    unit = match["unit"].lower() if match else ""
    if match is None or unit not in RATE_UNITS:
        hint = " ('bps' spellings are ambiguous: tc reads mbps as megabytes)" if unit.endswith("bps") else ""
        raise LinkSpecError(f"bad link setting {text!r}: bw {value!r} is not a number with one of "
                            f"{', '.join(RATE_UNITS)}{hint}")
    rate = float(match["number"]) * RATE_UNITS[unit]
    if rate <= 0:
        raise LinkSpecError(f"bad link setting {text!r}: bw must be above 0, got {value!r}")
    return rate


def _time(key: str, value: str, text: str) -> float:
    match = _QUANTITY.match(value)
    if match is not None and match["unit"] == "" and float(match["number"]) == 0:
        return 0.0
    if match is not None and float(match["number"]) < 0:
        raise LinkSpecError(f"bad link setting {text!r}: {key} must be 0 or more, got {value!r}")
    if match is None or match["unit"].lower() not in TIME_UNITS:
        raise LinkSpecError(f"bad link setting {text!r}: {key} {value!r} is not a number with one of "
                            f"{', '.join(TIME_UNITS)}")
    return float(match["number"]) / TIME_UNITS[match["unit"].lower()]


def _rate_text(rate: float) -> str:
    for unit in ("gbit", "mbit", "kbit"):
        if rate >= RATE_UNITS[unit]:
            return f"{rate / RATE_UNITS[unit]:g}{unit}"
    return f"{rate:g}bit"


def _time_text(seconds: float) -> str:
    if seconds == 0:
        return "0"
    return f"{seconds * 1e3:g}ms" if seconds >= 1e-3 else f"{seconds * 1e6:g}us"


# -- one direction of a link -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Timing:
    """When a message's last bit leaves the sender, and when it has arrived at the receiver."""

    leaves_s: float
    arrives_s: float


@dataclass(frozen=True)
class LinkState:
    """One direction (sender -> receiver) of a link: when it is free again, when its last message
    arrives, and how many messages it carried (the index of each message's jitter draw)."""

    spec: LinkSpec
    seed: int = 0
    free_s: float = float("-inf")
    last_arrival_s: float = float("-inf")
    sent: int = 0

    def send(self, now_s: float, nbytes: int) -> tuple["LinkState", Timing]:
        """A message of `nbytes` handed to the link at `now_s`: the link's next state and the message's timing.

        FIFO: it starts when the link is free (max(now, free)), leaves after its serialisation time,
        arrives after the delay (plus jitter), never before the message ahead of it.
        """
        leaves = max(now_s, self.free_s) + self.spec.serialisation_s(nbytes)
        delay = self.spec.delay_s
        if self.spec.jitter_s:
            delay = max(0.0, delay + self.spec.jitter_s * (2 * uniform(self.seed, self.sent) - 1))
        arrives = max(leaves + delay, self.last_arrival_s)
        return replace(self, free_s=leaves, last_arrival_s=arrives, sent=self.sent + 1), Timing(leaves, arrives)


def uniform(seed: int, index: int) -> float:
    """A deterministic draw in [0, 1) for message `index` of the link seeded `seed` (splitmix64)."""
    mask = (1 << 64) - 1
    z = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return ((z ^ (z >> 31)) >> 11) / float(1 << 53)


# -- which pairs of ranks get which setting ------------------------------------------------------------------

@dataclass(frozen=True)
class HostLink:
    """A hostfile's `# link A B SETTING`: every rank on host A talks to every rank on host B (both ways) so."""

    a: str
    b: str
    spec: LinkSpec

    def joins(self, host_x: str | None, host_y: str | None) -> bool:
        return {host_x, host_y} == {self.a, self.b} if host_x != host_y else self.a == self.b == host_x


@dataclass(frozen=True)
class LinkMap:
    """The link setting of each pair of ranks: a hostfile line naming their hosts, else `default`
    (--link: every pair of distinct ranks, on one host too), else none (the real network, unshaped)."""

    default: LinkSpec | None = None
    pairs: tuple[HostLink, ...] = ()
    hosts: tuple[str, ...] = ()  # each rank's host, by rank (the hostfile's names; needed for `pairs`)
    seed: int = 0  # jitter draws: link (i -> j) uses seed + 1000 * i + j

    def spec(self, source: int, dest: int) -> LinkSpec | None:
        if source == dest:
            return None
        host_s, host_d = (self.hosts[r] if r < len(self.hosts) else None for r in (source, dest))
        named = [link.spec for link in self.pairs if host_s is not None and link.joins(host_s, host_d)]
        return named[-1] if named else self.default

    def outgoing(self, rank: int, size: int) -> dict[int, LinkState]:
        """The shaped links from `rank` to the other ranks of a job of `size` ranks, fresh."""
        specs = {dest: self.spec(rank, dest) for dest in range(size)}
        return {dest: LinkState(spec, self.seed + 1000 * rank + dest) for dest, spec in specs.items() if spec}

    def __bool__(self) -> bool:
        return self.default is not None or bool(self.pairs)

    def to_json(self) -> dict:
        return {"default": None if self.default is None else asdict(self.default),
                "pairs": [[link.a, link.b, asdict(link.spec)] for link in self.pairs],
                "hosts": list(self.hosts), "seed": self.seed}

    @staticmethod
    def from_json(data: dict) -> "LinkMap":
        default = None if data.get("default") is None else LinkSpec(**data["default"])
        pairs = tuple(HostLink(a, b, LinkSpec(**spec)) for a, b, spec in data.get("pairs", ()))
        return LinkMap(default, pairs, tuple(data.get("hosts", ())), int(data.get("seed", 0)))
