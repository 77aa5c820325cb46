"""The network as a graph, derived from torch-pruning's dependency graph (never written by hand).

Nodes are pruning groups; an edge g -> h means channels produced by g's layers reach a layer that
produces h's channels, following the traced data flow through functional ops (add, concat, ...)
and through layers no group owns. Blocks (for the two-stage embedding) are the parent module paths
of the groups' root layers.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from compress.prune import PruneSpace, build_dependency_graph

if TYPE_CHECKING:
    import torch_pruning as tp

FEATURE_NAMES = (
    "is_conv", "is_depthwise", "is_linear", "is_other", "log_channels", "log_in_channels", "kernel",
    "stride", "grouped", "flops_share", "params_share", "keep_ratio", "log_norm_mean", "norm_cv",
    "norm_min", "norm_max", "coupled_layers", "depth", "log_spatial",
)


@dataclass(frozen=True)
class NetGraph:
    """Graph of pruning groups with deterministic features (rows in `PruneSpace.groups` order)."""

    roots: tuple[str, ...]
    x: torch.Tensor  # (N, len(FEATURE_NAMES)) float32
    edge_index: torch.Tensor  # (2, E) long, group -> group along the data flow
    block_of: torch.Tensor  # (N,) long, block id of each group
    blocks: tuple[str, ...]
    block_edge_index: torch.Tensor  # (2, E_b) long, block -> block
    layers: "LayerGraph | None" = None  # the layer-level view used by the 'gnn-layers' encoder

    @property
    def num_nodes(self) -> int:
        return len(self.roots)

    def with_keep(self, keep: dict[str, float]) -> "NetGraph":
        """Same graph with the keep-ratio feature set from a policy."""
        x = self.x.clone()
        col = FEATURE_NAMES.index("keep_ratio")
        x[:, col] = torch.tensor([keep.get(r, 1.0) for r in self.roots], dtype=x.dtype)
        return NetGraph(self.roots, x, self.edge_index, self.block_of, self.blocks, self.block_edge_index,
                        self.layers)


@dataclass(frozen=True)
class LayerGraph:
    """Conv/linear layers as nodes (GNN-RL's stage-1 view): edges along the traced data flow,
    blocks over all layers, and which layers each pruning group touches."""

    x: torch.Tensor  # (L, len(LAYER_FEATURES))
    edge_index: torch.Tensor  # (2, E_l) layer -> layer
    block_of: torch.Tensor  # (L,)
    blocks: tuple[str, ...]
    block_edge_index: torch.Tensor  # (2, E_lb)
    group_layer: torch.Tensor  # (2, K): (group index, layer index) pairs


LAYER_FEATURES = ("is_conv", "is_depthwise", "is_linear", "log_in", "log_out", "kernel", "stride",
                  "macs_share", "params_share", "log_norm_mean", "norm_cv", "norm_min", "norm_max",
                  "depth", "log_spatial")


def _owners(space: PruneSpace, model: nn.Module) -> dict[nn.Module, int]:
    owner = {}
    for gi, info in enumerate(space.groups):
        for name in info.out_layers:
            owner[model.get_submodule(name)] = gi
    return owner


def flow_edges(dg: "tp.DependencyGraph", owner: dict[nn.Module, int]) -> list[tuple[int, int]]:
    """Edges between owned modules of a traced graph, breadth-first through unowned nodes."""
    edges: set[tuple[int, int]] = set()
    for module, node in dg.module2node.items():
        src = owner.get(module)
        if src is None:
            continue
        queue, seen = deque(node.outputs), set()
        while queue:
            nxt = queue.popleft()
            if id(nxt) in seen:
                continue
            seen.add(id(nxt))
            dst = owner.get(nxt.module)
            if dst is not None and dst != src:
                edges.add((src, dst))
            else:
                queue.extend(nxt.outputs)
    return sorted(edges)


def group_edges(model: nn.Module, space: PruneSpace) -> list[tuple[int, int]]:
    """Edges between groups from the traced module graph."""
    device = next(model.parameters()).device
    dg = build_dependency_graph(model, torch.randn(*space.input_shape, device=device))
    return flow_edges(dg, _owners(space, model))


def _layer_info(layer: nn.Module) -> tuple[list[float], int, int, int]:
    """(one-hot type, kernel, stride, groups) of a root layer."""
    if isinstance(layer, nn.Conv2d):
        depthwise = layer.groups > 1 and layer.groups == layer.in_channels
        onehot = [0.0, 1.0, 0.0, 0.0] if depthwise else [1.0, 0.0, 0.0, 0.0]
        return onehot, layer.kernel_size[0], layer.stride[0], layer.groups
    if isinstance(layer, nn.Linear):
        return [0.0, 0.0, 1.0, 0.0], 1, 1, 1
    return [0.0, 0.0, 0.0, 1.0], 1, 1, 1


def _spatial_sizes(model: nn.Module, roots: list[nn.Module], shape: tuple[int, ...]) -> list[int]:
    sizes: dict[int, int] = {}
    hooks = [m.register_forward_hook(
        lambda mod, _i, out: sizes.__setitem__(id(mod), int(out[0, 0].numel()))) for m in roots]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(*shape, device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    return [sizes.get(id(m), 1) for m in roots]


def _norm_stats(weight: torch.Tensor) -> list[float]:
    norms = weight.detach().float().flatten(1).norm(dim=1)
    mean = float(norms.mean()) + 1e-12
    return [math.log(mean), float(norms.std(unbiased=False)) / mean, float(norms.min()) / mean,
            float(norms.max()) / mean]


def node_features(model: nn.Module, space: PruneSpace) -> torch.Tensor:
    roots = [model.get_submodule(g.root) for g in space.groups]
    spatial = _spatial_sizes(model, roots, space.input_shape)
    total_params = sum(p.numel() for p in model.parameters())
    rows = []
    for gi, (info, layer) in enumerate(zip(space.groups, roots)):
        onehot, kernel, stride, groups = _layer_info(layer)
        touched = set(info.out_layers) | set(info.in_layers)
        flops = sum(space.layer_macs.get(n, 0.0) for n in touched) / space.base_macs
        params = sum(p.numel() for n in touched for p in model.get_submodule(n).parameters(recurse=False))
        in_ch = getattr(layer, "in_channels", getattr(layer, "in_features", 1))
        rows.append(onehot + [
            math.log2(info.channels) / 10, math.log2(max(1, in_ch)) / 10, kernel / 7, stride / 2,
            float(groups > 1), flops, params / total_params, 1.0, *_norm_stats(layer.weight),
            len(info.out_layers) / 10, gi / max(1, len(roots) - 1), math.log2(spatial[gi]) / 10,
        ])
    return torch.tensor(rows, dtype=torch.float32)


def block_name(root: str, layer_names: list[str]) -> str:
    """The smallest ancestor module of `root` holding at least two conv/linear layers (a residual
    block, an inverted residual, a VGG stage...); 'top' when only the whole model does."""
    parts = root.split(".")[:-1]
    while parts:
        prefix = ".".join(parts) + "."
        if sum(n.startswith(prefix) for n in layer_names) >= 2:
            return prefix[:-1]
        parts = parts[:-1]
    return "top"


def _as_index(pairs: list[tuple[int, int]]) -> torch.Tensor:
    if not pairs:
        return torch.zeros(2, 0, dtype=torch.long)
    return torch.tensor(pairs, dtype=torch.long).t().contiguous()


def build_layer_graph(model: nn.Module, space: PruneSpace) -> LayerGraph:
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    modules = [model.get_submodule(n) for n in names]
    device = next(model.parameters()).device
    dg = build_dependency_graph(model, torch.randn(*space.input_shape, device=device))
    edges = flow_edges(dg, {m: i for i, m in enumerate(modules)})
    spatial = _spatial_sizes(model, modules, space.input_shape)
    total_params = sum(p.numel() for p in model.parameters())
    rows = []
    for i, (name, layer) in enumerate(zip(names, modules)):
        onehot, kernel, stride, _ = _layer_info(layer)
        cin = getattr(layer, "in_channels", getattr(layer, "in_features", 1))
        cout = getattr(layer, "out_channels", getattr(layer, "out_features", 1))
        rows.append(onehot[:3] + [
            math.log2(cin) / 10, math.log2(cout) / 10, kernel / 7, stride / 2,
            space.layer_macs.get(name, 0.0) / space.base_macs, layer.weight.numel() / total_params,
            *_norm_stats(layer.weight), i / max(1, len(names) - 1), math.log2(spatial[i]) / 10])
    block_names = [block_name(n, names) for n in names]
    blocks = tuple(dict.fromkeys(block_names))
    block_of = torch.tensor([blocks.index(b) for b in block_names], dtype=torch.long)
    block_edges = sorted({(int(block_of[a]), int(block_of[b])) for a, b in edges if block_of[a] != block_of[b]})
    index = {n: i for i, n in enumerate(names)}
    membership = sorted({(gi, index[n]) for gi, g in enumerate(space.groups)
                         for n in (*g.out_layers, *g.in_layers) if n in index})
    return LayerGraph(torch.tensor(rows, dtype=torch.float32), _as_index(edges), block_of, blocks,
                      _as_index(block_edges), _as_index(membership))


def build_graph(model: nn.Module, space: PruneSpace) -> NetGraph:
    """Nodes, features, edges and blocks of `model`, all derived from the traced graph."""
    edges = group_edges(model, space)
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    names = [block_name(g.root, layers) for g in space.groups]
    blocks = tuple(dict.fromkeys(names))
    block_of = torch.tensor([blocks.index(b) for b in names], dtype=torch.long)
    block_edges = sorted({(int(block_of[s]), int(block_of[d])) for s, d in edges
                          if block_of[s] != block_of[d]})
    return NetGraph(tuple(g.root for g in space.groups), node_features(model, space), _as_index(edges),
                    block_of, blocks, _as_index(block_edges), build_layer_graph(model, space))
