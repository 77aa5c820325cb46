"""A rank of a calibration job (`hosts calibrate`): time decode runs of the model's first layers on this
host, with the llama.cpp build, CPU backend and thread count that its pipeline stage would run.

The head sends shards of layers [0, k) for two depths k1 < k2. Run as inner stages (hidden states
out), their difference over k2 - k1 is one layer's cost, free of what every run pays whatever its
depth (embedding lookup, graph set-up, waking the threads); the shallower shard run as the last
stage (final norm and vocabulary projection, logits out) minus its inner run is the output layer's
cost. Each round times every (case, tokens per run) once, in turn, so a drift in the machine's
speed touches all cases alike; the report holds the medians over the rounds.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Sequence

from pipeinfer_cpu.llama.runtime import Stage, StageConfig
from pipeinfer_cpu.wire import control as C

PREFIX = 16  # tokens in the KV cache before every timed run, so each run sees the same context
WARM_UP_ROUNDS = 2
MIN_ROUNDS = 5
MAX_ROUNDS = 200
FLOOR_S = 1e-7  # a difference lost in the noise is reported as this, never as zero or less

Table = tuple[tuple[int, float], ...]


def measure(paths: Sequence[Path], request: C.Calibrate) -> C.CalibrationReport:
    """Load the shards (`paths[i]` holds `request.shards[i]`), time them, and say what one layer and the output cost."""
    counts = request.token_counts
    cases = [_stage(path, False, request) for path in paths] + [_stage(paths[0], True, request)]
    try:
        samples = time_rounds(cases, counts, request.budget_s)
    finally:
        for stage in cases:
            stage.close()
    medians = [[statistics.median(times) for times in by_count] for by_count in samples]
    layers = [shard.end - shard.start for shard in request.shards]
    layer, output, run = tables(layers, counts, medians[:-1], medians[-1])
    return C.CalibrationReport(layer, output, len(samples[0][0]), spread(samples), run)


def tables(layers: Sequence[int], counts: Sequence[int], hidden: Sequence[Sequence[float]],
           logits: Sequence[float]) -> tuple[Table, Table, Table]:
    """Seconds per run of one layer, of the output layer and of the run itself (what is left of the
    shallowest shard's time beside its layers), by tokens per run, from median run times:
    `hidden[i][j]` of the shard of `layers[i]` layers as an inner stage with `counts[j]` tokens, and
    `logits[j]` of the first (shallowest) shard as the last stage. With one shard (a model that
    shallow) a layer's cost keeps its share of the fixed costs."""
    layer, output, run = [], [], []
    for j, n in enumerate(counts):
        if len(layers) > 1:
            per_layer = (hidden[-1][j] - hidden[0][j]) / (layers[-1] - layers[0])
        else:
            per_layer = hidden[0][j] / layers[0]
        layer.append((n, max(FLOOR_S, per_layer)))
        output.append((n, max(FLOOR_S, logits[j] - hidden[0][j])))
        run.append((n, max(0.0, hidden[0][j] - layers[0] * layer[-1][1])))
    return tuple(layer), tuple(output), tuple(run)


def spread(samples: Sequence[Sequence[Sequence[float]]]) -> float:
    """The typical ratio of a case's median run to its fastest: near 1 on an idle host; well above it when
    other processes took the CPU during the runs (then the medians, and the weights, are not to be trusted)."""
    return statistics.median(statistics.median(times) / min(times) for by_count in samples for times in by_count)


def time_rounds(cases: Sequence[Stage], counts: Sequence[int], budget_s: float) -> list[list[list[float]]]:
    """Seconds of each timed run, [case][count index][round]: warm-up rounds first (not kept), then
    rounds until `budget_s` has passed, at least MIN_ROUNDS and at most MAX_ROUNDS of them."""
    tokens = _tokens(cases[0].n_vocab, max(counts) + PREFIX)
    for stage in cases:
        stage.decode(range(PREFIX), [(0,)] * PREFIX, tokens=tokens[:PREFIX])
    for _ in range(WARM_UP_ROUNDS):
        _round(cases, counts, tokens)
    samples: list[list[list[float]]] = [[[] for _ in counts] for _ in cases]
    started, rounds = time.perf_counter(), 0
    while rounds < MIN_ROUNDS or (rounds < MAX_ROUNDS and time.perf_counter() - started < budget_s):
        for by_count, times in zip(samples, _round(cases, counts, tokens)):
            for kept, elapsed in zip(by_count, times):
                kept.append(elapsed)
        rounds += 1
    return samples


def _round(cases: Sequence[Stage], counts: Sequence[int], tokens: Sequence[int]) -> list[list[float]]:
    """One timed run of every case with every token count, [case][count index]."""
    return [[_timed_run(stage, tokens[PREFIX:PREFIX + n]) for n in counts] for stage in cases]


def _timed_run(stage: Stage, tokens: Sequence[int]) -> float:
    """Seconds to decode `tokens` after the prefix; the cache is then cut back to the prefix."""
    n = len(tokens)
    started = time.perf_counter()
    stage.decode(range(PREFIX, PREFIX + n), [(0,)] * n, tokens=tokens)
    elapsed = time.perf_counter() - started
    stage.seq_rm(0, PREFIX, -1)
    return elapsed


def _stage(path: Path, is_last: bool, request: C.Calibrate) -> Stage:
    """A first stage (token ids in) over a calibration shard, as small a context as the runs need."""
    n_batch = max(PREFIX, *request.token_counts)
    return Stage(StageConfig(path, True, is_last, n_ctx=PREFIX + n_batch + 16, n_batch=n_batch,
                             n_threads=request.n_threads, llama=request.llama))


def _tokens(n_vocab: int, count: int) -> list[int]:
    """Ordinary token ids spread over the vocabulary (the cost of a run does not depend on which)."""
    return [(11 + 7919 * i) % n_vocab for i in range(count)]
