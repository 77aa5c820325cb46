"""The search harness shared by the agent and the baselines: propose keep ratios, fit them to the
FLOPs budget, prune, recalibrate BatchNorm, score on the held-out split, keep the best."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from torch import nn
from tqdm import tqdm

from compress.agent import AgentConfig, PPOAgent
from compress.baselines import FixedProposer, RandomProposer, UniformProposer
from compress.budget import LatencyFn, MacsFn, fit_budget, reward, with_latency_bound
from compress.encoder import ENCODERS
from compress.errors import BudgetError
from compress.finetune import DeviceData, evaluate, recalibrate_bn
from compress.graph import NetGraph
from compress.prune import PruneSpace, apply_policy, count_macs, importance_keep
from compress.store import atomic_write, save_agent, write_json

METHODS = ("gnn", "mlp", "random", "uniform", "depgraph")  # a full run; the other encoders on request
DETERMINISTIC = ("uniform", "depgraph")  # one policy each: evaluated once

Evaluator = Callable[[dict[str, float]], float]


class Proposer(Protocol):
    def propose(self) -> dict[str, float]: ...

    def feedback(self, reward: float) -> None: ...


@dataclass(frozen=True)
class SearchConfig:
    method: str = "gnn"
    target: float = 0.5  # fraction of the unpruned MACs to keep
    episodes: int = 64
    min_keep: float = 0.05
    seed: int = 0
    calib_batches: int = 10
    min_speedup: float | None = None  # also bound predicted latency (needs a latency function)
    agent: AgentConfig = field(default_factory=AgentConfig)


@dataclass(frozen=True)
class SearchResult:
    method: str
    target: float
    best_keep: dict[str, float]
    best_reward: float
    best_macs_ratio: float
    rewards: list[float]
    best_so_far: list[float]
    evaluations: int
    seconds: float
    channel_multiple: int  # the rounding the policy was searched with; fine-tuning must reuse it
    min_speedup: float | None = None  # the latency bound searched under, if any
    predicted_speedup: float | None = None  # of the best policy, by the latency table, if one was used
    agent: dict | None = field(default=None, repr=False)  # the policy network after the search (transfer)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "agent"}


def prior_policy(model: nn.Module, space: PruneSpace, cfg: SearchConfig) -> dict[str, float] | None:
    """What a method needs from the weights before its search: DepGraph's importance ranking."""
    return importance_keep(model, space, cfg.target, cfg.min_keep) if cfg.method == "depgraph" else None


def make_proposer(graph: NetGraph, cfg: SearchConfig, prior: dict[str, float] | None = None) -> Proposer:
    if cfg.method in ENCODERS:
        agent_cfg = AgentConfig(**{**asdict(cfg.agent), "encoder": cfg.method, "min_keep": cfg.min_keep,
                                   "seed": cfg.seed})
        return PPOAgent(graph, agent_cfg)
    if cfg.method == "random":
        return RandomProposer(graph, cfg.min_keep, cfg.seed)
    if cfg.method == "uniform":
        return UniformProposer(graph)
    if cfg.method == "depgraph":
        if prior is None:
            raise ValueError("the depgraph method needs its policy (search.prior_policy)")
        return FixedProposer(prior)
    raise ValueError(f"unknown search method {cfg.method!r}; expected one of {', '.join(METHODS)}")


def pruned_evaluator(model: nn.Module, space: PruneSpace, calib: DeviceData, holdout: DeviceData,
                     calib_batches: int = 10) -> Evaluator:
    """Held-out accuracy of the pruned model after BN recalibration, without fine-tuning."""

    def evaluate_keep(keep: dict[str, float]) -> float:
        pruned = apply_policy(model, space, keep)
        recalibrate_bn(pruned, calib, calib_batches)
        return evaluate(pruned, holdout)

    return evaluate_keep


def budget_cost(space: PruneSpace, cfg: SearchConfig, latency_fn: LatencyFn | None) -> MacsFn:
    """What `fit_budget` bounds: the MACs, or with `cfg.min_speedup` the MACs and the predicted
    latency together."""
    if cfg.min_speedup is None:
        return space.predict_macs
    if latency_fn is None:
        raise ValueError("a minimum speed-up needs a latency function (a latency table)")
    base = latency_fn({g.root: 1.0 for g in space.groups})
    return with_latency_bound(space.predict_macs, space.base_macs, cfg.target, latency_fn,
                              base / cfg.min_speedup)


