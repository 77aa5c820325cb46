"""`pipeinfer-cpu serve`: start the cluster once, then answer HTTP requests with it until Ctrl-C,
SIGTERM, or the cluster dies (then exit non-zero, naming the rank).

Threads: this one (the one that started the engine) runs the engine worker; uvicorn serves on a
thread of its own, so it installs no signal handlers: ours stop the worker, then the server.
"""

from __future__ import annotations

import errno
import signal
import socket
import threading
import time
from dataclasses import dataclass

import uvicorn

from pipeinfer_cpu.app.chat import say, start_or_close
from pipeinfer_cpu.app.client import Client, JobEnded, on_signals
from pipeinfer_cpu.app.connect import with_client
from pipeinfer_cpu.app.options import EngineOptions
from pipeinfer_cpu.app.serve.api import Defaults
from pipeinfer_cpu.app.serve.metrics import Metrics
from pipeinfer_cpu.app.serve.routes import HttpSettings, ServedModel, create_app
from pipeinfer_cpu.app.serve.worker import EngineWorker
from pipeinfer_cpu.errors import UserError
from pipeinfer_cpu.modelfiles.registry import resolve_model

GRACEFUL_SHUTDOWN_S = 5.0  # how long open connections get to finish once the server stops
HTTP_START_WAIT_S = 30.0


@dataclass(frozen=True)
class ServeOptions:
    defaults: Defaults  # what a request leaves out: the default sampling
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    max_body_bytes: int = 4 * 2**20
    sampling_source: str = ""  # where the default sampling came from, said at the start

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port must be in 0..65535 (0: any free port), got {self.port}")
        if self.max_body_bytes < 1024:
            raise UserError(f"--max-body-bytes must be at least 1024, got {self.max_body_bytes}")
        if self.api_key is not None and not self.api_key.strip():
            raise UserError("--api-key is empty")


def run_serve(options: EngineOptions, serve: ServeOptions) -> int:
    """`pipeinfer-cpu serve`: returns the exit code."""
    sock = _bind(serve.host, serve.port)  # a port in use is said before the cluster starts
    try:
        return with_client(options, lambda client: _serve(client, options, serve, sock))
    finally:
        sock.close()


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UserError(f"--host {host}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        reason = "in use (another server?)" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise UserError(f"cannot listen on {host}:{port}: {reason}") from None
    return sock


def _serve(client: Client, options: EngineOptions, serve: ServeOptions, sock: socket.socket) -> int:
    ready = start_or_close(client, options.timeout_s)
    if isinstance(ready, int):
        return ready
    metrics = Metrics()
    worker = EngineWorker(client, 2 * options.timeout_s + 30, metrics)
    model = ServedModel(resolve_model(options.model).stem, ready["model"], int(time.time()), ready["mode"],
                        ready["stages"], ready["n_ctx"], _draft_name(options))
    app = create_app(worker, model, HttpSettings(serve.api_key, serve.max_body_bytes, serve.defaults), metrics)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info" if options.verbose else "warning",
                                           timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
    http = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="http", daemon=True)
    with on_signals(worker.request_stop, (signal.SIGINT, signal.SIGTERM)):  # uvicorn's thread installs none
        http.start()
        try:
            code = _work(worker, sock, model, ready, serve) if _started(server, http) else 1
        finally:  # also when the engine failed in this process (as_head reports that, then stops the ranks)
            server.should_exit = True
            http.join(GRACEFUL_SHUTDOWN_S + 5)
    client.close()
    return code


def _work(worker: EngineWorker, sock: socket.socket, model: ServedModel, ready: dict, serve: ServeOptions) -> int:
    host, port = sock.getsockname()[:2]
    _announce(host, port, model, ready, serve)
    try:
        worker.run()
    except JobEnded:
        say(f"error: {worker.dead}")
        return 1
    return 0


def _started(server: uvicorn.Server, http: threading.Thread) -> bool:
    deadline = time.monotonic() + HTTP_START_WAIT_S
    while not server.started:
        if not http.is_alive() or time.monotonic() > deadline:
            say("error: the HTTP server did not start")
            return False
        time.sleep(0.02)
    return True


def _announce(host: str, port: int, model: ServedModel, ready: dict, serve: ServeOptions) -> None:
    shown = f"[{host}]" if ":" in host else host
    draft = f", draft {model.draft}" if model.draft else ""
    say(f"listening on http://{shown}:{port}/v1 (model {model.id}: {model.mode}, {model.stages} stage(s){draft}, "
         f"context {model.n_ctx} tokens; one request at a time)")
    if ready.get("notice"):
        say(f"note: {ready['notice']}")
    source = f" ({serve.sampling_source})" if serve.sampling_source else ""
    say(f"default sampling: {serve.defaults.sampling.summary()}{source}; requests may set their own")
    if serve.api_key is None and host not in ("127.0.0.1", "::1", "localhost"):
        say("warning: no --api-key, and reachable from other machines: anyone there can use the model")


def _draft_name(options: EngineOptions) -> str | None:
    if not options.speculative:
        return None
    if options.ngram is not None:
        return options.ngram.label()
    return resolve_model(options.draft_model).stem if options.draft_model is not None else None
