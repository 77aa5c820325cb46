"""Pure decisions: fitting keep ratios to a FLOPs budget, and the search reward."""

from __future__ import annotations

from typing import Callable, Mapping

from compress.errors import BudgetError

# Channel counts are rounded to multiples of this, so pruned layers keep the channel blocks CPU
# convolution kernels work in (onnxruntime uses blocks of 16 with AVX-512: see docs/compress.md).
DEFAULT_CHANNEL_MULTIPLE = 8

MacsFn = Callable[[Mapping[str, float]], float]
LatencyFn = Callable[[Mapping[str, float]], float]  # keep ratios -> predicted ms (compress.latency)


def _scaled(ratios: Mapping[str, float], scale: float, min_keep: float) -> dict[str, float]:
    return {k: min(1.0, max(min_keep, r * scale)) for k, r in ratios.items()}


def fit_budget(ratios: Mapping[str, float], macs_fn: MacsFn, base_macs: float, target: float,
               min_keep: float = 0.05, iters: int = 60,
               steps: Mapping[str, float] | None = None) -> dict[str, float]:
    """Rescale proposed keep ratios by one common factor so the pruned MACs meet the budget.

    `target` is the fraction of the unpruned MACs to keep. The factor is found by bisection on
    `macs_fn` (monotone in the factor), taking the largest factor whose MACs do not exceed the
    budget, so the relative preferences of the proposal survive and the budget is met from below
    up to channel rounding. Raises BudgetError when even `min_keep` everywhere is too large.
    """
    if not 0.0 < target <= 1.0:
        raise BudgetError(f"FLOPs budget must be in (0, 1], got {target}")
    if not ratios:
        raise BudgetError("no pruning groups to fit to the budget")
    budget = target * base_macs
    floor = macs_fn(_scaled(ratios, 0.0, min_keep))
    if floor > budget * (1 + 1e-9):
        raise BudgetError(f"FLOPs budget {target:.3g} is unreachable: keeping {min_keep:.3g} of "
                          f"every group still leaves {floor / base_macs:.3g} of the MACs")
    lo, hi = 0.0, 1.0 / max(min(ratios.values()), 1e-6)
    if macs_fn(_scaled(ratios, hi, min_keep)) <= budget:
        return _scaled(ratios, hi, min_keep)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if macs_fn(_scaled(ratios, mid, min_keep)) <= budget:
            lo = mid
        else:
            hi = mid
    keep = _scaled(ratios, lo, min_keep)
    return top_up(keep, ratios, macs_fn, budget, steps) if steps else keep


def top_up(keep: Mapping[str, float], ratios: Mapping[str, float], macs_fn: MacsFn, budget: float,
           steps: Mapping[str, float]) -> dict[str, float]:
    """Grow groups by one step at a time, most preferred (highest proposed ratio) first, while
    the MACs stay within the budget; repeat until no group can grow."""
    keep = dict(keep)
    order = sorted(keep, key=lambda k: -ratios[k])
    grown = True
    while grown:
        grown = False
        for key in order:
            if keep[key] >= 1.0:
                continue
            trial = {**keep, key: min(1.0, keep[key] + steps[key])}
            if macs_fn(trial) <= budget:
                keep, grown = trial, True
    return keep


def with_latency_bound(macs_fn: MacsFn, base_macs: float, target: float, latency_fn: LatencyFn,
                       max_latency: float) -> MacsFn:
    """A cost in MACs that exceeds the FLOPs budget whenever either the MACs or the predicted
    latency exceed theirs, so `fit_budget` meets both with one bisection (both grow with every
    keep ratio: latency tables are made non-decreasing in channels when measured)."""
    budget = target * base_macs
    return lambda keep: max(macs_fn(keep), budget * latency_fn(keep) / max_latency)


def reward(accuracy: float, macs_ratio: float, target: float, tolerance: float = 0.01) -> float:
    """Held-out accuracy (after BN recalibration) when the budget is met, else a penalty that
    grows with the overshoot; budgets are fitted before evaluation, so the penalty is a guard."""
    overshoot = macs_ratio - target * (1 + tolerance)
    return accuracy if overshoot <= 0 else accuracy - 10.0 * overshoot
