"""A model-free draft (`--draft ngram[:N,K]`): guess the next tokens from where the last few tokens
appeared before, in the prompt or in what was generated (prompt lookup, as llama.cpp's n-gram drafts
and llama-cpp-python's LlamaPromptLookupDecoding do). It runs in the head and costs next to nothing.

For each draft token: look up the last N tokens (then N-1, ... down to 2, or 1 when N is 1) among
the earlier positions of the context; among the tokens that followed the longest n-gram found, propose
the most frequent (the most recent on a tie), with its share of those occurrences as its
probability; append it and look again, up to K tokens or until the share falls below the draft
policy's threshold (the first guess too, unlike a draft model's: a guess that is likely wrong is
not worth a run). Re-looking after each guess follows overlapping repeats ("a b a b a" -> "b a b").

The index covers the context the draft is asked to continue: in chat that is the whole conversation
the stages hold, so earlier turns are looked up too. It follows the context as it changes: the
common prefix is kept, what differs is taken out and the rest added.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from pipeinfer_cpu.errors import UserError
from pipeinfer_cpu.wire.drafts import DraftReply, DraftRequest

_SPEC = re.compile(r"ngram(?::(?P<n>[^,]*),(?P<k>.*))?")


@dataclass(frozen=True)
class NgramSettings:
    n: int = 3  # the longest n-gram looked up
    k: int = 8  # tokens proposed at most (the draft policy may ask for fewer)

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and 1 <= self.n <= 16):
            raise UserError(f"--draft ngram:N,K: N (the n-gram size) must be 1 to 16, got {self.n}")
        if not (isinstance(self.k, int) and 1 <= self.k <= 64):
            raise UserError(f"--draft ngram:N,K: K (tokens proposed) must be 1 to 64, got {self.k}")

    @staticmethod
    def is_spec(text: str) -> bool:
        """Does --draft's value name the n-gram draft (alone, or first before a model: `ngram+MODEL`)?"""
        return text in ("ngram", "ngram+") or text.startswith(("ngram:", "ngram+"))

    @staticmethod
    def split(text: str) -> tuple[str, str | None]:
        """--draft `ngram[:N,K][+MODEL]` as the n-gram part and the model (None: the n-gram draft alone)."""
        ngram, plus, model = text.partition("+")
        if plus and not model:
            raise UserError(f"--draft {text}: name the model after '+', e.g. ngram+qwen2.5-coder-0.5b")
        return ngram, model or None

    @staticmethod
    def parse(text: str) -> NgramSettings:
        """`ngram` or `ngram:N,K`; a bad value is a UserError saying what is expected."""
        found = _SPEC.fullmatch(text)
        if found is None:
            raise UserError(f"--draft {text}: expected ngram or ngram:N,K (e.g. ngram:3,8)")
        if found["n"] is None:
            return NgramSettings()
        try:
            return NgramSettings(int(found["n"]), int(found["k"]))
        except ValueError:
            raise UserError(f"--draft {text}: N and K must be whole numbers, e.g. ngram:3,8") from None

    def label(self) -> str:
        return f"ngram:{self.n},{self.k}"


class NgramDrafter:
    """Prompt-lookup drafting over an index of the context's n-grams (sizes 1..N)."""

    def __init__(self, settings: NgramSettings) -> None:
        self.settings = settings
        self.tokens: list[int] = []  # the context indexed
        # n-gram -> the positions that followed each of its occurrences, in increasing order
        self.followers: dict[tuple[int, ...], list[int]] = {}

    def draft(self, request: DraftRequest) -> DraftReply:
        self._sync(request.context)
        proposed: list[int] = []
        probs: list[float] = []
        seconds: list[int] = []
        second_probs: list[float] = []
        while len(proposed) < min(self.settings.k, request.max_new):
            guess = self._guess(proposed)
            if guess is None or guess[1] < request.min_prob:  # the first too: a wrong guess costs a run
                break
            token, prob, second, second_prob = guess
            proposed.append(token)
            probs.append(prob)
            seconds.append(second)
            second_probs.append(second_prob)
        return DraftReply(request.request_id, tuple(proposed), tuple(probs), tuple(seconds), tuple(second_probs))

    def _guess(self, proposed: list[int]) -> tuple[int, float, int, float] | None:
        """The next token after context + proposed: (token, share, runner-up, its share), or None."""
        tail = self.tokens[-self.settings.n:] + proposed
        smallest = 2 if self.settings.n > 1 else 1
        for size in range(min(self.settings.n, len(tail)), smallest - 1, -1):
            after = [self.tokens[at] for at in self.followers.get(tuple(tail[-size:]), ()) if at < len(self.tokens)]
            if after:
                return _most_frequent(after)
        return None

    def _sync(self, context: tuple[int, ...]) -> None:
        """Make the index cover exactly `context`: keep the common prefix, drop the rest, add the new."""
        common = 0
        limit = min(len(self.tokens), len(context))
        if list(context[:limit]) == self.tokens[:limit]:
            common = limit
        else:
            while self.tokens[common] == context[common]:
                common += 1
        while len(self.tokens) > common:
            self._forget_last()
        for token in context[common:]:
            self._add(token)

    def _add(self, token: int) -> None:
        self.tokens.append(token)
        end = len(self.tokens)
        for size in range(1, min(self.settings.n, end) + 1):
            self.followers.setdefault(tuple(self.tokens[end - size:]), []).append(end)

    def _forget_last(self) -> None:
        end = len(self.tokens)
        for size in range(1, min(self.settings.n, end) + 1):
            key = tuple(self.tokens[end - size:])
            positions = self.followers[key]
            positions.pop()  # the last one added: `end`
            if not positions:
                del self.followers[key]
        self.tokens.pop()


def _most_frequent(tokens: list[int]) -> tuple[int, float, int, float]:
    """The most frequent token (the latest among equals), its share, and the runner-up (-1: none) and its share."""
    counts = Counter(tokens)
    latest = {token: at for at, token in enumerate(tokens)}
    ranked = sorted(counts, key=lambda token: (counts[token], latest[token]), reverse=True)
    second = ranked[1] if len(ranked) > 1 else -1
    return ranked[0], counts[ranked[0]] / len(tokens), second, counts[second] / len(tokens) if second >= 0 else 0.0
