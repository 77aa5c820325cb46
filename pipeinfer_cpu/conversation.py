"""A conversation (plain data, owned by the user-facing process) and the pure decisions about
fitting it into the model's context and reusing the KV cache the stages already hold.

Context limit policy: when the conversation plus the room kept for the answer does not fit the
context, the oldest user/assistant turns are dropped (never summarised) until it fits; the
system message is always kept. Dropped turns stay in the history (and in /save) but the model no
longer sees them, and they stay dropped, so the rendered prefix is stable from turn to turn. A
single message too long for the context is refused with a clear error and the session goes on.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from pipeinfer_cpu.errors import UserError

ROLES = ("user", "assistant")

Message = tuple[str, str]
Render = Callable[[Sequence[Message]], list[int]]


class ContextLengthExceeded(UserError):
    """A prompt and the answer asked for do not fit the context (and nothing may be dropped)."""


@dataclass(frozen=True)
class Turn:
    role: str  # "user" or "assistant"
    content: str


@dataclass(frozen=True)
class Conversation:
    """The system message and the turns so far (plain data: every change makes a new one)."""

    system: str | None = None
    turns: tuple[Turn, ...] = ()

    def with_turn(self, role: str, content: str) -> Conversation:
        return replace(self, turns=self.turns + (Turn(role, content),))

    def with_system(self, text: str | None) -> Conversation:
        return replace(self, system=text or None)

    def cleared(self) -> Conversation:
        """The same system message, no turns (what /reset leaves)."""
        return Conversation(self.system)

    def messages(self, first: int = 0) -> list[Message]:
        """(role, content) pairs the model sees: the system message, then turns[first:]."""
        head = [("system", self.system)] if self.system else []
        return head + [(t.role, t.content) for t in self.turns[first:]]


def conversation_to_json(conversation: Conversation) -> dict[str, Any]:
    return {"system": conversation.system,
            "turns": [{"role": t.role, "content": t.content} for t in conversation.turns]}


def conversation_from_json(data: Any) -> Conversation:
    """The inverse of conversation_to_json; a wrong shape is a UserError saying what is wrong."""
    if not isinstance(data, dict) or not isinstance(data.get("turns"), list):
        raise UserError('a transcript is a JSON object {"system": ..., "turns": [{"role": ..., "content": ...}]}')
    system = data.get("system")
    if system is not None and not isinstance(system, str):
        raise UserError('the transcript\'s "system" must be a string or null')
    turns = []
    for index, turn in enumerate(data["turns"]):
        if (not isinstance(turn, dict) or turn.get("role") not in ROLES
                or not isinstance(turn.get("content"), str)):
            raise UserError(f'turn {index + 1} of the transcript is not {{"role": "user"|"assistant", '
                            f'"content": "..."}}')
        turns.append(Turn(turn["role"], turn["content"]))
    return Conversation(system or None, tuple(turns))


# -- pure decisions -------------------------------------------------------------------------------

@dataclass(frozen=True)
class FeedPlan:
    """What to do with the KV cache for a new prompt: keep its first `keep` tokens, feed `feed`."""

    keep: int
    feed: tuple[int, ...]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def plan_feed(kv_tokens: Sequence[int], prompt: Sequence[int]) -> FeedPlan:
    """Reuse the longest common prefix; always feed at least one token (its logits give the answer)."""
    if not prompt:
        raise ValueError("empty prompt")
    keep = min(common_prefix(kv_tokens, prompt), len(prompt) - 1)
    return FeedPlan(keep, tuple(prompt[keep:]))


def answer_reserve(n_ctx: int, max_tokens: int, slack: int) -> int:
    """Room kept free for the answer: -n tokens, but at most a quarter of the context, plus slack."""
    return min(max_tokens, max(1, n_ctx // 4)) + slack


def fit_window(render: Render, conversation: Conversation, first: int, n_ctx: int,
               reserve: int) -> tuple[int, list[int]]:
    """The first turn the model sees and the rendered prompt, dropping the oldest turns until it fits.

    Candidate starts are `first` and every later user turn (so pairs go together); the last turn
    (the new message) is always kept. Raises UserError when even that alone does not fit.
    """
    last = len(conversation.turns) - 1
    starts = [first] + [i for i in range(first + 1, last + 1) if conversation.turns[i].role == "user"]
    tokens: list[int] = []
    for start in starts:
        tokens = render(conversation.messages(start))
        if len(tokens) + reserve <= n_ctx:
            return start, tokens
    raise UserError(f"this message is too long: it takes {len(tokens)} tokens (with the template and any system "
                    f"message) and {reserve} are kept for the answer, but the context holds {n_ctx} (--ctx-size)")


def plain_template(messages: Sequence[Message], add_assistant: bool = True) -> str:
    """A template-free rendering for models without a chat template."""
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    text = "".join(f"{names.get(role, role)}: {content}\n\n" for role, content in messages)
    return text + ("Assistant:" if add_assistant else "")
