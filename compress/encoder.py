"""Graph encoders: the two-stage embedding of GNN-RL, and the per-layer ablation without a graph.

Stage 1 runs GCN layers on each block's internal graph (edges between groups of the same block)
and pools them into one vector per block. Stage 2 runs GCN layers on the graph of blocks. Each
group's embedding is its stage-1 vector, its block's stage-2 vector and its raw features.
"""

from __future__ import annotations

import torch
from torch import nn
from torch_geometric.nn import GCNConv, global_mean_pool

from compress.graph import NetGraph


def _intra_block_edges(graph: NetGraph) -> torch.Tensor:
    src, dst = graph.edge_index
    same = graph.block_of[src] == graph.block_of[dst]
    return graph.edge_index[:, same]


def _undirected(edge_index: torch.Tensor) -> torch.Tensor:
    return torch.cat([edge_index, edge_index.flip(0)], dim=1) if edge_index.numel() else edge_index


class TwoStageEncoder(nn.Module):
    """With `skip`, the per-node MLP of the ablation runs beside the two stages, so the graph
    context is added to what the feature-only agent sees instead of replacing it."""

    def __init__(self, in_dim: int, hidden: int = 64, skip: bool = False) -> None:
        super().__init__()
        self.stage1 = nn.ModuleList([GCNConv(in_dim, hidden), GCNConv(hidden, hidden)])
        self.stage2 = nn.ModuleList([GCNConv(hidden, hidden), GCNConv(hidden, hidden)])
        self.skip = FeatureEncoder(in_dim, hidden) if skip else None
        self.out_dim = 2 * hidden + in_dim + (self.skip.out_dim - in_dim if skip else 0)

    def forward(self, graph: NetGraph) -> torch.Tensor:
        x = graph.x
        intra = _undirected(_intra_block_edges(graph))
        h = x
        for conv in self.stage1:
            h = torch.tanh(conv(h, intra))
        blocks = global_mean_pool(h, graph.block_of, size=len(graph.blocks))
        inter = _undirected(graph.block_edge_index)
        b = blocks
        for conv in self.stage2:
            b = torch.tanh(conv(b, inter))
        parts = [h, b[graph.block_of], x if self.skip is None else self.skip(graph)]
        return torch.cat(parts, dim=1)


class LayerTwoStageEncoder(nn.Module):
    """Stage 1 over the *layers* of each block (as GNN-RL), stage 2 over the blocks; a group is
    embedded by the mean stage-1 vector of its layers, the mean stage-2 vector of the blocks those
    layers lie in (a residual group spans a whole stage), and the per-node MLP of the ablation."""

    def __init__(self, in_dim: int, layer_dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.stage1 = nn.ModuleList([GCNConv(layer_dim, hidden), GCNConv(hidden, hidden)])
        self.stage2 = nn.ModuleList([GCNConv(hidden, hidden), GCNConv(hidden, hidden)])
        self.skip = FeatureEncoder(in_dim, hidden)
        self.out_dim = 2 * hidden + self.skip.out_dim

    def forward(self, graph: NetGraph) -> torch.Tensor:
        lg = graph.layers
        if lg is None:
            raise ValueError("this graph has no layer-level view")
        src, dst = lg.edge_index
        intra = _undirected(lg.edge_index[:, lg.block_of[src] == lg.block_of[dst]])
        h = lg.x
        for conv in self.stage1:
            h = torch.tanh(conv(h, intra))
        b = global_mean_pool(h, lg.block_of, size=len(lg.blocks))
        inter = _undirected(lg.block_edge_index)
        for conv in self.stage2:
            b = torch.tanh(conv(b, inter))
        group_idx, layer_idx = lg.group_layer
        n = graph.num_nodes
        own = global_mean_pool(h[layer_idx], group_idx, size=n)
        context = global_mean_pool(b[lg.block_of[layer_idx]], group_idx, size=n)
        return torch.cat([own, context, self.skip(graph)], dim=1)


class FeatureEncoder(nn.Module):
    """Ablation: the same features, one MLP per node, no message passing."""

    def __init__(self, in_dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, 2 * hidden),
                                 nn.Tanh())
        self.out_dim = 2 * hidden + in_dim

    def forward(self, graph: NetGraph) -> torch.Tensor:
        return torch.cat([self.mlp(graph.x), graph.x], dim=1)


def make_encoder(kind: str, in_dim: int, hidden: int = 64, layer_dim: int = 0) -> nn.Module:
    if kind == "gnn":
        return TwoStageEncoder(in_dim, hidden)
    if kind == "gnn-skip":
        return TwoStageEncoder(in_dim, hidden, skip=True)
    if kind == "gnn-layers":
        return LayerTwoStageEncoder(in_dim, layer_dim, hidden)
    if kind == "mlp":
        return FeatureEncoder(in_dim, hidden)
    raise ValueError(f"unknown encoder {kind!r}; expected one of {', '.join(ENCODERS)}")


ENCODERS = ("gnn", "gnn-skip", "gnn-layers", "mlp")
