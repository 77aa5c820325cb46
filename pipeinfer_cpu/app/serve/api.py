"""The OpenAI API, translated: request bodies into the engine's requests (head/server.py), the
engine's events into OpenAI's responses and stream chunks. Pure: no I/O, no clock but `created`.

What a real client sends and we do not use is ignored when it cannot change the answer's meaning
(`user`, `tools` with no tool_choice asking for one, `stream_options`, `parallel_tool_calls`, ...);
what would change it is refused in one clear 400 (`n` > 1, logprobs, a forced tool call, a JSON
response format, logit_bias, tool messages, images). Any `model` names the served model.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeinfer_cpu.conversation import Conversation, Turn, conversation_to_json
from pipeinfer_cpu.head.server import sampling_json
from pipeinfer_cpu.sampling import SamplingConfig

MAX_STOPS = 16  # as many stop strings as a request may give (OpenAI allows 4; llama-server any)
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat's is "as the context holds"
FINISH_REASONS = {"eos": "stop", "stop": "stop", "interrupt": "stop", "length": "length", "context": "length"}


class ApiError(Exception):
    """A request we answer with an error in OpenAI's shape, {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# -- request bodies (unknown fields are ignored; each known one is checked) -----------------------

class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # JSON's own types: true is no max_tokens, "1" no seed


class _StreamOptions(_Body):
    include_usage: bool = False


class _Sampled(_Body):
    """The fields both endpoints share."""

    model: str | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1)
    logprobs: Any = None
    logit_bias: dict[str, float] | None = None
    # llama-server's extensions, which clients send through `extra_body`
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, gt=0)


class _TextPart(_Body):
    type: str
    text: str | None = None


class _Message(_Body):
    role: str
    content: str | list[_TextPart] | None = None
    tool_calls: list[Any] | None = None


class ChatBody(_Sampled):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    top_logprobs: int | None = None
    tool_choice: Any = None
    response_format: Any = None


class CompletionBody(_Sampled):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None


def parse_body(kind: type[_Body], data: Any) -> Any:
    """A request body as `kind`; a wrong type or range is a 400 naming the field."""
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise ApiError(400, f"{where}: {first['msg']}", param=where) from None


# -- into the engine's requests -------------------------------------------------------------------

@dataclass(frozen=True)
class Defaults:
    """What a request leaves out: the operator's sampling (serve's options), and whether its seed
    was given (else each request that names none gets a random one, as llama-server does)."""

    sampling: SamplingConfig
    seed_given: bool = False


def chat_request(body: ChatBody, defaults: Defaults) -> dict:
    """The engine's `turn` request for a chat completion: the whole conversation (the engine keeps
    the KV prefix it already holds), nothing dropped to fit (`strict`)."""
    _refuse_common(body)
    if body.top_logprobs:
        raise ApiError(400, "logprobs are not supported", param="top_logprobs")
    if body.tool_choice not in (None, "none", "auto"):
        raise ApiError(400, "tool calls are not supported: tool_choice must be 'none' or 'auto'", param="tool_choice")
    if isinstance(body.response_format, Mapping) and body.response_format.get("type") not in (None, "text"):
        raise ApiError(400, "only a text response_format is supported", param="response_format")
    asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return {"type": "turn", "conversation": conversation_to_json(_conversation(body.messages)), "first": 0,
            "max_tokens": asked, "sampling": sampling_json(_sampling(body, defaults)), "stop": _stops(body),
            "strict": True}


def completion_request(body: CompletionBody, defaults: Defaults) -> dict:
    """The engine's `complete` request for a text completion, reusing the KV prefix the stages hold."""
    _refuse_common(body)
    if body.echo or body.suffix or (body.best_of or 1) > 1:
        raise ApiError(400, "echo, suffix and best_of are not supported", param="echo")
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise ApiError(400, "prompt must be one string (token arrays and several prompts are not supported)",
                           param="prompt")
        prompt = prompt[0]
    if not prompt:
        raise ApiError(400, "prompt is empty", param="prompt")
    max_tokens = body.max_tokens if body.max_tokens is not None else COMPLETION_DEFAULT_MAX_TOKENS
    return {"type": "complete", "text": prompt, "parse_special": True, "reuse": True, "strict": True,
            "max_tokens": max_tokens, "sampling": sampling_json(_sampling(body, defaults)), "stop": _stops(body)}


def _refuse_common(body: _Sampled) -> None:
    if (body.n or 1) > 1:
        raise ApiError(400, "n > 1 is not supported: one answer per request", param="n")
    if body.logprobs not in (None, False, 0):
        raise ApiError(400, "logprobs are not supported", param="logprobs")
    if body.logit_bias:
        raise ApiError(400, "logit_bias is not supported", param="logit_bias")


def _conversation(messages: list[_Message]) -> Conversation:
    """OpenAI messages as a Conversation: the leading system (or developer) messages joined into its
    system message, then user and assistant turns, the last one the user's."""
    systems: list[str] = []
    turns: list[Turn] = []
    for index, message in enumerate(messages):
        where = f"messages.{index}"
        if message.role in ("system", "developer"):
            if turns:
                raise ApiError(400, "system messages after the conversation began are not supported", param=where)
            systems.append(_text(message, where))
        elif message.role in ("user", "assistant"):
            if message.tool_calls:
                raise ApiError(400, "tool calls are not supported", param=f"{where}.tool_calls")
            turns.append(Turn(message.role, _text(message, where)))
        else:
            raise ApiError(400, f"messages of role {message.role!r} are not supported (system, developer, user, "
                                "assistant)", param=f"{where}.role")
    if not turns or turns[-1].role != "user":
        raise ApiError(400, "the last message must be the user's", param="messages")
    if not turns[-1].content.strip():
        raise ApiError(400, "the last message is empty", param=f"messages.{len(messages) - 1}.content")
    return Conversation("\n\n".join(systems) or None, tuple(turns))


