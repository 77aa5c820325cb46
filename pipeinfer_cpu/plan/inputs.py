"""What the performance model knows of a cluster: plain numbers, from a calibration or given directly.

A stage of `k` layers costs `k * layer_s(n) + output_s(n_out)` (the output layer only on the last
stage) per run of `n` tokens, `n_out` of them wanting a result: tables of (tokens, seconds),
interpolated as pipeinfer_cpu/timings.py does. A hop is a `LinkSpec` (pipeinfer_cpu/wire/links.py,
what `--link` emulates): serialisation at its rate, one message at a time (a FIFO), then its
one-way delay (its jitter is ignored here). The head pays `head_send_s` per message it sends (a
run, a draft request) and `head_receive_s` per message it takes in (a result, a draft reply); the
draft costs `draft_call_s + draft_token_s * n` per request for `n` tokens; each draft token agrees
with the target's with probability `acceptance`, independently.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from pipeinfer_cpu.errors import UserError
from pipeinfer_cpu.llama.settings import WIRE_DTYPES
from pipeinfer_cpu.modelfiles.planning import split_layers
from pipeinfer_cpu.timings import Calibration, interpolate
from pipeinfer_cpu.wire.links import LinkSpec

Table = tuple[tuple[int, float], ...]  # ((tokens per run, seconds), ...)


LOCAL = LinkSpec(None, 0.0)  # two ranks on one host: free for the model


@dataclass(frozen=True)
class StageCost:
    """A stage's compute: a run's own cost, `layers` layers of `layer` seconds each, and the output layer if last."""

    layers: int
    layer: Table
    output: Table
    run: Table = ()  # empty: not measured

    def __post_init__(self) -> None:
        if self.layers < 1:
            raise UserError(f"a stage needs at least one layer, got {self.layers}")
        for name, table in (("layer", self.layer), ("output", self.output)):
            if not table or any(n < 1 or not (math.isfinite(s) and s >= 0) for n, s in table):
                raise UserError(f"a stage's {name} timings need (tokens >= 1, seconds >= 0) points, got {table}")

    def compute_s(self, n_tokens: int, n_outputs: int, last: bool) -> float:
        if n_tokens == 0:
            return 0.0
        own = self.layers * interpolate(self.layer, n_tokens) + (interpolate(self.run, n_tokens) if self.run else 0.0)
        return own + (interpolate(self.output, n_outputs) if last and n_outputs else 0.0)


@dataclass(frozen=True)
class ModelInputs:
    """Everything `predict` needs, in seconds, bytes and bits per second."""

    stages: tuple[StageCost, ...]
    hops: tuple[LinkSpec, ...]  # head -> stage 0, stage 0 -> stage 1, ..., last stage -> head
    n_embd: int
    n_vocab: int
    acceptance: float = 0.6
    draft_token_s: float = 0.0
    draft_call_s: float = 0.0
    draft_link: LinkSpec = LOCAL  # head <-> draft rank, each way
    head_send_s: float = 5e-5
    head_receive_s: float = 5e-5
    wire_dtype: str = "f32"  # hidden states between stages: f32 4 bytes a value, f16 2, q8 1.125
    logits: bool = False  # results carry logits rows (sampling) instead of argmax ids (greedy)

    def __post_init__(self) -> None:
        if not self.stages:
            raise UserError("the model needs at least one stage")
        if len(self.hops) != len(self.stages) + 1:
            raise UserError(f"{len(self.stages)} stages need {len(self.stages) + 1} hops, got {len(self.hops)}")
        if not 0 <= self.acceptance <= 1:
            raise UserError(f"the acceptance must be in [0, 1], got {self.acceptance}")
        if self.n_embd < 1 or self.n_vocab < 1:
            raise UserError(f"n_embd and n_vocab must be at least 1, got {self.n_embd} and {self.n_vocab}")
        if self.wire_dtype not in WIRE_DTYPES:
            raise UserError(f"unknown wire dtype {self.wire_dtype!r} (choose from {', '.join(WIRE_DTYPES)})")
        for name in ("draft_token_s", "draft_call_s", "head_send_s", "head_receive_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise UserError(f"{name} must be a finite time >= 0, got {value}")

    @property
    def n_layers(self) -> int:
        return sum(stage.layers for stage in self.stages)

    @staticmethod
    def uniform(n_layers: int, n_stages: int, layer_s: float, output_s: float, link: LinkSpec, n_embd: int,
                n_vocab: int, extra_token_cost: float = 0.25, head_local: bool = True,
                weights: Sequence[float] | None = None, **rest) -> "ModelInputs":
        """Every stage on alike hosts: one layer costs `layer_s` for one token and `1 + extra_token_cost`
        times that for two (linear beyond: 1 is compute-bound, near 0 memory-bound); layers split by
        `weights` (equal by default). With `head_local` the head shares stage 0's host (a free first hop)."""
        if not (layer_s >= 0 and output_s >= 0 and extra_token_cost >= 0):
            raise UserError("layer and output times and the extra token cost must be >= 0")
        ranges = split_layers(n_layers, weights or (1.0,) * n_stages)
        layer = _two_points(layer_s, extra_token_cost)
        output = _two_points(output_s, extra_token_cost)
        stages = tuple(StageCost(r.size, layer, output) for r in ranges)
        return ModelInputs(stages, _hops(n_stages, link, head_local), n_embd, n_vocab, **rest)

    @staticmethod
    def from_calibration(calibration: Calibration, n_stages: int, link: LinkSpec, n_embd: int, n_vocab: int,
                         hosts: Sequence[str] | None = None, split: str = "equal", head_local: bool = True,
                         **rest) -> "ModelInputs":
        """Stage k runs on `hosts[k]` (default: the calibration's k-th hostfile line, round robin: a host
        named on several lines has one timing per line); layers split equally, or by speed (`split="speed"`:
        weights 1 / one-token layer time)."""
        if hosts and len(hosts) != n_stages:
            raise UserError(f"{len(hosts)} hosts for {n_stages} stages")
        timings = ([calibration.for_host(name) for name in hosts] if hosts
                   else [calibration.hosts[k % len(calibration.hosts)] for k in range(n_stages)])
        if split not in ("equal", "speed"):
            raise UserError(f"unknown split {split!r} (equal or speed)")
        weights = ([1.0 / max(t.layer_s(1), 1e-12) for t in timings] if split == "speed" else [1.0] * n_stages)
        ranges = split_layers(calibration.n_layers, weights)
        stages = tuple(StageCost(r.size, t.layer, t.output, t.run) for r, t in zip(ranges, timings))
        return ModelInputs(stages, _hops(n_stages, link, head_local), n_embd, n_vocab, **rest)


