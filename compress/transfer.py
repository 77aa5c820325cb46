"""Transfer: a policy network searched on one network (ResNet-20) proposes keep ratios for another
of its family (ResNet-56, ResNet-110) without any search. The encoders work node by node on
features of fixed length, so the same weights read a graph of any size; the proposal is the
policy's mean action (no sampling), fitted to the budget like every search's proposals."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compress.agent import AgentConfig, PPOAgent
from compress.budget import LatencyFn, fit_budget
from compress.errors import CompressError
from compress.graph import build_graph
from compress.models import family
from compress.prune import PruneSpace
from compress.search import SearchConfig, budget_cost, check_budget


@dataclass(frozen=True)
class Transferred:
    keep: dict[str, float]   # fitted keep ratios for the new network's groups
    source_arch: str         # the network the agent was searched on
    method: str              # its encoder (gnn, mlp, ...)
    macs_ratio: float        # predicted MACs kept (the counter agrees: tests)

    def to_json(self, target: float, arch: str, channel_multiple: int) -> dict:
        """A search file's fields that `finetune` and `export --policy` read, plus where it came from."""
        return {"best_keep": self.keep, "channel_multiple": channel_multiple, "target": target,
                "method": f"transfer:{self.method}", "arch": arch, "source_arch": self.source_arch,
                "best_macs_ratio": self.macs_ratio}


def check_family(source_arch: str, arch: str) -> None:
    if family(source_arch) != family(arch):
        raise CompressError(f"the agent was searched on {source_arch} ({family(source_arch)} family); "
                            f"{arch} is outside that family, so its policy does not transfer")


def _policy_net(agent: dict, model: nn.Module, space: PruneSpace) -> PPOAgent:
    """The searched policy network, rebuilt on the new network's graph."""
    graph = build_graph(model, space)
    if graph.x.shape[1] != agent["in_dim"]:
        raise CompressError(f"the agent reads {agent['in_dim']} node features, this version builds "
                            f"{graph.x.shape[1]}: search again with this version")
    policy = PPOAgent(graph, AgentConfig(**agent["config"]))
    policy.net.load_state_dict(agent["state_dict"])
    return policy


def transfer_policy(agent: dict, model: nn.Module, space: PruneSpace, arch: str, target: float,
                    latency_fn: LatencyFn | None = None, min_speedup: float | None = None) -> Transferred:
    """Keep ratios for `model` (architecture `arch`) from a searched agent (`store.load_agent`),
    meeting `target` of its MACs (and, with a latency function, `min_speedup`)."""
    check_family(agent["arch"], arch)
    cfg = SearchConfig(method=agent["method"], target=target, min_speedup=min_speedup,
                       min_keep=agent["config"]["min_keep"])
    check_budget(space, cfg, latency_fn)
    with torch.no_grad():
        proposal = _policy_net(agent, model, space).greedy()
    keep = fit_budget(proposal, budget_cost(space, cfg, latency_fn), space.base_macs, target, cfg.min_keep,
                      steps=space.steps())
    return Transferred(keep, agent["arch"], agent["method"], space.predict_macs(keep) / space.base_macs)
