"""Shard planning: which contiguous layer range each pipeline stage runs (pure functions)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from pipeinfer_cpu.errors import UserError


@dataclass(frozen=True)
class LayerRange:
    """A half-open range of transformer blocks [start, end) of a model with `n_layer` blocks."""

    start: int
    end: int
    n_layer: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end <= self.n_layer:
            raise ValueError(f"bad layer range [{self.start}, {self.end}) of {self.n_layer}")

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.n_layer

    @property
    def size(self) -> int:
        return self.end - self.start

    def __str__(self) -> str:
        return f"[{self.start}, {self.end})"


def split_layers(n_layer: int, weights: Sequence[float]) -> tuple[LayerRange, ...]:
    """Split n_layer blocks into len(weights) contiguous ranges with sizes proportional to weights.

    Largest-remainder rounding, every stage at least one block; ties go to the earlier stage.
    """
    n_stages = len(weights)
    if n_stages < 1:
        raise UserError("need at least one stage")
    if any(not math.isfinite(w) or w <= 0 for w in weights):
        raise UserError(f"stage weights must be positive numbers, got {list(weights)}")
    if n_stages > n_layer:
        raise UserError(f"cannot split {n_layer} layers into {n_stages} stages (more stages than layers)")
    sizes = _proportional_sizes(n_layer, weights)
    starts = [sum(sizes[:i]) for i in range(n_stages)]
    return tuple(LayerRange(s, s + size, n_layer) for s, size in zip(starts, sizes))


def _proportional_sizes(total: int, weights: Sequence[float]) -> list[int]:
    # One block each first, then share out the rest by weight, so no stage is ever empty.
    spare = total - len(weights)
    top = max(weights)
    shares = [w / top for w in weights]  # relative to the largest: two weights of 1e308 do not sum to inf
    quotas = [spare * share / sum(shares) for share in shares]
    sizes = [1 + math.floor(q) for q in quotas]
    leftover = total - sum(sizes)
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - math.floor(quotas[i])), i))
    for i in by_remainder[:leftover]:
        sizes[i] += 1
    return sizes


def parse_weights(text: str | None, n_stages: int) -> tuple[float, ...]:
    """Parse `--weights w1,w2,...`; equal weights when text is None."""
    if text is None:
        return (1.0,) * n_stages
    try:
        weights = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"--weights must be comma-separated numbers, got {text!r}") from None
    if len(weights) != n_stages:
        raise UserError(f"--weights has {len(weights)} values for {n_stages} stages")
    return weights