def _text(message: _Message, where: str) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise ApiError(400, f"content parts of type {part.type!r} are not supported (text only)",
                           param=f"{where}.content")
    return "".join(part.text or "" for part in message.content)


def _stops(body: _Sampled) -> list[str]:
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"at most {MAX_STOPS} stop strings, got {len(stops)}", param="stop")
    return [stop for stop in stops if stop]


def _sampling(body: _Sampled, defaults: Defaults) -> SamplingConfig:
    asked = {name: getattr(body, name) for name in ("temperature", "top_p", "presence_penalty",
                                                    "frequency_penalty", "top_k", "min_p", "repeat_penalty")}
    if body.seed is not None:
        asked["seed"] = body.seed % 2**32  # OpenAI takes any integer; llama.cpp's seeds are unsigned 32-bit
    elif not defaults.seed_given:
        asked["seed"] = secrets.randbelow(2**32)
    try:  # SamplingConfig has the last word on each value (an infinite repeat_penalty, say)
        return dataclasses.replace(defaults.sampling, **{name: value for name, value in asked.items()
                                                         if value is not None})
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None


# -- out of the engine's events -------------------------------------------------------------------

def engine_error(event: Mapping[str, Any]) -> ApiError:
    """An engine `error` event (the request was refused) as a 400."""
    code = event.get("code")
    return ApiError(400, event.get("message", "the request was refused"),
                    param="messages" if code == "context_length_exceeded" else None, code=code)


def prompt_tokens(stats: Mapping[str, Any]) -> int:
    """The whole prompt's tokens, those whose KV cache was reused included (n_prompt: only those fed)."""
    return stats.get("context_tokens", stats.get("n_prompt", 0))


def usage(stats: Mapping[str, Any]) -> dict[str, Any]:
    """OpenAI's usage counts: the whole prompt (reused tokens included, as cached_tokens) and the answer."""
    prompt = prompt_tokens(stats)
    completion = stats.get("n_generated", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": stats.get("reused_tokens", 0)}}


def timings(stats: Mapping[str, Any]) -> dict[str, Any]:
    """llama-server's `timings` (clients that know it show speed and acceptance), from the statistics."""
    generated, rate = stats.get("n_generated", 0), stats.get("decode_tokens_per_s")
    return {"cache_n": stats.get("reused_tokens", 0), "prompt_n": stats.get("n_prompt", 0),
            "prompt_ms": 1000 * stats.get("ttft_s", 0.0), "predicted_n": generated,
            "predicted_ms": 1000 * (generated - 1) / rate if rate else 0.0, "predicted_per_second": rate,
            "draft_n": stats.get("drafted", 0), "draft_n_accepted": stats.get("accepted", 0)}


@dataclass(frozen=True)
class Reply:
    """Builds the response, or the stream chunks, of one request (chat or text completion)."""

    chat: bool
    model: str
    include_usage: bool = False
    id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def _envelope(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion" + (".chunk" if chunk else "")) if self.chat else "text_completion"
        return {"id": ("chatcmpl-" if self.chat else "cmpl-") + self.id, "object": kind, "created": self.created,
                "model": self.model, "system_fingerprint": "pipeinfer-cpu"}

    def _choice(self, text: str | None, finish_reason: str | None, delta: bool, role: bool = False) -> dict:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        message = {"role": "assistant"} if role or not delta else {}
        if text is not None:
            message["content"] = text
        return {"index": 0, ("delta" if delta else "message"): message, "logprobs": None,
                "finish_reason": finish_reason}

    def response(self, done: Mapping[str, Any]) -> dict[str, Any]:
        """The whole answer, from the engine's `done` event."""
        stats = done["stats"]
        return {**self._envelope(False),
                "choices": [self._choice(done["answer"], FINISH_REASONS[done["stopped_by"]], delta=False)],
                "usage": usage(stats), "timings": timings(stats)}

    def _chunk(self, choices: list[dict], **extra: Any) -> dict[str, Any]:
        usage_field = {"usage": None} if self.include_usage else {}
        return {**self._envelope(True), "choices": choices, **usage_field, **extra}

    def first_chunk(self) -> dict[str, Any] | None:
        """A chat stream opens with the assistant's role (a text completion's has nothing to open with)."""
        return self._chunk([self._choice("", None, delta=True, role=True)]) if self.chat else None

    def token_chunk(self, text: str) -> dict[str, Any]:
        return self._chunk([self._choice(text, None, delta=True)])

    def final_chunks(self, done: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The chunk with the finish reason; then, when asked for, one with the usage (and no choices)."""
        final = self._chunk([self._choice(None if self.chat else "", FINISH_REASONS[done["stopped_by"]],
                                          delta=True)], timings=timings(done["stats"]))
        if not self.include_usage:
            return [final]
        return [final, {**self._envelope(True), "choices": [], "usage": usage(done["stats"])}]

