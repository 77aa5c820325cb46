"""Tests of pipeinfer_cpu.verify: greedy chains, rejection sampling statistics, trees."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pytest

from pipeinfer_cpu.verify import (
    ROOT,
    DraftNode,
    DraftTree,
    TreeVerdict,
    Verdict,
    verify_greedy,
    verify_sampled,
    verify_tree_greedy,
)

# Toy distributions over V=5: the draft is deliberately unlike the target.
TARGET = np.array([0.10, 0.40, 0.20, 0.05, 0.25])
DRAFT = np.array([0.30, 0.10, 0.35, 0.20, 0.05])
CHI2_DF4_P001 = 18.467  # chi-square critical value, 4 degrees of freedom, p = 0.001
TRIALS = 200_000


class FixedUniforms:
    """Stands in for a Generator: hands out the given uniforms in order."""

    def __init__(self, values: Sequence[float]) -> None:
        self._values = list(values)

    def random(self, n: int) -> np.ndarray:
        out, self._values = self._values[:n], self._values[n:]
        assert len(out) == n, "test supplied too few uniforms"
        return np.array(out)


def _chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def _first_token_counts(verifier: Callable[[int, np.random.Generator], int], seed: int) -> np.ndarray:
    """Counts of the first emitted token over TRIALS drafts sampled from DRAFT."""
    rng = np.random.default_rng(seed)
    drafts = rng.choice(DRAFT.size, size=TRIALS, p=DRAFT)
    firsts = np.fromiter((verifier(int(d), rng) for d in drafts), dtype=np.int64, count=TRIALS)
    return np.bincount(firsts, minlength=TARGET.size)


def _ours(draft: int, rng: np.random.Generator) -> int:
    return verify_sampled([draft], DRAFT[None, :], np.stack([TARGET, TARGET]), rng).tokens[0]


def _naive_accept_if_equal(draft: int, rng: np.random.Generator) -> int:
    """Accept the draft when it equals the target's top token, else sample the target."""
    return draft if draft == int(np.argmax(TARGET)) else int(rng.choice(TARGET.size, p=TARGET))


def _residual_forgotten(draft: int, rng: np.random.Generator) -> int:
    """The classic bug: correct acceptance test, but resample from p_t instead of the residual."""
    if rng.random() < min(1.0, TARGET[draft] / DRAFT[draft]):
        return draft
    return int(rng.choice(TARGET.size, p=TARGET))


# --- greedy chains ----------------------------------------------------------------------------


def test_greedy_all_accepted_takes_bonus() -> None:
    verdict = verify_greedy([5, 6, 7], [5, 6, 7, 8])
    assert verdict == Verdict((5, 6, 7), 8)
    assert verdict.n_accepted == 3
    assert verdict.tokens == (5, 6, 7, 8)


def test_greedy_none_accepted_takes_correction() -> None:
    verdict = verify_greedy([5, 6, 7], [9, 6, 7, 8])
    assert verdict.accepted == ()
    assert verdict.next_token == 9
    assert verdict.tokens == (9,)


def test_greedy_partial_stops_at_first_mismatch() -> None:
    # position 2 matches again after the mismatch at 1, but must not be accepted
    verdict = verify_greedy([5, 6, 7], [5, 4, 7, 8])
    assert verdict == Verdict((5,), 4)


def test_greedy_empty_draft_is_plain_decoding() -> None:
    assert verify_greedy([], [42]) == Verdict((), 42)


def test_greedy_converts_numpy_ints() -> None:
    verdict = verify_greedy(np.array([3, 4]), np.array([3, 4, 5]))
    assert verdict.tokens == (3, 4, 5)
    assert all(type(t) is int for t in verdict.tokens)


@pytest.mark.parametrize("argmax", [[1, 2], [1, 2, 3, 4]])
def test_greedy_rejects_wrong_target_length(argmax: list[int]) -> None:
    with pytest.raises(ValueError, match="len\\(draft_tokens\\) \\+ 1 = 3"):
        verify_greedy([1, 2], argmax)


# --- rejection sampling: exact decisions with fixed uniforms ---------------------------------


def test_sampled_accepts_iff_uniform_below_ratio() -> None:
    draft = np.array([[0.2, 0.8]])
    target = np.array([[0.6, 0.4], [0.5, 0.5]])  # ratio at token 1: 0.4 / 0.8 = 0.5
    accepted = verify_sampled([1], draft, target, FixedUniforms([0.49, 0.7]))
    assert accepted == Verdict((1,), 1)  # bonus from target[1] with u = 0.7
    rejected = verify_sampled([1], draft, target, FixedUniforms([0.51, 0.7]))
    assert rejected == Verdict((), 0)  # residual max(p_t - p_d, 0) = [0.4, 0] -> token 0


