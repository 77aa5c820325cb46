"""Lossless verification of drafted tokens against the target model.

Three pure policies:

* :func:`verify_greedy`: a chain of drafted tokens against the target's argmax.
* :func:`verify_sampled`: speculative rejection sampling (Leviathan et al. 2023,
  Chen et al. 2023); the emitted tokens are distributed exactly as if sampled
  from the target alone.
* :func:`verify_tree_greedy`: a PipeInfer draft token tree against the
  target's argmax at each node.

Greedy policies give exactly the target's own greedy output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pipeinfer_cpu.sampling import inverse_cdf

ROOT = -1
"""Parent id of the tree nodes that directly follow the committed prefix."""


@dataclass(frozen=True)
class Verdict:
    """Outcome of verifying one speculation."""

    accepted: tuple[int, ...]
    """Accepted draft tokens, in order."""
    next_token: int
    """The target's own token after them (correction on rejection, bonus otherwise)."""

    @property
    def n_accepted(self) -> int:
        return len(self.accepted)

    @property
    def tokens(self) -> tuple[int, ...]:
        """Everything this verification commits: ``accepted + (next_token,)``."""
        return self.accepted + (self.next_token,)


@dataclass(frozen=True)
class TreeVerdict(Verdict):
    """A :class:`Verdict` that also names the accepted tree nodes (for KV commits)."""

    accepted_nodes: tuple[int, ...] = ()
    """Node ids of the accepted path, root side first; same length as ``accepted``."""


def verify_greedy(draft_tokens: Sequence[int], target_argmax: Sequence[int]) -> Verdict:
    """Accept the longest prefix of the draft that the target's argmax agrees with.

    ``target_argmax[i]`` is the target's argmax after the committed prefix plus
    ``draft_tokens[:i]``; it has ``len(draft_tokens) + 1`` entries, the last
    one being the bonus token when every draft token is accepted.
    """
    if len(target_argmax) != len(draft_tokens) + 1:
        raise ValueError(
            f"target_argmax needs len(draft_tokens) + 1 = {len(draft_tokens) + 1} entries, "
            f"got {len(target_argmax)}"
        )
    n = 0
    while n < len(draft_tokens) and int(draft_tokens[n]) == int(target_argmax[n]):
        n += 1
    return Verdict(tuple(int(t) for t in draft_tokens[:n]), int(target_argmax[n]))


def _check_sampled_shapes(k: int, draft_probs: np.ndarray, target_probs: np.ndarray) -> None:
    if draft_probs.ndim != 2 or draft_probs.shape[0] != k:
        raise ValueError(f"draft_probs must have shape [{k}, V], got {draft_probs.shape}")
    if target_probs.ndim != 2 or target_probs.shape[0] != k + 1:
        raise ValueError(f"target_probs must have shape [{k + 1}, V], got {target_probs.shape}")
    if k and draft_probs.shape[1] != target_probs.shape[1]:
        raise ValueError(
            f"draft and target vocabularies differ: {draft_probs.shape[1]} vs {target_probs.shape[1]}"
        )


def _residual(p_target: np.ndarray, p_draft: np.ndarray) -> np.ndarray:
    """normalize(max(p_t - p_d, 0)); p_t itself when that is all zeros (p_t == p_d)."""
    residual = np.maximum(p_target - p_draft, 0.0)
    return residual if residual.sum() > 0.0 else p_target


