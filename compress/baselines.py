"""Baselines searched in the same harness and budget of evaluations as the agent."""

from __future__ import annotations

import numpy as np

from compress.graph import NetGraph


class UniformProposer:
    """Same keep ratio for every group (magnitude criterion inside each group); the budget fit
    turns the all-equal proposal into the single uniform ratio that meets the budget."""

    def __init__(self, graph: NetGraph) -> None:
        self.roots = graph.roots

    def propose(self) -> dict[str, float]:
        return {r: 1.0 for r in self.roots}

    def feedback(self, reward: float) -> None:
        """Deterministic: nothing to learn."""


class FixedProposer:
    """A policy decided before the search, such as DepGraph's global group-norm ranking
    (`prune.importance_keep`); the harness fits it to the budget like any other proposal."""

    def __init__(self, keep: dict[str, float]) -> None:
        self.keep = dict(keep)

    def propose(self) -> dict[str, float]:
        return dict(self.keep)

    def feedback(self, reward: float) -> None:
        """Deterministic: nothing to learn."""


class RandomProposer:
    """Independent uniform keep ratios in [min_keep, 1] per group, seeded."""

    def __init__(self, graph: NetGraph, min_keep: float = 0.05, seed: int = 0) -> None:
        self.roots, self.min_keep = graph.roots, min_keep
        self.rng = np.random.default_rng(seed)

    def propose(self) -> dict[str, float]:
        values = self.rng.uniform(self.min_keep, 1.0, size=len(self.roots))
        return {r: float(v) for r, v in zip(self.roots, values)}

    def feedback(self, reward: float) -> None:
        """Random search keeps no state beyond the harness's best-so-far."""
