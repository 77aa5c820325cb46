"""The HTTP side (Starlette, on uvicorn's thread): routes, the API key, body limits, OpenAI-shaped
errors, and the bridge from the engine worker's thread to each request's event queue.

A handler queues a Job and awaits its events. Non-streaming, it polls for its client leaving while
it waits; streaming, it waits for the first event before it answers (so a refused request is a
JSON 4xx, not a broken stream), then streams server-sent events (sse-starlette) that end with
[DONE]. A client that leaves sets the job's `cancel`: queued, it is dropped; running, the engine
stops it at once.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pipeinfer_cpu.app.serve import api
from pipeinfer_cpu.app.serve.api import ApiError
from pipeinfer_cpu.app.serve.metrics import Metrics
from pipeinfer_cpu.app.serve.worker import EngineUnavailable, EngineWorker, Job

DISCONNECT_POLL_S = 0.25
FINAL_EVENTS = ("done", "error", "dropped", "unavailable")


@dataclass(frozen=True)
class ServedModel:
    """What /v1/models and /health say about the model."""

    id: str  # its file's name, without .gguf (any `model` a request names means this one)
    name: str  # the name in its GGUF metadata
    created: int
    mode: str
    stages: int
    n_ctx: int
    draft: str | None = None


@dataclass(frozen=True)
class HttpSettings:
    api_key: str | None
    max_body_bytes: int
    defaults: api.Defaults


def create_app(worker: EngineWorker, model: ServedModel, settings: HttpSettings, metrics: Metrics) -> Starlette:
    """The ASGI application (the tests and `serve` both run it under uvicorn)."""

    async def health(request: Request) -> Response:
        queue = worker.queue_state()
        if worker.dead is not None:
            return JSONResponse({"status": "unavailable", "error": worker.dead, **queue}, status_code=503)
        return JSONResponse({"status": "ok", "model": model.id, "concurrency": "one request at a time, in order",
                             **queue})

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": model.id, "object": "model", "created": model.created, "owned_by": "pipeinfer-cpu",
             "meta": {"name": model.name, "mode": model.mode, "stages": model.stages, "n_ctx": model.n_ctx,
                      "draft": model.draft}}]})

    async def metrics_text(request: Request) -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    async def chat_completions(request: Request) -> Response:
        body = api.parse_body(api.ChatBody, await _read_json(request, settings.max_body_bytes))
        return await _answer(request, api.chat_request(body, settings.defaults), body, chat=True)

    async def completions(request: Request) -> Response:
        body = api.parse_body(api.CompletionBody, await _read_json(request, settings.max_body_bytes))
        return await _answer(request, api.completion_request(body, settings.defaults), body, chat=False)

    async def _answer(request: Request, engine_request: dict, body: Any, chat: bool) -> Response:
        reply = api.Reply(chat, model.id, bool(body.stream_options and body.stream_options.include_usage))
        events = _submit(worker, engine_request)
        try:
            first = await _next_event(events.queue, request, events.job)
            _raise_if_failed(first)
        except BaseException:
            events.job.cancel.set()
            raise
        if body.stream:
            return EventSourceResponse(_stream(events, first, reply), ping=15)
        try:
            final = first
            while final["event"] == "token":  # the done event holds the whole answer
                final = await _next_event(events.queue, request, events.job)
            _raise_if_failed(final)
        finally:
            events.job.cancel.set()  # harmless once it ended; stops it if this handler is cancelled
        return JSONResponse(reply.response(final))

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        metrics.outcome("refused" if exc.status < 500 else "failed")
        return JSONResponse(exc.body(), status_code=exc.status)

    routes = [Route("/health", health), Route("/v1/models", models), Route("/metrics", metrics_text),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"])]
    handlers = {ApiError: api_error, HTTPException: _http_error, _ClientLeft: _client_left}
    app = Starlette(routes=routes, exception_handlers=handlers)
    if settings.api_key is not None:
        app.add_middleware(_BearerAuth, api_key=settings.api_key, metrics=metrics)
    return app


class _ClientLeft(Exception):
    """The client went away before its answer: nobody reads what we send now."""


@dataclass(frozen=True)
class _Events:
    job: Job
    queue: asyncio.Queue


def _submit(worker: EngineWorker, engine_request: dict) -> _Events:
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def deliver(event: dict) -> None:  # called on the worker's thread
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server stopped, nobody is listening
            pass

    job = Job(engine_request, deliver)
    try:
        worker.submit(job)
    except EngineUnavailable as exc:
        raise _unavailable(str(exc)) from None
    return _Events(job, events)


async def _next_event(events: asyncio.Queue, request: Request, job: Job) -> dict:
    """The job's next event; if the client leaves meanwhile, cancel the job and give up."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel.set()
                raise _ClientLeft() from None


def _unavailable(why: str) -> ApiError:
    """A 503: the engine died (`why` names the rank) or the server is stopping."""
    return ApiError(503, f"the model is not available: {why}", code="engine_unavailable", kind="server_error")


def _raise_if_failed(event: dict) -> None:
    if event["event"] == "error":
        raise api.engine_error(event)
    if event["event"] == "unavailable":
        raise _unavailable(event["message"])
    if event["event"] == "dropped":
        raise _ClientLeft()


async def _stream(events: _Events, first: dict, reply: api.Reply) -> AsyncIterator[str]:
    """The answer as server-sent events: OpenAI's chunks, then [DONE]. Leaving early cancels the job."""
    try:
        opening = reply.first_chunk()
        if opening is not None:
            yield json.dumps(opening)
        event = first
        while event["event"] == "token":
            yield json.dumps(reply.token_chunk(event["text"]))
            event = await events.queue.get()
        if event["event"] == "done":
            for chunk in reply.final_chunks(event):
                yield json.dumps(chunk)
        else:  # the engine died mid-answer: say so in the stream (the status line is long gone)
            yield json.dumps(_unavailable(event["message"]).body())
        yield "[DONE]"
    finally:
        events.job.cancel.set()


async def _read_json(request: Request, limit: int) -> Any:
    """The body as JSON, refused past `limit` bytes (declared or sent) or when it is not JSON."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {declared} bytes; the limit is {limit} (--max-body-bytes)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body is over the limit of {limit} bytes (--max-body-bytes)")
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return data


async def _client_left(request: Request, exc: Exception) -> Response:
    return Response(status_code=499)  # nginx's "client closed request": only the access log sees it


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (404, 405) in OpenAI's shape."""
    assert isinstance(exc, HTTPException)
    return JSONResponse(ApiError(exc.status_code, exc.detail or "error").body(), status_code=exc.status_code,
                        headers=exc.headers)


class _BearerAuth:
    """Every request but GET /health needs `Authorization: Bearer <key>` (compared in constant time)."""

    def __init__(self, app, api_key: str, metrics: Metrics) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if secrets.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        self.metrics.outcome("refused")
        error = ApiError(401, "a valid API key is needed: Authorization: Bearer <key> (serve --api-key)",
                         code="invalid_api_key")
        response = JSONResponse(error.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)