def test_sampled_rejection_samples_the_residual() -> None:
    draft = np.array([[0.5, 0.5, 0.0]])
    target = np.array([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    # token 0 rejected (0.2/0.5 = 0.4 < 0.9); residual [0, 0, 0.5] only allows token 2
    for u in (0.0, 0.5, 0.999):
        assert verify_sampled([0], draft, target, FixedUniforms([0.9, u])) == Verdict((), 2)


def test_sampled_zero_residual_falls_back_to_target() -> None:
    draft = np.array([[0.5, 0.5]])
    target = np.array([[0.5 - 1e-12, 0.5], [1.0, 0.0]])  # p_t <= p_d everywhere: residual is 0
    reject = 1 - 1e-13
    assert verify_sampled([0], draft, target, FixedUniforms([reject, 0.25])) == Verdict((), 0)
    assert verify_sampled([0], draft, target, FixedUniforms([reject, 0.75])) == Verdict((), 1)


def test_sampled_identical_distributions_always_accept() -> None:
    rng = np.random.default_rng(4)
    probs = np.tile(TARGET, (4, 1))
    for _ in range(2000):
        drafts = rng.choice(5, size=3, p=TARGET).tolist()
        assert verify_sampled(drafts, probs[:3], probs, rng).accepted == tuple(drafts)


def test_sampled_draws_k_plus_one_uniforms_whatever_the_outcome() -> None:
    target = np.tile(TARGET, (4, 1))
    for drafts in ([3, 3, 3], [1, 1, 1]):  # likely rejected early / likely accepted
        for seed in range(20):
            used, reference = np.random.default_rng(seed), np.random.default_rng(seed)
            verify_sampled(drafts, np.tile(DRAFT, (3, 1)), target, used)
            reference.random(4)
            assert used.random() == reference.random()


def test_sampled_is_reproducible_from_a_seed() -> None:
    def run(seed: int) -> list[tuple[int, ...]]:
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(300):
            drafts = rng.choice(5, size=4, p=DRAFT).tolist()
            out.append(verify_sampled(drafts, np.tile(DRAFT, (4, 1)), np.tile(TARGET, (5, 1)), rng).tokens)
        return out

    assert run(123) == run(123)
    assert run(123) != run(124)


def test_sampled_rejects_bad_inputs() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="draft_probs"):
        verify_sampled([1, 2], np.ones((1, 5)) / 5, np.ones((3, 5)) / 5, rng)
    with pytest.raises(ValueError, match="target_probs"):
        verify_sampled([1], np.ones((1, 5)) / 5, np.ones((1, 5)) / 5, rng)
    with pytest.raises(ValueError, match="vocabularies differ"):
        verify_sampled([1], np.ones((1, 5)) / 5, np.ones((2, 6)) / 6, rng)
    with pytest.raises(ValueError, match="draft probability 0"):
        verify_sampled([0], np.array([[0.0, 1.0]]), np.full((2, 2), 0.5), rng)


def test_sampled_with_empty_draft_samples_the_target() -> None:
    verdict = verify_sampled([], np.zeros((0, 3)), np.array([[0.0, 0.0, 1.0]]), np.random.default_rng(0))
    assert verdict == Verdict((), 2)


# --- rejection sampling: the output distribution is the target's ------------------------------


def test_sampled_first_token_follows_target_distribution() -> None:
    counts = _first_token_counts(_ours, seed=2024)
    assert _chi2(counts, TARGET) < CHI2_DF4_P001
    assert np.abs(counts / TRIALS - TARGET).sum() / 2 < 0.005


@pytest.mark.parametrize("naive", [_naive_accept_if_equal, _residual_forgotten])
def test_the_statistical_check_catches_naive_rules(naive: Callable[[int, np.random.Generator], int]) -> None:
    counts = _first_token_counts(naive, seed=2024)
    assert _chi2(counts, TARGET) > 10 * CHI2_DF4_P001
    assert np.abs(counts / TRIALS - TARGET).sum() / 2 > 0.03


def test_sampled_second_token_follows_conditional_target() -> None:
    """With a 2-token draft, the token after an accepted first token follows p_t(. | first)."""
    second_target = np.array(
        [[0.7, 0.1, 0.1, 0.05, 0.05], [0.05, 0.05, 0.1, 0.2, 0.6]] + [list(TARGET)] * 3
    )
    second_draft = np.tile(DRAFT, (5, 1))
    rng = np.random.default_rng(77)
    seconds: dict[int, list[int]] = {0: [], 1: []}
    for _ in range(60_000):
        d0 = int(rng.choice(5, p=DRAFT))
        d1 = int(rng.choice(5, p=second_draft[d0]))
        target = np.stack([TARGET, second_target[d0], TARGET])
        verdict = verify_sampled([d0, d1], np.stack([DRAFT, second_draft[d0]]), target, rng)
        if verdict.n_accepted >= 1 and verdict.accepted[0] in seconds:
            seconds[verdict.accepted[0]].append(verdict.tokens[1])
    for first, tokens in seconds.items():
        counts = np.bincount(tokens, minlength=5)
        assert counts.sum() > 2000
        assert _chi2(counts, second_target[first]) < CHI2_DF4_P001


def test_greedy_draft_with_sampled_target_is_lossless() -> None:
    one_hot = np.eye(5)[[2]]  # a greedy draft always proposes token 2
    rng = np.random.default_rng(8)
    firsts = [verify_sampled([2], one_hot, np.stack([TARGET, TARGET]), rng).tokens[0] for _ in range(40_000)]
    assert _chi2(np.bincount(firsts, minlength=5), TARGET) < CHI2_DF4_P001


# --- trees -------------------------------------------------------------------------------------


def _tree() -> DraftTree:
    """Root children 5 (node 0) and 7 (node 1); node 1 has children 8 (node 2) and 9 (node 3);
    node 3 has child 4 (node 4)."""
    return DraftTree(
        (
            DraftNode(0, ROOT, 5),
            DraftNode(1, ROOT, 7),
            DraftNode(2, 1, 8),
            DraftNode(3, 1, 9),
            DraftNode(4, 3, 4),
        )
    )


def test_tree_follows_the_matching_branch() -> None:
    verdict = verify_tree_greedy(_tree(), {1: 9, 3: 11}, root_argmax=7)
    assert verdict == TreeVerdict((7, 9), 11, (1, 3))
    assert isinstance(verdict, Verdict)
    assert verdict.tokens == (7, 9, 11)


def test_tree_whole_path_accepted_gives_bonus_from_leaf() -> None:
    verdict = verify_tree_greedy(_tree(), {1: 9, 3: 4, 4: 30}, root_argmax=7)
    assert verdict.accepted == (7, 9, 4)
    assert verdict.accepted_nodes == (1, 3, 4)
    assert verdict.next_token == 30


def test_tree_no_root_match_returns_root_argmax() -> None:
    verdict = verify_tree_greedy(_tree(), {}, root_argmax=6)
    assert verdict == TreeVerdict((), 6, ())


def test_tree_only_looks_up_nodes_on_the_path() -> None:
    # nodes 2, 3, 4 have no entry: they are never reached
    assert verify_tree_greedy(_tree(), {0: 1}, root_argmax=5).tokens == (5, 1)


def test_tree_missing_argmax_for_accepted_node_is_an_error() -> None:
    with pytest.raises(ValueError, match="accepted node 1"):
        verify_tree_greedy(_tree(), {0: 1}, root_argmax=7)


def test_empty_tree_is_plain_decoding() -> None:
    assert verify_tree_greedy(DraftTree(()), {}, root_argmax=3) == TreeVerdict((), 3, ())


def test_chain_tree_agrees_with_verify_greedy() -> None:
    rng = np.random.default_rng(6)
    for _ in range(500):
        k = int(rng.integers(0, 6))
        draft = rng.integers(0, 3, size=k).tolist()
        argmax = rng.integers(0, 3, size=k + 1).tolist()
        tree = DraftTree.chain(draft)
        by_node = {i: argmax[i + 1] for i in range(k)}
        tree_verdict = verify_tree_greedy(tree, by_node, argmax[0])
        chain_verdict = verify_greedy(draft, argmax)
        assert tree_verdict.tokens == chain_verdict.tokens
        assert tree_verdict.accepted_nodes == tuple(range(chain_verdict.n_accepted))


def test_tree_children_and_path() -> None:
    tree = _tree()
    assert [n.node_id for n in tree.children(ROOT)] == [0, 1]
    assert [n.node_id for n in tree.children(1)] == [2, 3]
    assert tree.children(4) == ()
    assert tree.path(4) == (7, 9, 4)
    assert tree.path(0) == (5,)
    with pytest.raises(KeyError):
        tree.path(99)


@pytest.mark.parametrize(
    "nodes, message",
    [
        ((DraftNode(0, ROOT, 1), DraftNode(0, ROOT, 2)), "repeated"),
        ((DraftNode(-2, ROOT, 1),), "negative"),
        ((DraftNode(1, 0, 1), DraftNode(0, ROOT, 2)), "listed before"),
        ((DraftNode(0, ROOT, 1), DraftNode(1, ROOT, 1)), "sibling"),
    ],
)
def test_tree_validation(nodes: tuple[DraftNode, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DraftTree(nodes)


def test_tree_allows_same_token_under_different_parents() -> None:
    tree = DraftTree((DraftNode(0, ROOT, 1), DraftNode(1, ROOT, 2), DraftNode(2, 0, 3), DraftNode(3, 1, 3)))
    assert verify_tree_greedy(tree, {1: 3, 3: 0}, root_argmax=2).accepted_nodes == (1, 3)
