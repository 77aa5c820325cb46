"""A conversation with the model, and the head-side server that answers chat requests.

The server keeps the KV cache of earlier turns on every stage: each turn renders the whole
conversation with the model's chat template, keeps the longest prefix the stages already hold
and prefills only the rest, so a new turn costs its own tokens, not the conversation's.

Context limit policy: when the conversation plus the room kept for the answer does not fit the
context, the oldest user/assistant turns are dropped (never summarised) until it fits; the
system message is always kept. Dropped turns stay in the history (and in /save) but the model no
longer sees them, and they stay dropped, so the rendered prefix is stable from turn to turn. A
single message too long for the context is refused with a clear error and the session goes on.

Requests and events are plain dicts (JSON objects on the wire):
requests: turn {text, interrupt: already interrupted (Ctrl-C typed with the Enter)}, interrupt, reset, system {text}, load {system, turns}, stats, quit;
events: ready, token {text}, done {stopped_by, answer, stats}, ok, stats, error {message}, bye.
Every request but interrupt gets exactly one final event (token events come before `done`).
"""

from __future__ import annotations

import json
import os
import select
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from pipeinfer_cpu.head.decoding import TextStream
from pipeinfer_cpu.head.engine import SPECULATIVE_MODES, Engine
from pipeinfer_cpu.errors import ModelError, UserError
from pipeinfer_cpu.sampling import SamplingConfig

ROLES = ("user", "assistant")
Message = tuple[str, str]
Render = Callable[[Sequence[Message]], list[int]]
Emit = Callable[[dict], None]
FINAL_EVENTS = ("ready", "done", "ok", "stats", "error", "bye")


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


def make_renderer(vocab) -> tuple[Render, str | None]:
    """Render with the model's own chat template, or the plain fallback and a notice saying so."""
    def with_template(messages: Sequence[Message]) -> list[int]:
        text = vocab.apply_chat_template(list(messages), add_assistant=True)
        return vocab.tokenize(text, add_special=False, parse_special=True)

    def plain(messages: Sequence[Message]) -> list[int]:
        return vocab.tokenize(plain_template(messages), add_special=True, parse_special=False)

    if vocab.chat_template() is None:
        return plain, "the model has no chat template: using a plain 'User:/Assistant:' format"
    try:
        with_template([("user", "hi")])
    except ModelError:
        return plain, "llama.cpp does not know this model's chat template: using a plain 'User:/Assistant:' format"
    return with_template, None


# -- the server -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServerSettings:
    max_tokens: int
    sampling: SamplingConfig
    system: str | None = None


