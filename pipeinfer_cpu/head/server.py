"""The head's side of the front-end protocol: requests in, events out (JSON objects, one per line).

The user-facing process (the `run` or `chat` command, later an HTTP server) owns what the user
has: the conversation, the text already shown, the statistics. The engine here owns only the
model and the KV cache of the stages. A chat turn therefore carries the whole conversation; the
server renders it, keeps the longest prefix the stages already hold and prefills only the rest,
so a turn costs its own tokens, not the conversation's.

Requests:
  complete {text, chat_template, system, parse_special, fresh, reuse, max_tokens, sampling, stop, strict,
            keep_first_logits, replay}
      one prompt (raw text, or one user turn in the model's chat template); `fresh` empties the context first,
      `reuse` keeps the longest prefix the stages hold (else the prompt follows the context); raw text's
      special-token text is read as special tokens unless parse_special is false
  turn {conversation: {system, turns}, first, max_tokens, sampling, stop, strict, interrupt, replay}
      answer the conversation's last (user) turn; turns before `first` were dropped for the context limit;
      `interrupt`: Ctrl-C was already typed with the Enter
  `replay` (complete and turn): the token ids of the answer's first tokens, decided by a job that failed
      (app/reshard.py): fed as that job fed them and not shown again; the answer goes on after them
  interrupt   stop the answer being generated (ignored when none is)
  health      where each stage's committed KV sequence ends, against the head's mirror (for soak tests)
  part {text, end}   a piece of a long request's line (MPICH's mpiexec cannot buffer more than 64 KiB of
      input for rank 0): each is answered with a `part` event; the pieces up to `end` make the request
  quit
`max_tokens` null: as many as the context holds. `stop`: strings that end the answer (not shown). `strict`
(the HTTP API): a prompt and max_tokens that do not fit the context are refused (no turn is dropped).
Events: ready {model, mode, stages, n_ctx, notice, ranks (rank -> it in words), shards (how the stages got them)}; token {text, ids (the tokens
decided since the last token event: what a resumed answer replays)};
done {stopped_by, answer, stats, dropped_turns (turn), first_logits (complete, base64 float32, when asked)};
error {message, code}; health {context_tokens, kv_ends (rank -> last position held), kv_ok}; part; bye.
`stopped_by` is one of length, eos, stop, interrupt, context; an error's `code` is null or
"context_length_exceeded". Every request but interrupt gets exactly one final event (token events come
before `done`).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import select
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

from pipeinfer_cpu.conversation import (
    ContextLengthExceeded,
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
from pipeinfer_cpu.head.stop_strings import StopStrings
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
                "notice": self.notice, "ranks": self.engine.rank_names(),
                "shards": None if self.engine.shards is None else self.engine.shards.describe()}

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
            elif kind == "health":
                emit(self._health())
            elif kind == "quit":
                emit({"event": "bye"})
                return False
            elif kind != "interrupt":  # a late interrupt, after its answer ended: nothing to stop
                raise UserError(f"unknown request {kind!r}")
        except UserError as exc:
            code = "context_length_exceeded" if isinstance(exc, ContextLengthExceeded) else None
            emit({"event": "error", "message": str(exc), "code": code})
        return True

    def _health(self) -> dict:
        ends = self.engine.kv_check()
        return {"event": "health", "context_tokens": len(self.engine.context_tokens),
                "kv_ends": {str(rank): end for rank, end in ends.items()},
                "kv_ok": all(end == len(self.engine.context_tokens) - 1 for end in ends.values())}

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
        n_ctx = self.engine.settings.n_ctx
        asked = self._asked(request)  # checked before the cache is touched
        if request.get("strict"):
            prompt = self.render(conversation.messages(first))
            self._check_strict(len(prompt), request)
        else:
            first, prompt = fit_window(self.render, conversation, first, n_ctx,
                                       answer_reserve(n_ctx, asked.max_tokens, self._slack()))
        plan = plan_feed(self.engine.context_tokens, prompt)
        self.engine.truncate_context(plan.keep)
        budget = min(asked.max_tokens, n_ctx - len(prompt) - self._slack())
        self._answer(dataclasses.replace(asked, max_tokens=budget), list(plan.feed), emit, should_stop,
                     {"context_tokens": len(prompt), "reused_tokens": plan.keep, "dropped_turns": first},
                     {"dropped_turns": first})

    def _complete(self, request: dict, emit: Emit, should_stop: Callable[[], bool]) -> None:
        text = _field(request, "text", str)
        asked = self._asked(request)  # checked before the cache is touched
        tokens = self.engine.encode(text, chat=bool(request.get("chat_template")), system=request.get("system"),
                                    parse_special=bool(request.get("parse_special", True)))
        if not tokens:
            raise UserError("the prompt is empty (nothing to continue)")
        fresh, reuse = bool(request.get("fresh")), bool(request.get("reuse"))
        if request.get("strict"):  # checked before the cache is touched, too
            follows = 0 if fresh or reuse else len(self.engine.context_tokens)  # else the prompt follows the context
            self._check_strict(follows + len(tokens), request)
        if fresh:
            self.engine.reset_context()
        reused = {}
        if reuse:
            plan = plan_feed(self.engine.context_tokens, tokens)
            self.engine.truncate_context(plan.keep)
            reused = {"context_tokens": len(tokens), "reused_tokens": plan.keep}
            tokens = list(plan.feed)
        self._answer(asked, tokens, emit, should_stop, reused, {},
                     keep_first_logits=bool(request.get("keep_first_logits")))

    def _check_strict(self, n_prompt: int, request: dict) -> None:
        """Refuse a prompt that, with the answer's max_tokens, does not fit the context (nothing is dropped)."""
        n_ctx, slack = self.engine.settings.n_ctx, self._slack()
        asked = request.get("max_tokens")
        room = n_ctx - slack - n_prompt
        if room < 1 or (asked is not None and asked > room):
            wanted = f" and max_tokens asks for {asked} more" if asked is not None else ""
            kept = f", {slack} of them kept for speculation" if slack > 1 else ""
            raise ContextLengthExceeded(f"the prompt takes {n_prompt} tokens{wanted}, but the context holds {n_ctx} "
                                        f"(--ctx-size{kept})")

    def _asked(self, request: dict) -> _Asked:
        """What the request asks of its answer; a UserError when a field is wrong."""
        plain_turn = ("\nUser:",) if self.plain and request.get("type") == "turn" else ()  # the plain template's
        return _Asked(_max_tokens(request, self.engine.settings.n_ctx), _sampling(request),
                      _stops(request) + plain_turn, _replay(request, self.engine.vocab.n_vocab))

    def _answer(self, asked: _Asked, tokens: list[int], emit: Emit, should_stop: Callable[[], bool],
                record_extra: dict, event_extra: dict, keep_first_logits: bool = False) -> None:
        """Generate after `tokens`, streaming the text, and emit the final `done` event."""
        answer = _Answer(self.engine.vocab, emit, asked.stops)
        answer.replay(asked.replay)
        generation, stats = self.engine.generate(tokens, asked.max_tokens, asked.sampling, answer.on_token,
                                                 lambda: should_stop() or answer.stopped, keep_first_logits,
                                                 asked.replay)
        text = answer.finish()
        stopped_by = "stop" if answer.stopped else generation.stopped_by
        if asked.replay:
            record_extra = {**record_extra, "replayed_tokens": len(asked.replay)}
        record = {**stats.to_json_dict(), **record_extra, "prompt_tokens": list(generation.prompt_tokens),
                  "tokens": list(generation.tokens), "stopped_by": stopped_by,
                  "cpu_backends": self.engine.backends_json()}
        event = {"event": "done", "stopped_by": stopped_by, "answer": text, "stats": record, **event_extra}
        if keep_first_logits and generation.first_logits is not None:
            event["first_logits"] = base64.b64encode(generation.first_logits.astype("<f4").tobytes()).decode()
        emit(event)


