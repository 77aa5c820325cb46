"""Statistics of one generation, their JSON form, and benchmark tables.

Pure but for `peak_rss_bytes`: no clocks are read here; the runtime records times and hands them in.
Undefined derived values (an inter-token latency with fewer than two tokens,
an acceptance rate with nothing drafted) are ``None``, and ``null`` in JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
import resource
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from pipeinfer_cpu.files import atomic_write_text

STATS_SCHEMA = 1  # the version of the statistics JSON layout


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (the kernel's high-water mark, or psutil's reading)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return max(peak, psutil.Process().memory_info().rss)


@dataclass(frozen=True)
class StageStats:
    """What one rank did during a request; ``layers`` is the half-open range [start, end)."""

    rank: int
    host: str
    layers: tuple[int, int]
    compute_s: float
    wall_s: float
    peak_rss_bytes: int
    runs_computed: int = 0
    runs_cancelled_before: int = 0
    runs_cancelled_during: int = 0
    compute_saved_s: float = 0.0
    prefill_tokens: int = 0
    idle_cpu_s: float = 0.0  # CPU time this rank's process used while waiting for work
    idle_wall_s: float = 0.0  # wall time it spent waiting

    @property
    def idle_cpu_fraction(self) -> float | None:
        """Cores' worth of CPU burnt while idle (0 = asleep, 1 = one core spinning)."""
        return self.idle_cpu_s / self.idle_wall_s if self.idle_wall_s > 0 else None

    @property
    def idle_fraction(self) -> float:
        """Share of the wall time not spent computing, in [0, 1]; 0 if no wall time."""
        if self.wall_s <= 0:
            return 0.0
        return min(1.0, max(0.0, 1.0 - self.compute_s / self.wall_s))

    def to_json_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["layers"] = list(self.layers)
        out["idle_fraction"] = self.idle_fraction
        out["idle_cpu_fraction"] = self.idle_cpu_fraction
        return _jsonable(out)

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> StageStats:
        """Inverse of :meth:`to_json_dict` (derived keys are ignored)."""
        raw = _raw_fields(cls, data)
        raw["layers"] = (int(raw["layers"][0]), int(raw["layers"][1]))
        return cls(**raw)


def _raw_fields(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``data`` that are constructor fields of dataclass ``cls``."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {key: value for key, value in data.items() if key in names}


def _percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q, method="linear")) if values else None


@dataclass(frozen=True)
class RunStats:
    """One request's generation, as measured by the head.

    ``token_times_s[i]`` is when generated token i was emitted, in seconds
    since the request started (so ``token_times_s[0]`` is normally the TTFT).
    """

    mode: str
    n_prompt: int
    n_generated: int
    prefill_s: float
    ttft_s: float
    token_times_s: tuple[float, ...]
    bytes_sent: int
    stages: tuple[StageStats, ...]
    head_peak_rss_bytes: int
    drafted: int = 0
    accepted: int = 0
    runs_launched: int = 0
    runs_cancelled: int = 0
    branches: int = 0  # draft-tree branch tokens launched (counted in drafted too)
    branches_adopted: int = 0  # of those, chosen by the target where the main path was wrong
    decode_bytes_sent: int | None = None  # bytes every rank sent after the first token (None: not counted)

    def __post_init__(self) -> None:
        if len(self.token_times_s) != self.n_generated:
            raise ValueError(
                f"n_generated is {self.n_generated} but {len(self.token_times_s)} token times were given"
            )
        if any(b < a for a, b in zip(self.token_times_s, self.token_times_s[1:])):
            raise ValueError("token_times_s must be non-decreasing")
        if not 0 <= self.accepted <= self.drafted:
            raise ValueError(f"need 0 <= accepted <= drafted, got {self.accepted} / {self.drafted}")

    @property
    def itl_s(self) -> tuple[float, ...]:
        """Inter-token latencies: differences between consecutive token times."""
        times = self.token_times_s
        return tuple(b - a for a, b in zip(times, times[1:]))

    @property
    def itl_mean_s(self) -> float | None:
        itl = self.itl_s
        return sum(itl) / len(itl) if itl else None

    @property
    def itl_p50_s(self) -> float | None:
        return _percentile(self.itl_s, 50)

    @property
    def itl_p95_s(self) -> float | None:
        return _percentile(self.itl_s, 95)

    @property
    def decode_tokens_per_s(self) -> float | None:
        """(n_generated - 1) / (last - first token time); None below 2 tokens or with no elapsed time."""
        if self.n_generated < 2:
            return None
        span = self.token_times_s[-1] - self.token_times_s[0]
        return (self.n_generated - 1) / span if span > 0 else None

    @property
    def acceptance_rate(self) -> float | None:
        """accepted / drafted, None when nothing was drafted."""
        return self.accepted / self.drafted if self.drafted else None

    @property
    def bytes_per_token(self) -> float | None:
        return self.bytes_sent / self.n_generated if self.n_generated else None

    @property
    def decode_bytes_per_token(self) -> float | None:
        """Decode traffic per decoded token: bytes every rank sent after the first token (prompt and
        prefill traffic excluded) / (n_generated - 1), the tokens decoding produced; None below 2 tokens."""
        if self.decode_bytes_sent is None or self.n_generated < 2:
            return None
        return self.decode_bytes_sent / (self.n_generated - 1)

    def to_json_dict(self) -> dict[str, Any]:
        """Raw fields plus derived ones, JSON-serialisable; stages as a list of dicts; `schema` names
        the layout (README, "Statistics JSON"): keys are never renamed or dropped without a new number."""
        out = {"schema": STATS_SCHEMA, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}
        out["token_times_s"] = list(self.token_times_s)
        out["stages"] = [stage.to_json_dict() for stage in self.stages]
        for name in _DERIVED:
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        return _jsonable(out)

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> RunStats:
        """Inverse of :meth:`to_json_dict` (derived keys are ignored)."""
        raw = _raw_fields(cls, data)
        raw["token_times_s"] = tuple(float(t) for t in raw["token_times_s"])
        raw["stages"] = tuple(StageStats.from_json_dict(s) for s in raw["stages"])
        return cls(**raw)

    def summary_line(self) -> str:
        """One human-readable line, e.g. for the end of ``pipeinfer-cpu run``."""
        parts = [
            f"{self.mode}: {self.n_generated} tokens",
            f"prefill {_ms(self.prefill_s)} ms",
            f"TTFT {_ms(self.ttft_s)} ms",
            _itl_text(self),
            _or_na(self.decode_tokens_per_s, 1.0, "tok/s"),
            _or_na(self.bytes_per_token, 1e-3, "KB/token"),
        ]
        if self.decode_bytes_per_token is not None:
            parts.append(f"decode {self.decode_bytes_per_token * 1e-3:.1f} KB/token")
        if self.drafted:
            parts.append(f"accept {self.acceptance_rate:.0%} ({self.accepted}/{self.drafted})")
        if self.runs_launched:
            parts.append(f"runs {self.runs_launched} (cancelled {self.runs_cancelled})")
        if self.branches:
            parts.append(f"branches {self.branches} (adopted {self.branches_adopted})")
        return ", ".join(parts)


