"""The head's side of the front-end protocol: requests in, events out (JSON objects, one per line).

The user-facing process (the `run` or `chat` command, later an HTTP server) owns what the user
has: the conversation, the text already shown, the statistics. The engine here owns only the
model and the KV cache of the stages. A chat turn therefore carries the whole conversation; the
server renders it, keeps the longest prefix the stages already hold and prefills only the rest,
so a turn costs its own tokens, not the conversation's.

Requests:
  complete {text, chat_template, system, parse_special, fresh, max_tokens, sampling, keep_first_logits}
      one prompt (raw text, or one user turn in the model's chat template); `fresh` empties the context first;
      raw text's special-token text is read as special tokens unless parse_special is false
  turn {conversation: {system, turns}, first, max_tokens, sampling, interrupt}
      answer the conversation's last (user) turn; turns before `first` were dropped for the context limit;
      `interrupt`: Ctrl-C was already typed with the Enter
  interrupt   stop the answer being generated (ignored when none is)
  quit
Events: ready {model, mode, stages, n_ctx, notice}; token {text}; done {stopped_by, answer, stats,
dropped_turns (turn), first_logits (complete, base64 float32, when asked)}; error {message}; bye.
Every request but interrupt gets exactly one final event (token events come before `done`).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import select
from collections import deque
from typing import Callable, Sequence

from pipeinfer_cpu.conversation import (
    Message,
    Render,
    answer_reserve,
    conversation_from_json,
    fit_window,
    plain_template,
    plan_feed,
)
from pipeinfer_cpu.errors import ModelError, UserError
from pipeinfer_cpu.head.decoding import TextStream
from pipeinfer_cpu.head.engine import Engine
from pipeinfer_cpu.sampling import SamplingConfig

Emit = Callable[[dict], None]


def make_renderer(vocab) -> tuple[Render, str | None]:
    """Render with the model's own chat template, or the plain fallback and a notice saying so."""
    def plain(messages: Sequence[Message]) -> list[int]:
        return vocab.text_tokens(plain_template(messages), parse_special=False)  # a user's text stays text

    if vocab.chat_template() is None:
        return plain, "the model has no chat template: using a plain 'User:/Assistant:' format"
    try:
        vocab.chat_tokens([("user", "hi")])
    except ModelError:
        return plain, "llama.cpp does not know this model's chat template: using a plain 'User:/Assistant:' format"
    return vocab.chat_tokens, None


