"""One llama-family decoder in torch, for the target (teacher) and the draft alike.

Weights keep their GGUF names and layouts, so a draft made here goes back into a GGUF unchanged:
llama.cpp's llama files store q/k permuted for its NORM rotary type, which rotates adjacent pairs
(x[2i], x[2i+1]), and that is the rotation done here.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeinfer_cpu.draftmake.targetfile import DecoderShape

BLOCK_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                 "ffn_down")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rotate(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary embedding over adjacent pairs; x [B, H, T, D], positions [B, T]."""
    d = x.shape[-1]
    freqs = base ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angles = positions[:, None, :, None].float() * freqs  # [B, 1, T, D/2]
    cos, sin = angles.cos(), angles.sin()
    pairs = x.float().unflatten(-1, (d // 2, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).to(x.dtype)


class Decoder(nn.Module):
    """Blocks under their GGUF names (`blk.{i}.attn_q.weight` ...), the embedding tied to the head.

    `forward` takes tokens [B, T], their positions [B, T] and a boolean mask [B, 1, T, S] of the keys
    each query sees; with `cache` (a list of (k, v) buffers [B, H_kv, S_max, D] per block) it writes
    the new keys at `start` and attends over the buffers' first `start + T` slots."""

    def __init__(self, shape: DecoderShape, weights: Mapping[str, np.ndarray]):
        super().__init__()
        self.shape = shape
        self.params = nn.ParameterDict()
        for name, value in weights.items():
            if name == "output.weight":  # tied: the head is the embedding
                continue
            grad = name != "token_embd.weight"  # the target's: exported as its own bytes, so never trained
            # torch.tensor copies: gguf's arrays are read-only memory maps, which an optimiser must not write
            self.params[name.replace(".", "__")] = nn.Parameter(torch.tensor(np.asarray(value)),
                                                                requires_grad=grad)

    def weight(self, name: str) -> torch.Tensor:
        return self.params[name.replace(".", "__")]

    def named_weights(self) -> dict[str, torch.Tensor]:
        return {key.replace("__", "."): value for key, value in self.params.items()}

    def _attention(self, i: int, x: torch.Tensor, positions, mask, cache, start: int) -> torch.Tensor:
        s, w = self.shape, lambda n: self.weight(f"blk.{i}.{n}.weight")
        b, t, _ = x.shape
        q = F.linear(x, w("attn_q")).view(b, t, s.n_head, s.head_dim).transpose(1, 2)
        k = F.linear(x, w("attn_k")).view(b, t, s.n_head_kv, s.head_dim).transpose(1, 2)
        v = F.linear(x, w("attn_v")).view(b, t, s.n_head_kv, s.head_dim).transpose(1, 2)
        q, k = rotate(q, positions, s.rope_base), rotate(k, positions, s.rope_base)
        if cache is not None:
            keys, values = cache[i]
            keys[:, :, start:start + t], values[:, :, start:start + t] = k, v
            k, v = keys[:, :, :start + t], values[:, :, :start + t]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=s.n_head != s.n_head_kv)
        return F.linear(out.transpose(1, 2).reshape(b, t, s.n_embd), w("attn_output"))

    def hidden(self, tokens, positions, mask, cache=None, start: int = 0) -> torch.Tensor:
        s = self.shape
        x = F.embedding(tokens, self.weight("token_embd.weight"))
        for i in range(s.n_layer):
            w = lambda n: self.weight(f"blk.{i}.{n}.weight")  # noqa: E731
            x = x + self._attention(i, rms_norm(x, w("attn_norm"), s.rms_eps), positions, mask, cache, start)
            h = rms_norm(x, w("ffn_norm"), s.rms_eps)
            x = x + F.linear(F.silu(F.linear(h, w("ffn_gate"))) * F.linear(h, w("ffn_up")), w("ffn_down"))
        return rms_norm(x, self.weight("output_norm.weight"), s.rms_eps)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight("token_embd.weight"))

    def forward(self, tokens, positions, mask, cache=None, start: int = 0) -> torch.Tensor:
        return self.head(self.hidden(tokens, positions, mask, cache, start))

    def new_cache(self, batch: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        s, like = self.shape, self.weight("token_embd.weight")
        size = (batch, s.n_head_kv, length, s.head_dim)
        return [(like.new_zeros(size), like.new_zeros(size)) for _ in range(s.n_layer)]


def causal_mask(valid: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] mask for rows whose `valid` [B, T] marks real tokens (padding on either side):
    each query sees the real keys at or before it, and a pad query sees itself (a row with no key
    at all would be NaN)."""
    t = valid.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(t, dtype=torch.bool, device=valid.device)
    return ((causal & valid[:, None, :]) | eye)[:, None]


def positions_of(valid: torch.Tensor) -> torch.Tensor:
    """Each real token's position counted from its row's first real token (pads get 0)."""
    return (valid.long().cumsum(1) - 1).clamp(min=0)


def draft_weights(target: Mapping[str, np.ndarray], layers: tuple[int, ...]) -> dict[str, np.ndarray]:
    """A draft initialised from some of the target's blocks (renumbered from 0), its embedding and
    output norm."""
    weights = {name: target[name] for name in ("token_embd.weight", "output_norm.weight")}
    for new, old in enumerate(layers):
        for part in BLOCK_TENSORS:
            weights[f"blk.{new}.{part}.weight"] = target[f"blk.{old}.{part}.weight"].copy()
    return weights


def spread_layers(n_layer: int, n_draft: int) -> tuple[int, ...]:
    """`n_draft` block indices spread evenly over the target's, first and last included."""
    return tuple(int(i) for i in np.linspace(0, n_layer - 1, n_draft).round())
