"""The PPO agent beats random policies on a seeded toy problem, with and without the GNN."""

from __future__ import annotations

import numpy as np
import pytest

from compress.agent import AgentConfig, PPOAgent
from compress.graph import FEATURE_NAMES, build_graph
from compress.search import SearchConfig, run_search
from compress_fixtures import resnet20, resnet20_space  # noqa: F401  (pytest fixtures)


def toy_reward(graph):
    """Best policy: keep the deep groups and prune the shallow ones (a function of the features,
    so a policy that reads the graph can learn it)."""
    depth = graph.x[:, FEATURE_NAMES.index("depth")].numpy()
    return lambda keep: float(np.dot([keep[r] for r in graph.roots], depth - depth.mean()) * 10)


@pytest.mark.parametrize("encoder", ["gnn", "gnn-skip", "gnn-layers", "mlp"])
def test_agent_improves_over_random_policies(resnet20, resnet20_space, encoder):
    graph = build_graph(resnet20, resnet20_space)
    score = toy_reward(graph)
    cfg = dict(target=0.5, episodes=64, seed=3)
    random_run = run_search(resnet20_space, graph, score, SearchConfig(method="random", **cfg), progress=False)
    agent_run = run_search(resnet20_space, graph, score, SearchConfig(method=encoder, **cfg), progress=False)
    random_mean = np.mean(random_run.rewards)
    late = np.mean(agent_run.rewards[-16:])
    early = np.mean(agent_run.rewards[:8])
    assert late > early + 1.0, (early, late)
    assert late > random_mean + 1.0, (random_mean, late)
    assert agent_run.best_reward >= random_run.best_reward


def test_agent_is_seeded(resnet20, resnet20_space):
    graph = build_graph(resnet20, resnet20_space)
    a, b = (PPOAgent(graph, AgentConfig(seed=7)) for _ in range(2))
    assert a.propose() == b.propose()
    keep = a.greedy()
    assert set(keep) == set(graph.roots) and all(0.05 <= v <= 1.0 for v in keep.values())


def test_feedback_without_proposal_is_an_error(resnet20, resnet20_space):
    agent = PPOAgent(build_graph(resnet20, resnet20_space), AgentConfig())
    with pytest.raises(RuntimeError):
        agent.feedback(1.0)
