"""`pipeinfer-cpu run` as the user sees it: prompts in, text streamed to stdout, statistics written.

This process owns what the user has (the text shown, the statistics so far); the model runs in
this process (`single`, or your own mpiexec), or in an MPI job this process starts and talks to
(app/client.py). Each prompt is answered in a fresh context.
"""

from __future__ import annotations

import base64
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeinfer_cpu.app.client import Client, JobEnded
from pipeinfer_cpu.app.connect import with_client
from pipeinfer_cpu.app.options import EngineOptions
from pipeinfer_cpu.files import atomic_output
from pipeinfer_cpu.head.server import sampling_json
from pipeinfer_cpu.sampling import SamplingConfig
from pipeinfer_cpu.stats import RunStats, write_json

START_WAIT_S = 300.0  # loading: shards may be written and sent first


@dataclass(frozen=True)
class GenerateRequest:
    prompts: tuple[str, ...]
    max_tokens: int
    sampling: SamplingConfig
    chat_template: bool = False
    system: str | None = None
    stats_json: Path | None = None
    save_logits: Path | None = None
    parse_special: bool = True  # raw prompts: special-token text (`<|im_start|>`) is those tokens, as in llama.cpp


def run_prompts(options: EngineOptions, request: GenerateRequest) -> int:
    """Answer every prompt; returns the exit code."""
    return with_client(options, lambda client: _answer_all(client, options, request))


@dataclass
class _Progress:
    """What the user has so far: the finished answers' statistics and the text of the one in progress."""

    records: list[dict] = field(default_factory=list)
    shown: list[str] = field(default_factory=list)

    def show(self, piece: str) -> None:
        self.shown.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()


def _answer_all(client: Client, options: EngineOptions, request: GenerateRequest) -> int:
    progress = _Progress()
    try:
        return _answer_each(client, options, request, progress)
    except JobEnded as exc:
        if not client.reported:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        if progress.shown:
            sys.stdout.write("\n")  # the answer so far stays, ended like any other
        # what was done, and the answer the failure cut short, with the tokens the user saw
        failure = {"message": str(exc), "answer_so_far": "".join(progress.shown),
                   "tokens_so_far": list(client.decided_ids)}
        _write_stats(request, progress.records, failure)
        return max(1, client.close())
    except KeyboardInterrupt:  # while the job was starting (Ctrl-C during an answer is an interrupt request)
        client.close()
        print("error: interrupted", file=sys.stderr, flush=True)
        return 130


def _answer_each(client: Client, options: EngineOptions, request: GenerateRequest, progress: _Progress) -> int:
    client.start(START_WAIT_S + 2 * options.timeout_s)
    code = 0
    for index, prompt in enumerate(request.prompts):
        progress.shown = []
        final = client.ask(_complete(request, prompt, fresh=index > 0), progress.show, 2 * options.timeout_s + 30)
        if final["event"] == "error":
            print(f"error: {final['message']}", file=sys.stderr, flush=True)
            code = 1
            break
        progress.shown = []
        sys.stdout.write("\n")
        sys.stdout.flush()
        print(RunStats.from_json_dict(final["stats"]).summary_line(), file=sys.stderr, flush=True)
        progress.records.append(final["stats"])
        if request.save_logits is not None and index == len(request.prompts) - 1 and "first_logits" in final:
            _save_npy(request.save_logits, final["first_logits"])
        if final["stopped_by"] == "interrupt":
            print("error: interrupted", file=sys.stderr, flush=True)
            code = 130
            break
    _write_stats(request, progress.records)
    return client.close() or code


def _write_stats(request: GenerateRequest, records: list[dict], failure: dict | None = None) -> None:
    """--stats-json: the one answer's statistics, or {"runs": [...]} for several; after a failure,
    {"runs": [...], "failure": {...}} with the answer it cut short."""
    if request.stats_json is None or not (records or failure):
        return
    if failure is not None:
        write_json({"runs": records, "failure": failure}, request.stats_json)
    else:
        write_json(records[0] if len(records) == 1 else {"runs": records}, request.stats_json)


def _complete(request: GenerateRequest, prompt: str, fresh: bool) -> dict:
    return {"type": "complete", "text": prompt, "chat_template": request.chat_template, "system": request.system,
            "parse_special": request.parse_special, "fresh": fresh, "max_tokens": request.max_tokens,
            "sampling": sampling_json(request.sampling), "keep_first_logits": request.save_logits is not None}


def _save_npy(path: Path, logits_b64: str) -> None:
    array = np.frombuffer(base64.b64decode(logits_b64), dtype="<f4").astype(np.float32)
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, array)
