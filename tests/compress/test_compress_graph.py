"""The graph of pruning groups is derived automatically for every architecture."""

from __future__ import annotations

import pytest
import torch

from compress.graph import FEATURE_NAMES, build_graph
from compress.models import ARCHITECTURES, build_model
from compress.prune import apply_policy, build_space, count_macs
from compress_fixtures import resnet20, resnet20_space  # noqa: F401  (pytest fixtures)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_graph_built_automatically(arch):
    torch.manual_seed(0)
    model = build_model(arch).eval()
    space = build_space(model)
    graph = build_graph(model, space)
    n = len(space.groups)
    assert n >= 10 and graph.num_nodes == n
    assert graph.x.shape == (n, len(FEATURE_NAMES)) and torch.isfinite(graph.x).all()
    assert graph.edge_index.shape[1] >= n - 1  # connected along the data flow
    assert int(graph.edge_index.max()) < n and not (graph.edge_index[0] == graph.edge_index[1]).any()
    assert len(graph.blocks) >= 3 and int(graph.block_of.max()) == len(graph.blocks) - 1
    flops = graph.x[:, FEATURE_NAMES.index("flops_share")]
    assert (flops > 0).all() and (flops <= 1).all()
    layers = graph.layers  # the layer-level view: every conv/linear, each group mapped to its layers
    n_layers = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules())
    assert layers.x.shape[0] == n_layers and torch.isfinite(layers.x).all()
    assert layers.edge_index.shape[1] >= n_layers - 1
    assert set(layers.group_layer[0].tolist()) == set(range(n))
    again = build_graph(model, build_space(model))  # deterministic features and edges
    assert torch.equal(again.x, graph.x) and torch.equal(again.edge_index, graph.edge_index)
    assert torch.equal(again.layers.x, layers.x) and torch.equal(again.layers.edge_index, layers.edge_index)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_predicted_macs_match_counter_after_pruning(arch):
    torch.manual_seed(0)
    model = build_model(arch).eval()
    space = build_space(model)
    gen = torch.Generator().manual_seed(1)
    keep = {g.root: float(r) for g, r in zip(space.groups, 0.3 + 0.7 * torch.rand(len(space.groups), generator=gen))}
    pruned = apply_policy(model, space, keep)
    macs, _ = count_macs(pruned)
    assert macs < space.base_macs
    assert abs(space.predict_macs(keep) - macs) <= 1e-6 * macs
    assert pruned(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet_residual_groups_are_coupled(resnet20, resnet20_space):
    residual = [g for g in resnet20_space.groups if len(g.out_layers) >= 3 * 2]
    assert len(residual) == 3  # one per stage: every conv2 (+ shortcut or stem) of the stage
    graph = build_graph(resnet20, resnet20_space)
    edges = set(map(tuple, graph.edge_index.t().tolist()))
    stem = [g.root for g in resnet20_space.groups].index("stem.0")
    first_conv1 = [g.root for g in resnet20_space.groups].index("stages.0.0.conv1.0")
    assert (stem, first_conv1) in edges and (first_conv1, stem) in edges


def test_shufflenet_keeps_shuffled_channels_whole():
    model = build_model("shufflenet_v2").eval()
    space = build_space(model)
    touched = {n for g in space.groups for n in g.out_layers}
    assert not any(".out." in n or "branch1" in n or n.startswith("stem") for n in touched)
    pruned = apply_policy(model, space, {g.root: 0.5 for g in space.groups})
    x = torch.randn(1, 3, 32, 32)
    assert pruned(x).shape == (1, 10) and count_macs(pruned)[0] < space.base_macs