class EngineServer:
    """Answers one request at a time with an Engine; holds no conversation of its own."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.render, self.notice = make_renderer(engine.vocab)
        self.plain = self.notice is not None

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
                self._turn(request, emit, lambda: bool(request.get("interrupt")) or should_stop())
            elif kind == "complete":
                self._complete(request, emit, should_stop)
            elif kind == "quit":
                emit({"event": "bye"})
                return False
            elif kind != "interrupt":  # a late interrupt, after its answer ended: nothing to stop
                raise UserError(f"unknown request {kind!r}")
        except UserError as exc:
            emit({"event": "error", "message": str(exc)})
        return True

    def _slack(self) -> int:
        spec = self.engine.settings.spec
        if self.engine.settings.mode.speculative and spec is not None:
            return spec.max_inflight * spec.draft_max + 1
        return 1

    def _turn(self, request: dict, emit: Emit, should_stop: Callable[[], bool]) -> None:
        conversation = conversation_from_json(request.get("conversation"))
        if not conversation.turns or conversation.turns[-1].role != "user" or not conversation.turns[-1].content.strip():
            raise UserError("an empty message: type something (or /help)")
        first = _field(request, "first", int, 0)
        if not 0 <= first < len(conversation.turns):
            raise UserError(f"'first' must name one of the conversation's {len(conversation.turns)} turns, got {first}")
        n_ctx, max_tokens, sampling = self.engine.settings.n_ctx, _field(request, "max_tokens", int), _sampling(request)
        reserve = answer_reserve(n_ctx, max_tokens, self._slack())
        first, prompt = fit_window(self.render, conversation, first, n_ctx, reserve)
        plan = plan_feed(self.engine.context_tokens, prompt)
        self.engine.truncate_context(plan.keep)
        budget = min(max_tokens, n_ctx - len(prompt) - self._slack())
        answer = _Answer(self.engine.vocab, emit)

        def stop() -> bool:
            return should_stop() or (self.plain and "\nUser:" in "".join(answer.shown[-8:]))

        generation, stats = self.engine.generate(list(plan.feed), budget, sampling, answer.on_token, stop)
        text = answer.finish()
        text = text.split("\nUser:")[0] if self.plain else text
        record = {**stats.to_json_dict(), "context_tokens": len(prompt), "reused_tokens": plan.keep,
                  "dropped_turns": first, "stopped_by": generation.stopped_by}
        emit({"event": "done", "stopped_by": generation.stopped_by, "answer": text, "dropped_turns": first,
              "stats": record})

    def _complete(self, request: dict, emit: Emit, should_stop: Callable[[], bool]) -> None:
        text, max_tokens, sampling = _field(request, "text", str), _field(request, "max_tokens", int), _sampling(request)
        if request.get("fresh"):
            self.engine.reset_context()
        tokens = self.engine.encode(text, chat=bool(request.get("chat_template")), system=request.get("system"),
                                    parse_special=bool(request.get("parse_special", True)))
        answer = _Answer(self.engine.vocab, emit)
        keep_logits = bool(request.get("keep_first_logits"))
        generation, stats = self.engine.generate(tokens, max_tokens, sampling, answer.on_token, should_stop,
                                                 keep_first_logits=keep_logits)
        record = {**stats.to_json_dict(), "prompt_tokens": list(generation.prompt_tokens),
                  "tokens": list(generation.tokens), "stopped_by": generation.stopped_by,
                  "cpu_backends": self.engine.backends_json()}
        event = {"event": "done", "stopped_by": generation.stopped_by, "answer": answer.finish(), "stats": record}
        if keep_logits and generation.first_logits is not None:
            event["first_logits"] = base64.b64encode(generation.first_logits.astype("<f4").tobytes()).decode()
        emit(event)


class _Answer:
    """The text of an answer as it is generated: each printable piece is emitted at once."""

    def __init__(self, vocab, emit: Emit) -> None:
        self.vocab = vocab
        self.emit = emit
        self.stream = TextStream(vocab.piece)
        self.shown: list[str] = []

    def on_token(self, token: int) -> None:
        if not self.vocab.is_end(token):
            self._show(self.stream.push(token))

    def finish(self) -> str:
        self._show(self.stream.flush())
        return "".join(self.shown)

    def _show(self, piece: str) -> None:
        if piece:
            self.shown.append(piece)
            self.emit({"event": "token", "text": piece})


def _field(request: dict, name: str, kind: type, default=None):
    """A request's field of the given type (a bool is not an int here); a UserError when it is missing or wrong."""
    value = request.get(name, default)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"the request's {name!r} must be a {kind.__name__}, got {value!r}")
    return value


def _sampling(request: dict) -> SamplingConfig:
    """The request's sampling settings (SamplingConfig's fields; those left out take its defaults)."""
    settings = request.get("sampling", {})
    if not isinstance(settings, dict):
        raise UserError(f"bad sampling settings: expected an object, got {settings!r}")
    unknown = set(settings) - set(sampling_json(SamplingConfig()))
    if unknown:
        raise UserError(f"bad sampling settings: unknown {', '.join(sorted(unknown))}")
    try:
        return SamplingConfig(**settings)
    except ValueError as exc:
        raise UserError(f"bad sampling settings: {exc}") from None


def sampling_json(sampling: SamplingConfig) -> dict:
    """The `sampling` field of a request."""
    return dataclasses.asdict(sampling)


# -- JSON lines on stdio (the head of a job started by the user-facing process) --------------------

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

    def next_request(self) -> dict | None:
        line = self.next_line()
        return None if line is None else decode_request(line)


def serve_json_lines(server: EngineServer, reader: LineReader, emit: Emit) -> None:
    """Answer requests read from `reader` until quit or end of input (which counts as quit)."""
    emit(server.ready_event())
    held: deque[dict] = deque()  # requests that came while an answer was being generated

    def interrupted() -> bool:
        reader.fill(0)
        stop = reader.eof
        while reader.lines:
            request = decode_request(reader.lines.popleft())
            stop = stop or request.get("type") in ("interrupt", "quit")
            if request.get("type") != "interrupt":
                held.append(request)
        return stop

    while True:
        request = held.popleft() if held else reader.next_request()
        if request is None or not server.handle(request, emit, interrupted):
            return


def decode_request(line: str) -> dict:
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
