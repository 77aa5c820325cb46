"""The DepGraph baseline: torch-pruning's global group-norm ranking, as a policy fitted to the
FLOPs budget in the same harness as the other methods."""

from __future__ import annotations

from compress.graph import build_graph
from compress.search import SearchConfig, prior_policy, run_search, verify_budget
from compress_fixtures import resnet20, resnet20_space  # noqa: F401  (pytest fixtures)


def test_depgraph_policy_meets_the_budget_within_one_percent(resnet20, resnet20_space):
    cfg = SearchConfig(method="depgraph", target=0.5)
    prior = prior_policy(resnet20, resnet20_space, cfg)
    scored: list[dict[str, float]] = []
    result = run_search(resnet20_space, build_graph(resnet20, resnet20_space),
                        lambda keep: scored.append(keep) or 42.0, cfg, progress=False, prior=prior)
    assert result.evaluations == 1 and len(scored) == 1 and result.best_reward == 42.0
    counted = verify_budget(resnet20, resnet20_space, result.best_keep)  # torch-pruning's counter
    assert 0.99 * cfg.target <= counted <= cfg.target, counted
    # a global ranking: the groups keep different shares of their channels, unlike uniform
    assert len({round(v, 2) for v in prior.values()}) > 2
    assert prior_policy(resnet20, resnet20_space, SearchConfig(method="uniform")) is None
