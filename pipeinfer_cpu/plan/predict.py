"""`predict(inputs, mode)`: the head's own loop for a mode, run against the simulated cluster.

The pipeline mode runs `Decoder.generate`, speculative `speculative.generate`, pipeinfer
`pipeinfer.generate` with a fresh `SpeculationSwitch`: the very code `pipeinfer-cpu run` uses,
with a `SimPipeline` as its executor, a `SimDraft` as its draft and a `SimClock` on its context.
Decode tokens/s and inter-token latencies are computed as `RunStats` computes them (from the
first decided token to the last), and the occupancy of every resource over that window says
where the time went.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from pipeinfer_cpu.errors import UserError
from pipeinfer_cpu.head import pipeinfer, speculative
from pipeinfer_cpu.head.decoding import Decoder, Generation
from pipeinfer_cpu.head.modes import Mode
from pipeinfer_cpu.head.session import Context
from pipeinfer_cpu.head.specdecode import Request, SpecCounters, SpecSettings
from pipeinfer_cpu.head.speculation import SpeculationSwitch
from pipeinfer_cpu.plan.inputs import ModelInputs
from pipeinfer_cpu.plan.simulation import SimClock, SimDraft, SimPipeline, SimulationError, TargetText
from pipeinfer_cpu.sampling import SamplingConfig
from pipeinfer_cpu.stats import RunStats

MODES = (Mode.PIPELINE, Mode.SPECULATIVE, Mode.PIPEINFER)
SATURATED = 0.9  # a resource occupied this much of the decode time is what limits it


@dataclass(frozen=True)
class Prediction:
    """What the model predicts for one mode on one set of inputs."""

    mode: str
    tokens_per_s: float  # decode: (n - 1) / (last token - first token)
    itl_mean_s: float
    itl_p50_s: float
    itl_p95_s: float
    ttft_s: float
    acceptance: float | None  # confirmed / drafted draft tokens (the speculative modes)
    runs_launched: int
    runs_cancelled: int
    occupancy: dict  # resource -> fraction of the decode window it was occupied
    bottleneck: str  # the most occupied resource: "compute stage k", "link ...", "head" or "draft"
    saturated: bool  # the bottleneck was occupied >= SATURATED of the time (else: latency-bound)

    def shares(self) -> dict[str, float]:
        """Where the occupied time went, by kind: compute, links, head, draft (fractions summing to 1)."""
        kinds = {"compute": 0.0, "links": 0.0, "head": 0.0, "draft": 0.0}
        for name, value in self.occupancy.items():
            kinds["compute" if name.startswith("compute") else "links" if "link" in name else name] += value
        total = sum(kinds.values()) or 1.0
        return {kind: value / total for kind, value in kinds.items() if value > 0}

    def to_json(self) -> dict:
        return {**asdict(self), "shares": self.shares()}


def predict(inputs: ModelInputs, mode: Mode | str, n_tokens: int = 256, prompt_tokens: int = 16,
            spec: SpecSettings | None = None, seed: int = 0, n_batch: int = 256) -> Prediction:
    """Simulate one greedy request of `n_tokens` after a `prompt_tokens` prompt in `mode`.
    `spec` are the speculation settings (the command line's defaults when None)."""
    mode = _mode(mode)
    if n_tokens < 2 or prompt_tokens < 1:
        raise UserError(f"predict needs at least 2 tokens after a prompt of at least 1, got {n_tokens}, {prompt_tokens}")
    clock = SimClock()
    text = TargetText(inputs.acceptance, seed, prompt_tokens + n_tokens + 64)
    pipeline = SimPipeline(inputs, clock, text)
    context = Context(pipeline, clock)
    prompt = [text.token(p) for p in range(prompt_tokens)]
    draft = None
    counters = None
    if mode == Mode.PIPELINE:
        decoder = Decoder(context, n_batch, prompt_tokens + n_tokens + 8)
        generation = decoder.generate(prompt, n_tokens, SamplingConfig(), lambda token: False)
    else:
        draft = SimDraft(inputs, clock, text)
        settings = spec or SpecSettings(mode)
        settings = SpecSettings(**{**asdict(settings), "mode": mode})
        request = Request(tuple(prompt), n_tokens, SamplingConfig(), lambda token: False, lambda token: None,
                          lambda: False)
        if mode == Mode.SPECULATIVE:
            generation, counters = speculative.generate(context, draft, settings, request, n_batch, math.inf)
        else:
            switch = SpeculationSwitch.for_stages(len(inputs.stages))
            generation, counters = pipeinfer.generate(context, draft, settings, request, n_batch, math.inf, switch)
    expected = tuple(text.token(p) for p in range(prompt_tokens, prompt_tokens + n_tokens))
    if generation.tokens != expected:
        raise SimulationError(f"the simulated {mode} run did not decide the target's text")
    return _prediction(mode, generation, counters, inputs, clock, pipeline, draft)


def _mode(mode: Mode | str) -> Mode:
    try:
        mode = Mode(mode)
    except ValueError:
        mode = None
    if mode not in MODES:
        raise UserError(f"the performance model knows modes {', '.join(m.value for m in MODES)}, not {mode!r}")
    return mode


def _prediction(mode: Mode, generation: Generation, counters: SpecCounters | None, inputs: ModelInputs,
                clock: SimClock, pipeline: SimPipeline, draft: SimDraft | None) -> Prediction:
    times = generation.token_times_s
    stats = RunStats(mode=mode, n_prompt=len(generation.prompt_tokens), n_generated=len(times),
                     prefill_s=generation.prefill_s, ttft_s=times[0], token_times_s=times, bytes_sent=0,
                     stages=(), head_peak_rss_bytes=0)
    window = (times[0], times[-1])
    occupancy = _occupancy(inputs, clock, pipeline, draft, window)
    bottleneck = max(occupancy, key=occupancy.get)
    acceptance = None
    if counters is not None and counters.drafted:
        acceptance = counters.confirmed / counters.drafted
    return Prediction(mode.value, stats.decode_tokens_per_s or 0.0, stats.itl_mean_s or 0.0, stats.itl_p50_s or 0.0,
                      stats.itl_p95_s or 0.0, stats.ttft_s, acceptance,
                      counters.runs_launched if counters else len(pipeline.runs),
                      counters.runs_cancelled if counters else 0, occupancy, bottleneck,
                      occupancy[bottleneck] >= SATURATED)


def _occupancy(inputs: ModelInputs, clock: SimClock, pipeline: SimPipeline, draft: SimDraft | None,
               window: tuple[float, float]) -> dict[str, float]:
    """Fraction of the window each resource was occupied: a stage computing (aborted work too), a hop
    with a message on it (serialisation or delay), the head working, the draft drafting."""
    n = len(inputs.stages)
    busy: dict[str, list[tuple[float, float]]] = {}
    for run in pipeline.runs:
        for stage, start, end, _ in run.intervals:
            busy.setdefault(f"compute stage {stage}", []).append((start, end))
        for hop, start, _, arrive in run.transfers:
            busy.setdefault(_hop_name(hop, n), []).append((start, arrive))
    busy["head"] = clock.busy_intervals
    if draft is not None:
        busy["draft"] = [(a.start, a.end) for a in draft.asks]
    span = window[1] - window[0]
    if span <= 0:
        return {name: 0.0 for name in busy}
    return {name: _covered(intervals, window) / span for name, intervals in busy.items()}


def _hop_name(hop: int, n_stages: int) -> str:
    source = "head" if hop == 0 else f"stage {hop - 1}"
    target = "head" if hop == n_stages else f"stage {hop}"
    return f"link {source}->{target}"


def _covered(intervals: list[tuple[float, float]], window: tuple[float, float]) -> float:
    """The length of the union of `intervals` inside `window`."""
    total, reach = 0.0, window[0]
    for start, end in sorted(intervals):
        start, end = max(start, reach), min(end, window[1])
        if end > start:
            total += end - start
            reach = end
    return total
