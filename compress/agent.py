"""PPO agent whose action is one keep ratio per pruning group.

Why PPO rather than DDPG: the action is a variable-length vector produced node by node by a graph
encoder, and one episode (prune, recalibrate BN, score on the held-out split) is expensive, so the
search sees tens of episodes. A Gaussian policy per node with PPO's clipped objective is stable
with such few on-policy samples and needs no critic over (graph, action) pairs nor a replay buffer
(DDPG's critic would have to learn from the same handful of episodes). GNN-RL's authors used PPO too.
Each episode is a single step (the whole policy at once), so the advantage is the reward minus
the batch mean, normalised — no learned value function is needed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from compress.encoder import make_encoder
from compress.graph import NetGraph


@dataclass(frozen=True)
class AgentConfig:
    encoder: str = "gnn"  # one of compress.encoder.ENCODERS; "mlp" has no graph encoder
    hidden: int = 64
    lr: float = 3e-3
    batch_episodes: int = 8
    ppo_epochs: int = 8
    clip: float = 0.2
    init_std: float = 0.6
    min_std: float = 0.05
    entropy_coef: float = 0.0
    min_keep: float = 0.05
    seed: int = 0


class PolicyNet(nn.Module):
    def __init__(self, in_dim: int, cfg: AgentConfig, layer_dim: int = 0) -> None:
        super().__init__()
        self.encoder = make_encoder(cfg.encoder, in_dim, cfg.hidden, layer_dim)
        self.head = nn.Sequential(nn.Linear(self.encoder.out_dim, cfg.hidden), nn.Tanh(),
                                  nn.Linear(cfg.hidden, 1))
        self.log_std = nn.Parameter(torch.tensor(float(cfg.init_std)).log())

    def forward(self, graph: NetGraph) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.head(self.encoder(graph)).squeeze(-1)
        return mean, self.log_std.expand_as(mean)


class PPOAgent:
    """propose() -> keep ratios; feedback(reward) after each episode; updates every batch."""

    def __init__(self, graph: NetGraph, cfg: AgentConfig) -> None:
        self.graph, self.cfg = graph, cfg
        torch.manual_seed(cfg.seed)
        layer_dim = graph.layers.x.shape[1] if graph.layers is not None else 0
        self.net = PolicyNet(graph.x.shape[1], cfg, layer_dim)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self._buffer: list[tuple[torch.Tensor, float, float]] = []
        self._pending: tuple[torch.Tensor, float] | None = None

    def _dist(self) -> torch.distributions.Normal:
        mean, log_std = self.net(self.graph)
        return torch.distributions.Normal(mean, log_std.exp().clamp_min(self.cfg.min_std))

    def to_keep(self, action: torch.Tensor) -> dict[str, float]:
        ratios = self.cfg.min_keep + (1 - self.cfg.min_keep) * torch.sigmoid(action)
        return {root: float(r) for root, r in zip(self.graph.roots, ratios)}

    def propose(self) -> dict[str, float]:
        with torch.no_grad():
            dist = self._dist()
            noise = torch.randn(dist.mean.shape, generator=self.gen)
            action = dist.mean + dist.stddev * noise
            self._pending = (action, float(dist.log_prob(action).sum()))
        return self.to_keep(action)

    def snapshot(self) -> dict:
        """What rebuilds this policy network on another graph: its configuration, input sizes, weights."""
        layer_dim = self.graph.layers.x.shape[1] if self.graph.layers is not None else 0
        return {"config": asdict(self.cfg), "in_dim": int(self.graph.x.shape[1]), "layer_dim": int(layer_dim),
                "state_dict": {k: v.detach().clone() for k, v in self.net.state_dict().items()}}

    def greedy(self) -> dict[str, float]:
        with torch.no_grad():
            return self.to_keep(self._dist().mean)

    def feedback(self, reward: float) -> None:
        if self._pending is None:
            raise RuntimeError("feedback() called without a pending propose()")
        action, logp = self._pending
        self._pending = None
        self._buffer.append((action, logp, reward))
        if len(self._buffer) >= self.cfg.batch_episodes:
            self._update()
            self._buffer.clear()

    def _update(self) -> None:
        actions = torch.stack([a for a, _, _ in self._buffer])
        old_logp = torch.tensor([lp for _, lp, _ in self._buffer])
        rewards = torch.tensor([r for _, _, r in self._buffer])
        adv = (rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-8)
        for _ in range(self.cfg.ppo_epochs):
            dist = self._dist()
            logp = dist.log_prob(actions).sum(dim=1)
            ratio = (logp - old_logp).exp()
            clipped = ratio.clamp(1 - self.cfg.clip, 1 + self.cfg.clip)
            loss = -torch.min(ratio * adv, clipped * adv).mean() - self.cfg.entropy_coef * dist.entropy().mean()
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
