"""The draft model: greedy guesses of the target's next tokens, on its own rank (or in-process).

The drafter keeps its own KV cache in step with whatever context it is asked to continue: it
keeps the longest common prefix with what it already holds and feeds only the rest. A newer
request supersedes an older one that is still being drafted (the head only wants the latest).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from pipeinfer_cpu.wire import runs as P
from pipeinfer_cpu.llama.runtime import Stage
from pipeinfer_cpu.wire.runs import HEAD, Tag
from pipeinfer_cpu.wire.transport import Transport, wait


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


def top2(logits: np.ndarray) -> tuple[int, float, int, float]:
    """The two most likely tokens and their probabilities under softmax."""
    second, first = (int(i) for i in np.argpartition(logits, -2)[-2:])
    if logits[second] > logits[first]:
        first, second = second, first
    shifted = np.exp(logits.astype(np.float64) - float(logits[first]))
    total = shifted.sum()
    return first, float(1.0 / total), second, float(shifted[second] / total)


class Drafter:
    """Greedy drafting over a whole (small) model held in one llama.cpp stage."""

    def __init__(self, stage: Stage, n_batch: int) -> None:
        self.stage = stage
        self.n_batch = n_batch
        self.known: list[int] = []  # tokens in the draft's KV sequence 0

    def draft(self, request: DraftRequest, abandon: Callable[[], bool] = lambda: False) -> DraftReply | None:
        """Up to max_new greedy tokens continuing the context; None if abandoned for a newer request."""
        logits = self._sync(list(request.context))
        tokens: list[int] = []
        probs: list[float] = []
        second_tokens: list[int] = []
        second_probs: list[float] = []
        while True:
            token, prob, second, second_prob = top2(logits)
            if tokens and prob < request.min_prob:
                break
            tokens.append(token)
            probs.append(prob)
            second_tokens.append(second)
            second_probs.append(second_prob)
            if len(tokens) >= request.max_new:
                break
            if abandon():
                return None
            logits = self._feed([token])
        return DraftReply(request.request_id, tuple(tokens), tuple(probs), tuple(second_tokens), tuple(second_probs))

    def _sync(self, context: list[int]) -> np.ndarray:
        """Make the KV cache hold context[:-1] plus context[-1], returning the last position's logits."""
        common = 0
        limit = min(len(self.known), len(context) - 1)  # always re-feed the last token for its logits
        while common < limit and self.known[common] == context[common]:
            common += 1
        if common < len(self.known):
            self.stage.seq_rm(0, common, -1)
            del self.known[common:]
        return self._feed(context[common:])

    def _feed(self, tokens: list[int]) -> np.ndarray:
        logits = None
        for at in range(0, len(tokens), self.n_batch):
            chunk = tokens[at:at + self.n_batch]
            start = len(self.known)
            outputs = [i == len(chunk) - 1 for i in range(len(chunk))]
            logits = self.stage.decode(list(range(start, start + len(chunk))), [[0]] * len(chunk),
                                       tokens=chunk, outputs=outputs)
            self.known.extend(chunk)
        assert logits is not None
        return logits[-1]

    def reset(self) -> None:
        self.stage.clear()
        self.known = []


class LocalDraftClient:
    """Drafting in the head's own process (tests, and single-machine use without a draft rank)."""

    def __init__(self, drafter: Drafter) -> None:
        self.drafter = drafter
        self._reply: DraftReply | None = None

    def request(self, request: DraftRequest) -> None:
        self._reply = self.drafter.draft(request)

    def poll(self) -> DraftReply | None:
        reply, self._reply = self._reply, None
        return reply


class RemoteDraftClient:
    """Drafting on a dedicated rank: requests and replies travel on Tag.DRAFT."""

    def __init__(self, transport: Transport, rank: int) -> None:
        self.transport = transport
        self.rank = rank

    def request(self, request: DraftRequest) -> None:
        self.transport.send(self.rank, int(Tag.DRAFT), encode_request(request))

    def poll(self) -> DraftReply | None:
        message = self.transport.poll([(self.rank, Tag.DRAFT)])
        return None if message is None else decode_reply(message.data)


def serve_drafts(transport: Transport, drafter: Drafter) -> None:
    """The draft rank's loop: answer draft requests until the head says stop."""
    channels = [(HEAD, Tag.CONTROL), (HEAD, Tag.DRAFT)]
    while True:
        message = wait(transport, channels, timeout_s=None)
        if message.tag == Tag.CONTROL:
            command = P.decode_json(message.data)
            if command["type"] == "shutdown":
                transport.send(HEAD, int(Tag.REPLY), P.encode_json({"type": "bye"}))
                return
            if command["type"] == "reset-stats":
                continue
            if command["type"] == "clear":
                drafter.reset()
            continue
        request = decode_request(message.data)
        reply = drafter.draft(request, abandon=lambda: transport.pending([(HEAD, Tag.DRAFT)]))
        if reply is not None:
            transport.send(HEAD, int(Tag.DRAFT), encode_reply(reply))