@dataclass(frozen=True)
class _Asked:
    """What a request asks of its answer."""

    max_tokens: int
    sampling: SamplingConfig
    stops: tuple[str, ...]
    replay: tuple[int, ...] = ()  # the answer's first tokens, decided by a job that failed


class _Answer:
    """The text of an answer as it is generated: each printable piece is emitted at once, but for
    text that could begin a stop string (held until it is known not to be one)."""

    def __init__(self, vocab, emit: Emit, stops: Sequence[str] = ()) -> None:
        self.vocab = vocab
        self.emit = emit
        self.stream = TextStream(vocab.piece)
        self.stops = StopStrings(stops)
        self.shown: list[str] = []
        self.unsent: list[int] = []  # tokens decided since the last token event

    @property
    def stopped(self) -> bool:
        """Did a stop string end the answer?"""
        return self.stops.matched is not None

    def replay(self, tokens: Sequence[int]) -> None:
        """Take in the tokens a failed job decided and showed (their text is not shown again): the
        text they make, and any piece held back then (half a character, the start of a stop string),
        are as they were."""
        for token in tokens:
            self.shown.append(self.stops.push(self.stream.push(token)))

    def on_token(self, token: int) -> None:
        self.unsent.append(token)
        if not self.vocab.is_end(token):
            self._show(self.stops.push(self.stream.push(token)))

    def finish(self) -> str:
        self._show(self.stops.push(self.stream.flush()))
        self._show(self.stops.flush())
        return "".join(self.shown)

    def _show(self, piece: str) -> None:
        if piece:
            self.shown.append(piece)
            self.emit({"event": "token", "text": piece, "ids": self.unsent})
            self.unsent = []


