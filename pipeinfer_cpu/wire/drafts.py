"""Draft requests and replies between the head and the draft rank (Tag.DRAFT): flat int64/float64 buffers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DraftRequest:
    request_id: int
    context: tuple[int, ...]
    max_new: int
    min_prob: float  # stop once the draft's top-1 probability falls below this (after one token)


@dataclass(frozen=True)
class DraftReply:
    """Greedy draft tokens with their probabilities, and the runner-up at each drafted position
    (the candidates for a branch of a draft token tree)."""

    request_id: int
    tokens: tuple[int, ...]
    probs: tuple[float, ...]
    second_tokens: tuple[int, ...] = ()
    second_probs: tuple[float, ...] = ()


def encode_request(request: DraftRequest) -> np.ndarray:
    head = [request.request_id, request.max_new, int(request.min_prob * 1e6), len(request.context)]
    return np.asarray(head + list(request.context), dtype=np.int64).view(np.uint8)


def decode_request(data: np.ndarray) -> DraftRequest:
    ints = data.view(np.int64)
    return DraftRequest(int(ints[0]), tuple(int(v) for v in ints[4:4 + int(ints[3])]), int(ints[1]), ints[2] / 1e6)


def encode_reply(reply: DraftReply) -> np.ndarray:
    seconds = _padded(reply.second_tokens, len(reply.tokens), -1)
    ints = np.asarray([reply.request_id, len(reply.tokens), *reply.tokens, *seconds], dtype=np.int64)
    floats = np.asarray([*reply.probs, *_padded(reply.second_probs, len(reply.tokens), 0.0)], dtype=np.float64)
    return np.concatenate([ints.view(np.uint8), floats.view(np.uint8)])


def _padded(values: tuple, n: int, fill) -> list:
    return list(values) + [fill] * (n - len(values))


def decode_reply(data: np.ndarray) -> DraftReply:
    n = int(data[8:16].view(np.int64)[0])
    ints = data[: (2 + 2 * n) * 8].view(np.int64)
    floats = data[(2 + 2 * n) * 8:].view(np.float64)
    return DraftReply(int(ints[0]), tuple(int(v) for v in ints[2:2 + n]), tuple(float(p) for p in floats[:n]),
                      tuple(int(v) for v in ints[2 + n:]), tuple(float(p) for p in floats[n:]))