class ChatServer:
    """Owns an Engine and the conversation; answers one request at a time."""

    def __init__(self, engine: Engine, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.conversation = Conversation(settings.system or None)
        self.first = 0  # turns before this one were dropped for the context limit
        self.render, self.notice = make_renderer(engine.vocab)
        self.plain = self.notice is not None
        self.last: dict | None = None

    def ready_event(self) -> dict:
        return {"event": "ready", "model": self.engine.info.name, "mode": self.engine.settings.mode,
                "stages": len(self.engine.stage_ranks) or 1, "n_ctx": self.engine.settings.n_ctx,
                "notice": self.notice}

    def handle(self, request: dict, emit: Emit, should_stop: Callable[[], bool]) -> bool:
        """Answer one request through `emit`; False once the session should end.

        User mistakes become an `error` event; engine and cluster failures propagate.
        """
        kind = request.get("type")
        try:
            if kind == "turn":
                self._turn(_text(request), emit, lambda: bool(request.get("interrupt")) or should_stop())
            elif kind == "reset":
                self._set(self.conversation.cleared(), emit)
            elif kind == "system":
                self._set(self.conversation.with_system(request.get("text")), emit)
            elif kind == "load":
                self._set(conversation_from_json(request), emit)
            elif kind == "stats":
                emit({"event": "stats", "stats": self.last})
            elif kind == "quit":
                emit({"event": "bye"})
                return False
            elif kind != "interrupt":  # a late interrupt, after its answer ended: nothing to stop
                raise UserError(f"unknown request {kind!r}")
        except UserError as exc:
            emit({"event": "error", "message": str(exc)})
        return True

    def _set(self, conversation: Conversation, emit: Emit) -> None:
        """A new conversation; the KV cache is brought in line lazily, by the next turn's prefix."""
        self.conversation = conversation
        self.first = 0
        emit({"event": "ok"})

    def _slack(self) -> int:
        spec = self.engine.settings.spec
        if self.engine.settings.mode in SPECULATIVE_MODES and spec is not None:
            return spec.max_inflight * spec.draft_max + 1
        return 1

    def _turn(self, text: str, emit: Emit, should_stop: Callable[[], bool]) -> None:
        n_ctx = self.engine.settings.n_ctx
        conversation = self.conversation.with_turn("user", text)
        reserve = answer_reserve(n_ctx, self.settings.max_tokens, self._slack())
        first, prompt = fit_window(self.render, conversation, self.first, n_ctx, reserve)
        plan = plan_feed(self.engine.context_tokens, prompt)
        self.engine.truncate_context(plan.keep)
        budget = min(self.settings.max_tokens, n_ctx - len(prompt) - self._slack())
        shown: list[str] = []
        stream = TextStream(self.engine.vocab.piece)

        def on_token(token: int) -> None:
            if not self.engine.vocab.is_end(token):
                piece = stream.push(token)
                if piece:
                    shown.append(piece)
                    emit({"event": "token", "text": piece})

        def stop() -> bool:
            return should_stop() or (self.plain and "\nUser:" in "".join(shown[-8:]))

        generation, stats = self.engine.generate(list(plan.feed), budget, self.settings.sampling, on_token, stop)
        tail = stream.flush()
        if tail:
            shown.append(tail)
            emit({"event": "token", "text": tail})
        answer = "".join(shown).split("\nUser:")[0] if self.plain else "".join(shown)
        self.conversation = conversation.with_turn("assistant", answer)
        self.first = first
        self.last = {**stats.to_json_dict(), "context_tokens": len(prompt), "reused_tokens": plan.keep,
                     "dropped_turns": first, "stopped_by": generation.stopped_by}
        emit({"event": "done", "stopped_by": generation.stopped_by, "answer": answer, "dropped_turns": first})


def _text(request: dict) -> str:
    text = request.get("text")
    if not isinstance(text, str) or not text.strip():
        raise UserError("an empty message: type something (or /help)")
    return text


# -- JSON lines on stdio (the head of an MPI job driven by `chat`) ---------------------------------

class LineReader:
    """Lines from a file descriptor, readable without blocking (select + os.read, no buffering surprises)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lines: deque[str] = deque()
        self._partial = b""
        self.eof = False

    def fill(self, timeout_s: float | None) -> None:
        """Read what is there (waiting up to timeout_s, None = until something comes)."""
        if self.eof:
            return
        ready, _, _ = select.select([self.fd], [], [], timeout_s)
        if not ready:
            return
        data = os.read(self.fd, 65536)
        if not data:
            self.eof = True
            data = b"\n" if self._partial else b""
        *complete, self._partial = (self._partial + data).split(b"\n")
        self.lines.extend(line.decode("utf-8", errors="replace") for line in complete if line.strip())

    def next_line(self) -> str | None:
        """The next line, waiting for it; None at end of input."""
        while not self.lines and not self.eof:
            self.fill(None)
        return self.lines.popleft() if self.lines else None


def serve_json_lines(server: ChatServer, reader: LineReader, emit: Emit) -> None:
    """Answer requests read from `reader` until quit or end of input (which counts as quit)."""
    emit(server.ready_event())
    held: deque[dict] = deque()  # requests that came while an answer was being generated

    def interrupted() -> bool:
        reader.fill(0)
        stop = reader.eof
        while reader.lines:
            request = _decode(reader.lines.popleft())
            stop = stop or request.get("type") in ("interrupt", "quit")
            if request.get("type") != "interrupt":
                held.append(request)
        return stop

    while True:
        if held:
            request = held.popleft()
        else:
            line = reader.next_line()
            if line is None:
                return
            request = _decode(line)
        if not server.handle(request, emit, interrupted):
            return


def _decode(line: str) -> dict:
    try:
        request = json.loads(line)
    except json.JSONDecodeError:
        request = None
    return request if isinstance(request, dict) else {"type": "invalid", "line": line[:80]}


def json_line_writer(stream) -> Emit:
    """An emitter that writes one JSON object per line and flushes it at once."""
    def emit(event: dict) -> None:
        stream.write(json.dumps(event, ensure_ascii=False) + "\n")
        stream.flush()
    return emit
