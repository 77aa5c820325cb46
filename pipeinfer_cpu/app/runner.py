"""One process of a `run` job: the head generates and reports, a worker serves its stage."""

from __future__ import annotations

import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeinfer_cpu.head.decoding import TextStream
from pipeinfer_cpu.head.engine import Engine, EngineSettings
from pipeinfer_cpu.errors import PipeinferError
from pipeinfer_cpu.sampling import SamplingConfig
from pipeinfer_cpu.stats import write_json
from pipeinfer_cpu.wire.transport import MpiTransport, under_mpi

HEAD_RANK = 0
STOP_GRACE_S = 3.0  # after an error, how long the head lets the workers leave before aborting the job


@dataclass(frozen=True)
class GenerateRequest:
    prompts: tuple[str, ...]
    max_tokens: int
    sampling: SamplingConfig
    chat_template: bool = False
    system: str | None = None
    stats_json: Path | None = None
    save_logits: Path | None = None


def run_job(settings: EngineSettings, request: GenerateRequest, debug: bool) -> int:
    """Entry point of every process of a run: returns its exit code."""
    if not under_mpi():
        return as_head(lambda: _generate(Engine.start(settings), request), None, debug)
    transport = MpiTransport()
    if transport.rank != HEAD_RANK:
        from pipeinfer_cpu.rank.worker import worker_main

        code = worker_main(transport, settings.cpu_variant)
        transport.finalize()
        return code
    return as_head(lambda: _generate(Engine.start(settings, transport), request), transport, debug)


def as_head(body, transport: MpiTransport | None, debug: bool) -> int:
    """Run the head's work; on failure print one line, stop every rank, and return non-zero.

    Returns the body's own exit code when it gives one (an int), else 0.
    """
    try:
        result = body()
    except (PipeinferError, KeyboardInterrupt) as exc:
        if debug or os.environ.get("PIPEINFER_DEBUG"):
            traceback.print_exc()
        message = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc)
        print(f"error: {message}", file=sys.stderr, flush=True)
        return _stop_all(transport, 130 if isinstance(exc, KeyboardInterrupt) else 1)
    except Exception:  # a bug: show it, and still leave no rank behind
        traceback.print_exc()
        return _stop_all(transport, 1)
    if transport is not None:
        transport.finalize()
    return result if isinstance(result, int) else 0


def _stop_all(transport: MpiTransport | None, code: int) -> int:
    if transport is None:
        return code
    from pipeinfer_cpu.wire import runs as P

    for rank in range(1, transport.size):
        transport.send(rank, int(P.Tag.CONTROL), P.encode_json({"type": "shutdown"}))
    transport.flush(2.0)
    _await_goodbyes(transport, STOP_GRACE_S)  # meanwhile mpiexec passes the head's error line on
    transport.abort(code)  # kills any rank that is stuck; mpiexec then exits with `code`
    return code


def _await_goodbyes(transport: MpiTransport, grace_s: float) -> None:
    """Wait, at most `grace_s` in all, until every worker has said bye (skipping its other replies)."""
    from pipeinfer_cpu.wire import runs as P
    from pipeinfer_cpu.wire.transport import wait

    deadline = time.perf_counter() + grace_s
    for rank in range(1, transport.size):
        while (left := deadline - time.perf_counter()) > 0:
            message = wait(transport, [(rank, P.Tag.REPLY)], left)
            if message is None or P.decode_json(message.data).get("type") == "bye":
                break


def _generate(engine: Engine, request: GenerateRequest) -> None:
    """Answer each prompt in turn (a fresh context each), streaming text; then write the statistics."""
    records = []
    with engine:
        for index, prompt in enumerate(request.prompts):
            if index:
                engine.reset_context()
            records.append(_answer(engine, request, prompt))
    if request.stats_json is not None:
        write_json(records[0] if len(records) == 1 else {"runs": records}, request.stats_json)


def _answer(engine: Engine, request: GenerateRequest, prompt: str) -> dict:
    tokens = engine.encode(prompt, chat=request.chat_template, system=request.system)
    stream = TextStream(engine.vocab.piece)

    def show(token: int) -> None:
        if not engine.vocab.is_end(token):
            sys.stdout.write(stream.push(token))
            sys.stdout.flush()

    generation, stats = engine.generate(tokens, request.max_tokens, request.sampling, on_token=show,
                                        keep_first_logits=request.save_logits is not None)
    sys.stdout.write(stream.flush() + "\n")
    sys.stdout.flush()
    print(stats.summary_line(), file=sys.stderr, flush=True)
    if request.save_logits is not None and generation.first_logits is not None:
        _save_npy(request.save_logits, generation.first_logits)
    return {**stats.to_json_dict(), "prompt_tokens": list(generation.prompt_tokens),
            "tokens": list(generation.tokens), "stopped_by": generation.stopped_by,
            "cpu_backends": engine.backends_json()}


def _save_npy(path: Path, array: np.ndarray) -> None:
    from pipeinfer_cpu.files import atomic_output

    with atomic_output(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, array)