def _two_points(one_token_s: float, extra: float) -> Table:
    return ((1, one_token_s), (2, one_token_s * (1 + extra)))


def _hops(n_stages: int, link: LinkSpec, head_local: bool) -> tuple[LinkSpec, ...]:
    return ((LOCAL if head_local else link),) + (link,) * n_stages


# -- units --------------------------------------------------------------------------------------

_NUMBER = r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)"
_BYTES = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30}


def parse_link(text: str) -> LinkSpec:
    """A link as `--link` writes it (`bw=1gbit,delay=0.1ms`), a bare rate (`1gbit`: no delay), or `local` (free)."""
    text = text.strip()
    if text.lower() == "local":
        return LOCAL
    return LinkSpec.parse(text if "=" in text else f"bw={text}")


def parse_bytes_per_s(text: str) -> float:
    """Bytes per second from '40GB/s', '40gb' (the /s is optional)."""
    match = re.fullmatch(_NUMBER + r"\s*([a-z]+)(?:/s)?", text.strip().lower())
    if not match or match.group(2) not in _BYTES or float(match.group(1)) <= 0:
        raise UserError(f"bad memory bandwidth {text!r} (e.g. 40GB/s)")
    return float(match.group(1)) * _BYTES[match.group(2)]


def parse_bytes(text: str) -> float:
    """Bytes from '64GB', '512MiB'."""
    match = re.fullmatch(_NUMBER + r"\s*([a-z]+)", text.strip().lower())
    if not match or match.group(2) not in _BYTES or float(match.group(1)) <= 0:
        raise UserError(f"bad size {text!r} (e.g. 64GB)")
    return float(match.group(1)) * _BYTES[match.group(2)]


def link_text(link: LinkSpec) -> str:
    if link.rate_bps is None:
        return "local" if link.delay_s == 0 else f"unlimited, {link.delay_s * 1e3:g} ms"
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if link.rate_bps >= scale:
            return f"{link.rate_bps / scale:g} {unit}" + (f", {link.delay_s * 1e3:g} ms" if link.delay_s else "")
    return str(link)