def check_budget(space: PruneSpace, cfg: SearchConfig, latency_fn: LatencyFn | None = None) -> None:
    """Raise BudgetError now, before data are loaded, if the budget (FLOPs, and with
    `cfg.min_speedup` the predicted speed-up) cannot be met."""
    if cfg.min_speedup is not None and latency_fn is not None:
        base = latency_fn({g.root: 1.0 for g in space.groups})
        fastest = latency_fn({g.root: cfg.min_keep for g in space.groups})
        if base / fastest < cfg.min_speedup:
            raise BudgetError(f"speed-up {cfg.min_speedup:g}x is unreachable: keeping {cfg.min_keep:g} of "
                              f"every group is predicted to run only {base / fastest:.2f}x faster")
    fit_budget({g.root: 1.0 for g in space.groups}, budget_cost(space, cfg, latency_fn), space.base_macs,
               cfg.target, cfg.min_keep)


def run_search(space: PruneSpace, graph: NetGraph, evaluate_keep: Evaluator, cfg: SearchConfig,
               progress: bool = True, latency_fn: LatencyFn | None = None,
               prior: dict[str, float] | None = None) -> SearchResult:
    """Run `cfg.episodes` episodes (one for the deterministic baselines). With `cfg.min_speedup`,
    every policy is also fitted under that predicted speed-up; `prior` is `prior_policy`'s."""
    check_budget(space, cfg, latency_fn)
    cost = budget_cost(space, cfg, latency_fn)
    proposer = make_proposer(graph, cfg, prior)
    episodes = 1 if cfg.method in DETERMINISTIC else cfg.episodes
    rewards, best_curve = [], []
    best: tuple[float, dict[str, float], float] = (float("-inf"), {}, 1.0)
    start = time.time()
    bar = tqdm(range(episodes), desc=f"search[{cfg.method}]", disable=not progress, leave=False)
    for _ in bar:
        keep = fit_budget(proposer.propose(), cost, space.base_macs, cfg.target, cfg.min_keep,
                          steps=space.steps())
        macs_ratio = space.predict_macs(keep) / space.base_macs
        value = reward(evaluate_keep(keep), macs_ratio, cfg.target)
        proposer.feedback(value)
        rewards.append(value)
        if value > best[0]:
            best = (value, keep, macs_ratio)
        best_curve.append(best[0])
        bar.set_postfix(reward=f"{value:.2f}", best=f"{best[0]:.2f}")
    speedup = None
    if latency_fn is not None and best[1]:
        speedup = latency_fn({g.root: 1.0 for g in space.groups}) / latency_fn(best[1])
    agent = proposer.snapshot() if isinstance(proposer, PPOAgent) else None
    return SearchResult(cfg.method, cfg.target, best[1], best[0], best[2], rewards, best_curve,
                        episodes, time.time() - start, space.channel_multiple, cfg.min_speedup, speedup, agent)


def verify_budget(model: nn.Module, space: PruneSpace, keep: dict[str, float]) -> float:
    """MACs ratio of the physically pruned model by torch-pruning's own counter."""
    macs, _ = count_macs(apply_policy(model, space, keep), space.input_shape)
    return macs / space.base_macs


def save_search(result: SearchResult, json_path: str | Path, png_path: str | Path | None = None,
                arch: str | None = None) -> None:
    """Best policy and learning curve as JSON (with the architecture searched, which `finetune` and
    `export --policy` check), and the curve as a PNG (both written atomically); an agent's policy
    network beside them (`<json stem>.agent.pt`, for `compress transfer`)."""
    write_json(json_path, {**result.to_json(), **({"arch": arch} if arch else {})})
    if result.agent is not None and arch is not None:
        save_agent(Path(json_path).with_suffix(".agent.pt"), result.agent, arch, result.method,
                   result.target, result.channel_multiple)
    if png_path is not None:
        plot_curves({result.method: result}, png_path)


def plot_curves(results: dict[str, SearchResult], png_path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, res in results.items():
        if len(res.rewards) == 1:  # deterministic baseline: one evaluation, drawn as a level
            ax.axhline(res.rewards[0], linestyle="--", color="gray", label=f"{name} (single policy)")
            continue
        xs = range(1, len(res.rewards) + 1)
        line, = ax.plot(xs, res.best_so_far, label=f"{name} (best so far)")
        ax.scatter(xs, res.rewards, s=6, alpha=0.4, color=line.get_color())
    ax.set_xlabel("episode")
    ax.set_ylabel("held-out accuracy after BN recalibration (%)")
    ax.set_title(title or "search learning curves")
    ax.legend()
    fig.tight_layout()
    path = atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path
