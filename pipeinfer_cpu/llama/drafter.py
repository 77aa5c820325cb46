"""The draft model: greedy guesses of the target's next tokens, on the draft rank or in the head's process.

The drafter keeps its own KV cache in step with whatever context it is asked to continue: it
keeps the longest common prefix with what it already holds and feeds only the rest.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from pipeinfer_cpu.llama.runtime import Stage
from pipeinfer_cpu.wire.drafts import DraftReply, DraftRequest


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
