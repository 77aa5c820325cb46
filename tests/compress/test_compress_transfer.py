"""Transfer: an agent searched on ResNet-20 proposes a policy for ResNet-56 without search and
meets the budget; an architecture outside the agent's family is one line."""

from __future__ import annotations

import json

import pytest

from compress.graph import build_graph
from compress.search import SearchConfig, run_search, save_search
from compress_fixtures import cli, resnet20, resnet20_space  # noqa: F401  (pytest fixtures)
from test_compress_bad_input import assert_one_line_error


@pytest.fixture(scope="module")
def agent_file(resnet20, resnet20_space, tmp_path_factory):
    """A GNN agent after one PPO update on ResNet-20, with a stand-in reward (no data): wider
    policies score higher."""
    cfg = SearchConfig(method="gnn", target=0.5, episodes=8)
    result = run_search(resnet20_space, build_graph(resnet20, resnet20_space),
                        lambda keep: 100 * sum(keep.values()) / len(keep), cfg, progress=False)
    out = tmp_path_factory.mktemp("search") / "search_gnn.json"
    save_search(result, out, arch="resnet20")
    return out.with_suffix(".agent.pt")


def test_agent_from_resnet20_prunes_resnet56_to_the_budget(cli, agent_file, tmp_path):
    out = tmp_path / "policy.json"
    result = cli("transfer", "--agent", agent_file, "--arch", "resnet56", "--target", 0.5,
                 "--channel-multiple", 1, "--out", out)
    assert result.exit_code == 0, result.output + str(result.exception)
    policy = json.loads(out.read_text())
    assert policy["source_arch"] == "resnet20" and policy["arch"] == "resnet56"
    assert len(policy["best_keep"]) == 30  # 27 blocks' inner convs and 3 residual groups, none missing
    assert 0.99 * 0.5 <= policy["macs_ratio_counted"] <= 0.5  # torch-pruning's counter
    assert len({round(v, 3) for v in policy["best_keep"].values()}) > 1  # the network's own proposal


def test_transfer_outside_the_family(cli, agent_file, tmp_path):
    out = tmp_path / "policy.json"
    result = cli("transfer", "--agent", agent_file, "--arch", "mobilenet_v2", "--target", 0.5, "--out", out)
    assert_one_line_error(result, "searched on resnet20", "mobilenet_v2 is outside that family")
    assert not out.exists()


def test_transfer_of_a_file_that_is_no_agent(cli, tmp_path):
    bogus = tmp_path / "search_gnn.json"
    bogus.write_text("{}")
    result = cli("transfer", "--agent", bogus, "--arch", "resnet56", "--target", 0.5, "--out", tmp_path / "p.json")
    assert_one_line_error(result, "cannot read agent file")
