"""The one adapter to torch-pruning: find the pruning groups of a model, predict the MACs of a
`{group: keep_ratio}` policy, and remove channels physically.

A group is identified by the name of its root layer (the first conv/linear whose output channels
it prunes), so a policy found on one copy of a model applies to any other copy of it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from compress.errors import CompressError, TraceError
from compress.models import ChannelShuffle

ROOT_TYPES = (nn.Conv2d, nn.Linear)


class _FixedChannels(tp.pruner.function.BasePruningFunc):
    """Pruner for layers whose channels must never change (channel shuffle): it reports no channel
    count, so torch-pruning neither roots a group at it nor follows indices through it."""

    def prune_out_channels(self, layer: nn.Module, idxs: list[int]) -> nn.Module:
        raise TraceError(f"{type(layer).__name__} channels cannot be pruned")

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> None:
        return None

    def get_in_channels(self, layer: nn.Module) -> None:
        return None


CUSTOM_PRUNERS = {ChannelShuffle: _FixedChannels()}


@dataclass(frozen=True)
class GroupInfo:
    """One pruning group: coupled layers that lose the same channel indices."""

    root: str
    channels: int
    out_layers: tuple[str, ...]  # layers whose output channels are removed
    in_layers: tuple[str, ...]  # layers whose input channels are removed
    order: tuple[int, ...]  # channel indices, least important (L2 magnitude) first


@dataclass(frozen=True)
class PruneSpace:
    """Everything needed to turn keep ratios into MACs and pruned models, computed once."""

    groups: tuple[GroupInfo, ...]
    layer_macs: dict[str, float]  # per counted layer, unpruned model
    layer_groups: dict[str, tuple[int, ...]]  # group indices whose channels scale each layer
    base_macs: float
    base_params: float
    input_shape: tuple[int, ...]
    channel_multiple: int = 1

    def kept_channels(self, keep: dict[str, float]) -> dict[str, int]:
        """Channels kept per group: at least one, and a multiple of `channel_multiple` unless the
        group is whole (CPU convolution kernels work on blocks of 8 or 16 channels, so odd counts
        save MACs but little time)."""
        out, m = {}, self.channel_multiple
        for g in self.groups:
            ratio = min(1.0, max(0.0, keep.get(g.root, 1.0)))
            n = max(1, min(g.channels, round(ratio * g.channels)))
            if m > 1 and n < g.channels:
                n = min(g.channels, max(m, round(n / m) * m))
            out[g.root] = n
        return out

    def steps(self) -> dict[str, float]:
        """One channel step per group, as a keep ratio."""
        return {g.root: self.channel_multiple / g.channels for g in self.groups}

    def predict_macs(self, keep: dict[str, float]) -> float:
        """MACs after pruning, predicted from channel fractions (checked in tests against
        torch-pruning's counter on the physically pruned model)."""
        kept = self.kept_channels(keep)
        frac = [kept[g.root] / g.channels for g in self.groups]
        total = 0.0
        for name, macs in self.layer_macs.items():
            factor = 1.0
            for gi in self.layer_groups.get(name, ()):
                factor *= frac[gi]
            total += macs * factor
        return total


def ignored_layers(model: nn.Module, num_classes: int) -> list[nn.Module]:
    """Output classifier layers plus whatever the model declares fixed (`pruning_ignored`)."""
    ignored = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    hook = getattr(model, "pruning_ignored", None)
    if callable(hook):
        ignored += list(hook())
    return ignored


def build_dependency_graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=example, customized_pruners=CUSTOM_PRUNERS, verbose=False
            )
    except TraceError:
        raise
    except Exception as err:  # torch-pruning raises many kinds; report them as one
        raise TraceError(f"cannot trace {type(model).__name__}: {type(err).__name__}: {err}") from err


def discover_groups(model: nn.Module, dg: tp.DependencyGraph, num_classes: int) -> list[tp.Group]:
    """All prunable groups, ordered by the position of their root layer in the model."""
    position = {m: i for i, m in enumerate(model.modules())}
    groups = list(dg.get_all_groups(ignored_layers=ignored_layers(model, num_classes),
                                    root_module_types=ROOT_TYPES))
    groups.sort(key=lambda g: position.get(g[0].dep.target.module, len(position)))
    if not groups:
        raise TraceError(f"no prunable channel groups found in {type(model).__name__} "
                         "(is its output computed from the traced layers?)")
    return groups


def _group_info(group: tp.Group, dg: tp.DependencyGraph, names: dict[nn.Module, str]) -> GroupInfo:
    outs, ins = [], []
    for dep, _ in group:
        name = names.get(dep.target.module)
        if name is None:
            continue
        (outs if dg.is_out_channel_pruning_fn(dep.handler) else ins).append(name)
    scores = tp.importance.GroupMagnitudeImportance(p=2)(group)
    order = tuple(int(i) for i in torch.argsort(scores.float(), stable=True))
    root = names[group[0].dep.target.module]
    return GroupInfo(root, len(group[0][1]), tuple(dict.fromkeys(outs)), tuple(dict.fromkeys(ins)),
                     order)