def _field(request: dict, name: str, kind: type, default=None):
    """A request's field of the given type (a bool is not an int here); a UserError when it is missing or wrong."""
    value = request.get(name, default)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"the request's {name!r} must be a {kind.__name__}, got {value!r}")
    return value


def _max_tokens(request: dict, n_ctx: int) -> int:
    """The request's max_tokens; null (or left out) means as many as the context holds."""
    if request.get("max_tokens") is None:
        return n_ctx
    value = _field(request, "max_tokens", int)
    if value < 1:
        raise UserError(f"max_tokens must be at least 1, got {value}")
    return value


def _replay(request: dict, n_vocab: int) -> tuple[int, ...]:
    replay = request.get("replay") or []
    if not isinstance(replay, list) or not all(isinstance(t, int) and 0 <= t < n_vocab for t in replay):
        raise UserError(f"the request's 'replay' must be a list of token ids (0 to {n_vocab - 1})")
    return tuple(replay)


def _stops(request: dict) -> tuple[str, ...]:
    stops = request.get("stop") or []
    if not isinstance(stops, list) or not all(isinstance(stop, str) for stop in stops):
        raise UserError(f"the request's 'stop' must be a list of strings, got {stops!r}")
    return tuple(stops)


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
        request = next_whole_request(reader, emit, held.popleft() if held else None)
        if request is None or not server.handle(request, emit, interrupted):
            return


def next_whole_request(reader: LineReader, emit: Emit, first: dict | None = None) -> dict | None:
    """The next request (after `first`, when one was already read), a long one put together from its
    parts, each acknowledged so that the front end sends the next (app/client.py JobClient._send)."""
    request = first if first is not None else reader.next_request()
    parts: list[str] = []
    while request is not None and request.get("type") == "part":
        parts.append(str(request.get("text", "")))
        emit({"event": "part"})
        if request.get("end"):
            return decode_request("".join(parts))
        request = reader.next_request()
    return request


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
