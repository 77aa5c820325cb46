"""Measured compute costs of a model on hosts: what `hosts calibrate` writes and `plan` reads.

One `HostTiming` per host says how long that host takes, with the llama.cpp build and thread count it
will run, for one transformer layer of the model, for the output layer (final norm + vocabulary
projection, which only the last stage pays) and for a run itself (what llama.cpp pays per decode call
whatever the layers: the graph, the batch, the threads), as functions of the number of tokens in a run.
A stage of `k` layers on that host then costs about `run_s(n) + k * layer_s(n) + (output_s(n) if last)`
per run of `n` tokens. Stored as JSON (`schema` 1) so a calibration made once is reused by later plans.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeinfer_cpu.errors import UserError
from pipeinfer_cpu.files import atomic_write_text

SCHEMA = 1


def interpolate(table: tuple[tuple[int, float], ...], n_tokens: int) -> float:
    """Piecewise-linear in the token count; beyond the last point, linear from the last two."""
    points = sorted(table)
    if n_tokens <= points[0][0]:
        return points[0][1] * n_tokens / points[0][0] if n_tokens < points[0][0] else points[0][1]
    for (n0, s0), (n1, s1) in zip(points, points[1:]):
        if n_tokens <= n1:
            return s0 + (s1 - s0) * (n_tokens - n0) / (n1 - n0)
    if len(points) == 1:
        return points[0][1] * n_tokens / points[0][0]
    (n0, s0), (n1, s1) = points[-2], points[-1]
    return s1 + (s1 - s0) * (n_tokens - n1) / (n1 - n0)


@dataclass(frozen=True)
class HostTiming:
    """Seconds per run on one host, by tokens per run: `layer` for one layer, `output` for the output layer."""

    host: str
    threads: int
    layer: tuple[tuple[int, float], ...]  # ((n_tokens, seconds), ...)
    output: tuple[tuple[int, float], ...]
    run: tuple[tuple[int, float], ...] = ()  # a run's own cost (empty: not measured, taken as 0)

    def layer_s(self, n_tokens: int) -> float:
        return interpolate(self.layer, n_tokens)

    def output_s(self, n_tokens: int) -> float:
        return interpolate(self.output, n_tokens)

    def run_s(self, n_tokens: int) -> float:
        return interpolate(self.run, n_tokens) if self.run else 0.0


@dataclass(frozen=True)
class Calibration:
    """The timings of every host of a hostfile for one model."""

    model: str
    n_layers: int
    hosts: tuple[HostTiming, ...]

    def for_host(self, name: str) -> HostTiming:
        for timing in self.hosts:
            if timing.host == name:
                return timing
        raise UserError(f"the calibration of {self.model} has no timing for host {name!r}")

    def save(self, path: Path) -> None:
        body = {"schema": SCHEMA, **asdict(self)}
        atomic_write_text(Path(path), json.dumps(body, indent=1) + "\n")


def load_calibration(path: Path) -> Calibration:
    """Read a calibration file; one clear error for a missing, foreign or damaged file."""
    try:
        body = json.loads(Path(path).read_text())
        if body.get("schema") != SCHEMA:
            raise ValueError(f"schema {body.get('schema')!r}, expected {SCHEMA}")
        hosts = tuple(HostTiming(h["host"], int(h["threads"]),
                                 tuple((int(n), float(s)) for n, s in h["layer"]),
                                 tuple((int(n), float(s)) for n, s in h["output"]),
                                 tuple((int(n), float(s)) for n, s in h.get("run", ())))
                      for h in body["hosts"])
        return Calibration(str(body["model"]), int(body["n_layers"]), hosts)
    except OSError as exc:
        raise UserError(f"cannot read calibration {path}: {exc.strerror or exc}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is not a pipeinfer-cpu calibration: {exc}") from None