def verify_sampled(
    draft_tokens: Sequence[int],
    draft_probs: np.ndarray,
    target_probs: np.ndarray,
    rng: np.random.Generator,
) -> Verdict:
    """Speculative rejection sampling: the output is distributed as the target's.

    ``draft_probs[i]`` is the distribution ``draft_tokens[i]`` was sampled from
    (use :func:`pipeinfer_cpu.sampling.probabilities` on the draft's logits);
    ``target_probs[i]`` is the target's sampling distribution after the
    committed prefix plus ``draft_tokens[:i]`` (k + 1 rows).  Token i is
    accepted with probability min(1, p_t(x) / p_d(x)); at the first rejection
    the next token comes from normalize(max(p_t - p_d, 0)); if all are
    accepted the bonus comes from ``target_probs[k]``.

    Randomness: exactly one call ``rng.random(k + 1)`` per verification,
    whatever the outcome: ``u[i]`` decides draft position i and ``u[k]``
    samples the final token by inverse CDF in token-id order.  The generator
    therefore advances by k + 1 uniforms, so runs are reproducible from a seed.
    """
    k = len(draft_tokens)
    draft_probs = np.asarray(draft_probs, dtype=np.float64)
    target_probs = np.asarray(target_probs, dtype=np.float64)
    _check_sampled_shapes(k, draft_probs, target_probs)
    u = rng.random(k + 1)
    accepted: list[int] = []
    for i, token in enumerate(int(t) for t in draft_tokens):
        p_draft = draft_probs[i, token]
        if not p_draft > 0.0:
            raise ValueError(f"draft token {token} at position {i} has draft probability 0")
        if u[i] * p_draft >= target_probs[i, token]:
            final = _residual(target_probs[i], draft_probs[i])
            return Verdict(tuple(accepted), inverse_cdf(final, float(u[k])))
        accepted.append(token)
    return Verdict(tuple(accepted), inverse_cdf(target_probs[k], float(u[k])))


@dataclass(frozen=True)
class DraftNode:
    """One drafted token in a tree; ``parent`` is :data:`ROOT` (-1) right after the prefix."""

    node_id: int
    parent: int
    token: int


@dataclass(frozen=True)
class DraftTree:
    """A tree of drafted tokens, nodes listed parents before children.

    Siblings must carry distinct tokens (a duplicate could never be told apart
    by the target, and would waste a KV sequence).
    """

    nodes: tuple[DraftNode, ...]

    def __post_init__(self) -> None:
        seen: set[int] = set()
        siblings: set[tuple[int, int]] = set()
        for node in self.nodes:
            if node.node_id < 0 or node.node_id in seen:
                raise ValueError(f"node id {node.node_id} is negative or repeated")
            if node.parent != ROOT and node.parent not in seen:
                raise ValueError(
                    f"node {node.node_id}: parent {node.parent} must be -1 or a node listed before it"
                )
            if (node.parent, node.token) in siblings:
                raise ValueError(f"node {node.node_id}: token {node.token} repeats a sibling's token")
            seen.add(node.node_id)
            siblings.add((node.parent, node.token))

    @classmethod
    def chain(cls, tokens: Sequence[int]) -> DraftTree:
        """A tree without branches: node i holds ``tokens[i]`` and has parent i - 1."""
        return cls(tuple(DraftNode(i, i - 1, int(t)) for i, t in enumerate(tokens)))

    def children(self, parent: int) -> tuple[DraftNode, ...]:
        """Children of ``parent`` (:data:`ROOT` for the first level), in listing order."""
        return tuple(node for node in self.nodes if node.parent == parent)

    def path(self, node_id: int) -> tuple[int, ...]:
        """Tokens from the first level down to ``node_id`` inclusive."""
        by_id = {node.node_id: node for node in self.nodes}
        if node_id not in by_id:
            raise KeyError(f"no node {node_id} in the tree")
        tokens: list[int] = []
        while node_id != ROOT:
            node = by_id[node_id]
            tokens.append(node.token)
            node_id = node.parent
        return tuple(reversed(tokens))


def verify_tree_greedy(
    tree: DraftTree, target_argmax_by_node: Mapping[int, int], root_argmax: int
) -> TreeVerdict:
    """Walk the tree along the target's argmax.

    ``root_argmax`` is the target's argmax after the committed prefix;
    ``target_argmax_by_node[n]`` is its argmax after the prefix plus the path to
    node n (only nodes on the accepted path are looked up).  At each level the
    child whose token equals the argmax at its parent is accepted; the walk
    stops when no child matches, and the argmax there is the next token.
    """
    accepted: list[int] = []
    nodes: list[int] = []
    parent, want = ROOT, int(root_argmax)
    while True:
        match = next((c for c in tree.children(parent) if c.token == want), None)
        if match is None:
            return TreeVerdict(tuple(accepted), want, tuple(nodes))
        if match.node_id not in target_argmax_by_node:
            raise ValueError(f"no target argmax for accepted node {match.node_id}")
        accepted.append(match.token)
        nodes.append(match.node_id)
        parent, want = match.node_id, int(target_argmax_by_node[match.node_id])