_DERIVED = (
    "itl_s",
    "itl_mean_s",
    "itl_p50_s",
    "itl_p95_s",
    "decode_tokens_per_s",
    "acceptance_rate",
    "bytes_per_token",
    "decode_bytes_per_token",
)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def _itl_text(stats: RunStats) -> str:
    if stats.itl_mean_s is None or stats.itl_p50_s is None or stats.itl_p95_s is None:
        return "ITL n/a"
    return (
        f"ITL mean {stats.itl_mean_s * 1e3:.2f} ms "
        f"p50 {stats.itl_p50_s * 1e3:.2f} p95 {stats.itl_p95_s * 1e3:.2f}"
    )


def _or_na(value: float | None, scale: float, unit: str) -> str:
    """``value * scale`` with one decimal and its unit, or "<unit> n/a" (KB are 1000 bytes)."""
    return f"{unit} n/a" if value is None else f"{value * scale:.1f} {unit}"


def _jsonable(obj: Any) -> Any:
    """Stats objects and numpy values (alone, in sequences or in mappings) to plain JSON data."""
    if isinstance(obj, (RunStats, StageStats)):
        return obj.to_json_dict()
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    if isinstance(obj, Mapping):
        return {str(key): _jsonable(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(item) for item in obj]
    return obj


def write_json(stats: RunStats | Sequence[Any] | Mapping[str, Any], path: Path) -> None:
    """Write ``stats`` as JSON atomically: a temp file in the same folder, then ``os.replace``.

    The text is built before any file is opened, so an unserialisable value (or
    NaN, which strict JSON has no spelling for) leaves ``path`` untouched.
    """
    text = json.dumps(_jsonable(stats), indent=2, allow_nan=False) + "\n"
    atomic_write_text(Path(path), text)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _format_cell(value: object) -> str:
    """Numbers to a sensible precision, None to empty, '|' escaped."""
    if value is None:
        return ""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    if _is_number(value):
        return _format_float(float(value))  # type: ignore[arg-type]
    return str(value).replace("|", "\\|")


def _format_float(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    magnitude = abs(x)
    if magnitude >= 1000:
        return f"{x:.0f}"
    if magnitude >= 100:
        return f"{x:.1f}"
    if magnitude >= 1 or x == 0:
        return f"{x:.2f}"
    return f"{x:.3g}"


def markdown_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> str:
    """A GitHub-markdown table of ``rows`` restricted to ``columns``.

    A column whose present values are all numbers is right-aligned; missing
    keys and None print as empty cells.  Cells are padded so the raw text lines
    up too.
    """
    if not columns:
        raise ValueError("markdown_table needs at least one column")
    numeric = [
        all(_is_number(row[c]) for row in rows if row.get(c) is not None)
        and any(row.get(c) is not None for row in rows)
        for c in columns
    ]
    body = [[_format_cell(row.get(c)) for c in columns] for row in rows]
    header = [str(c).replace("|", "\\|") for c in columns]
    widths = [max(3, len(header[j]), *(len(r[j]) for r in body)) for j in range(len(columns))]

    def line(cells: Sequence[str]) -> str:
        padded = (cell.rjust(w) if num else cell.ljust(w) for cell, w, num in zip(cells, widths, numeric))
        return "| " + " | ".join(padded) + " |"

    rule = ["-" * (w - 1) + ":" if num else "-" * w for w, num in zip(widths, numeric)]
    return "\n".join([line(header), "| " + " | ".join(rule) + " |", *(line(r) for r in body)]) + "\n"