def build_space(model: nn.Module, num_classes: int = 10, input_shape: tuple[int, ...] = (1, 3, 32, 32),
                channel_multiple: int = 1) -> PruneSpace:
    """Trace `model` (on the CPU or wherever it lives) and describe its pruning groups."""
    if isinstance(channel_multiple, bool) or not isinstance(channel_multiple, int) or channel_multiple < 1:
        raise CompressError(f"the channel multiple must be a whole number >= 1, got {channel_multiple!r}")
    model.eval()
    device = next(model.parameters()).device
    example = torch.randn(*input_shape, device=device)
    dg = build_dependency_graph(model, example)
    names = {m: n for n, m in model.named_modules()}
    infos = tuple(_group_info(g, dg, names) for g in discover_groups(model, dg, num_classes))
    with torch.no_grad():
        macs, params, per_layer, _ = tp.utils.count_ops_and_params(model, example, layer_wise=True)
    layer_macs = {names[m]: float(v) for m, v in per_layer.items()
                  if v and m in names and not list(m.children())}
    touched: dict[str, list[int]] = {}
    for gi, info in enumerate(infos):
        for name in set(info.out_layers) | set(info.in_layers):
            touched.setdefault(name, []).append(gi)
    return PruneSpace(infos, layer_macs, {k: tuple(v) for k, v in touched.items()}, float(macs),
                      float(params), tuple(input_shape), channel_multiple)


def prune_to_counts(model: nn.Module, space: PruneSpace, kept: dict[str, int],
                    use_order: bool = True) -> nn.Module:
    """Return a pruned deep copy of `model` keeping `kept[root]` channels in each group.

    With `use_order` the least important channels (by the group L2 magnitude measured when the
    space was built) go first; without it the highest indices go, which is enough to rebuild the
    shapes of a saved pruned model before loading its weights.
    """
    pruned = copy.deepcopy(model).eval()
    device = next(pruned.parameters()).device
    dg = build_dependency_graph(pruned, torch.randn(*space.input_shape, device=device))
    for info in space.groups:
        n_drop = info.channels - kept.get(info.root, info.channels)
        if n_drop <= 0:
            continue
        order = info.order if use_order else tuple(range(info.channels - 1, -1, -1))
        layer = pruned.get_submodule(info.root)
        pruner = dg.get_pruner_of_module(layer)
        group = dg.get_pruning_group(layer, pruner.prune_out_channels, idxs=sorted(order[:n_drop]))
        group.prune()
    return pruned


def check_policy(space: PruneSpace, keep: dict[str, float]) -> None:
    """Groups a policy does not name keep every channel, but a group the model does not have means
    the policy was searched on another architecture."""
    unknown = sorted(set(keep) - {g.root for g in space.groups})
    if unknown:
        raise CompressError(f"the policy names {len(unknown)} group(s) this model does not have "
                            f"(first: {unknown[0]}): it was searched on another architecture")


def apply_policy(model: nn.Module, space: PruneSpace, keep: dict[str, float]) -> nn.Module:
    """Physically prune a copy of `model` to the keep ratios of a policy."""
    check_policy(space, keep)
    return prune_to_counts(model, space, space.kept_channels(keep))


def count_macs(model: nn.Module, input_shape: tuple[int, ...] = (1, 3, 32, 32)) -> tuple[float, float]:
    """MACs and parameters by torch-pruning's counter (the number every budget is checked with)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, torch.randn(*input_shape, device=device))
    return float(macs), float(params)


def importance_keep(model: nn.Module, space: PruneSpace, target: float, min_keep: float = 0.05,
                    steps: int = 100) -> dict[str, float]:
    """DepGraph's own recipe as a policy: torch-pruning's pruner ranks the channels of all groups
    together by group L2 norm (`GroupMagnitudeImportance`, normalised per group, global pruning)
    and removes them a small step at a time until its MACs counter is within `target` of the
    unpruned model's (by `space.predict_macs`, which matches the counter and costs nothing). The
    channels each group kept, as keep ratios, go through the same budget fit as every other
    method's policy."""
    pruned = copy.deepcopy(model).eval()
    device = next(pruned.parameters()).device
    example = torch.randn(*space.input_shape, device=device)
    pruner = tp.pruner.BasePruner(
        pruned, example, importance=tp.importance.GroupMagnitudeImportance(p=2), global_pruning=True,
        pruning_ratio=1.0 - min_keep, max_pruning_ratio=1.0 - min_keep, iterative_steps=steps,
        ignored_layers=ignored_layers(pruned, _classes(model)), customized_pruners=CUSTOM_PRUNERS,
        round_to=space.channel_multiple if space.channel_multiple > 1 else None)
    def keep() -> dict[str, float]:
        return {g.root: _out_channels(pruned.get_submodule(g.root)) / g.channels for g in space.groups}

    with torch.enable_grad():
        for _ in range(steps):
            if space.predict_macs(keep()) <= target * space.base_macs:
                break
            pruner.step()
    return keep()


def _classes(model: nn.Module) -> int:
    """The classifier's width: the last Linear's outputs."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features


def _out_channels(layer: nn.Module) -> int:
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
