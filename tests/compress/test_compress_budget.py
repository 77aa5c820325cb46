"""The FLOPs budget is met (checked with torch-pruning's counter) and the decisions are pure."""

from __future__ import annotations

import numpy as np
import pytest

from compress.budget import fit_budget, reward, top_up
from compress.errors import BudgetError
from compress.models import build_model
from compress.prune import apply_policy, build_space, count_macs


@pytest.mark.parametrize("arch,multiple", [("resnet20", 1), ("resnet56", 8), ("mobilenet_v2", 8), ("vgg16", 1)])
@pytest.mark.parametrize("target", [0.2, 0.5, 0.7])
def test_budget_met_within_one_percent(arch, multiple, target):
    model = build_model(arch).eval()
    space = build_space(model, channel_multiple=multiple)
    rng = np.random.default_rng(int(target * 100))
    proposal = {g.root: float(v) for g, v in zip(space.groups, rng.uniform(0.1, 1.0, len(space.groups)))}
    keep = fit_budget(proposal, space.predict_macs, space.base_macs, target, steps=space.steps())
    macs, _ = count_macs(apply_policy(model, space, keep))
    ratio = macs / space.base_macs
    assert ratio <= target * (1 + 1e-6)
    assert ratio >= target * 0.99, f"{arch}@{target}: only {ratio:.4f} of the MACs used"


def test_fit_keeps_relative_preferences():
    macs = lambda keep: sum(keep.values())  # a linear toy cost: one unit per kept fraction
    keep = fit_budget({"a": 1.0, "b": 0.5, "c": 0.25}, macs, 3.0, 0.35, min_keep=0.0)
    assert keep["a"] > keep["b"] > keep["c"]
    assert keep["a"] / keep["b"] == pytest.approx(2.0, rel=1e-6)
    assert macs(keep) == pytest.approx(1.05, rel=1e-6)


def test_unreachable_budget_raises():
    model = build_model("resnet20").eval()
    space = build_space(model, channel_multiple=8)  # at least 8 channels a group: >1% of MACs
    with pytest.raises(BudgetError, match="unreachable"):
        fit_budget({g.root: 1.0 for g in space.groups}, space.predict_macs, space.base_macs, 0.01)
    with pytest.raises(BudgetError):
        fit_budget({"a": 1.0}, lambda k: 1.0, 1.0, 0.0)


def test_top_up_spends_leftover_in_steps():
    macs = lambda keep: sum(keep.values())
    keep = top_up({"a": 0.5, "b": 0.5}, {"a": 0.9, "b": 0.1}, macs, 1.26, {"a": 0.25, "b": 0.25})
    assert keep == {"a": 0.75, "b": 0.5}  # the preferred group grows first; no step overshoots


def test_reward_is_accuracy_within_budget_and_penalised_beyond():
    assert reward(80.0, 0.5, 0.5) == 80.0
    assert reward(80.0, 0.504, 0.5) == 80.0  # inside the 1% tolerance
    assert reward(80.0, 0.6, 0.5) < reward(80.0, 0.55, 0.5) < 80.0
