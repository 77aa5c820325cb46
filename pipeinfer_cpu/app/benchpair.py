"""A SYNTHETIC benchmark pair (target, draft) whose cost ratio and top-1 agreement are known.

No real draft exists for the default model (SmolLM2-135M): truncated-layer drafts agree 6-17%, and
its Q4_0 re-quantisation agrees 74% but costs almost the same. So speculation is benchmarked on a
pair built for the purpose (the recipe measured in shared/notes/llamacpp-stages.md):

- synthetic target = the default model + extra layers copied from its own, with both norm weights of
  every extra layer set to 0. An extra layer then sees a zero input, adds exactly zero to the residual
  stream and still costs a full layer of compute, so the target's text is SmolLM2's own.
- synthetic draft = the default model with every block norm weight multiplied by (1 + sigma * N(0, 1))
  (seeded), sigma calibrated by bisection until the draft's teacher-forced top-1 agreement with the
  target is the requested one. Perturbing the draft (not the target) keeps the target's text intact.

Every number measured on this pair must say it is synthetic; `pair.json` says so too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeinfer_cpu.errors import ModelError, UserError
from pipeinfer_cpu.files import atomic_output, atomic_write_text
from pipeinfer_cpu.llama.runtime import Stage, StageConfig, Vocab, requantize_q4_0
from pipeinfer_cpu.modelfiles.models import default_model_path, file_sha256, open_gguf, read_model_info
from pipeinfer_cpu.modelfiles.shards import write_gguf

PAIR_JSON = "pair.json"
TARGET_NAME = "synthetic-target.gguf"
DRAFT_NAME = "synthetic-draft.gguf"
REAL_DRAFT_NAME = "real-draft-q4_0.gguf"
NORMS = ("attn_norm.weight", "ffn_norm.weight")
# The output head (vocabulary matmul) costs about this many layers' worth per token, relative to the
# model's layer count: fitted to the measurement "30 layers + 90 zero-norm layers = 3.4x slower"
# (3.4 = (30 + 90 + h) / (30 + h) gives h = 7.5 = 0.25 * 30). Approximate for other models.
HEAD_COST_PER_LAYER = 0.25
# Measured sigma -> agreement for SmolLM2 (notes): the calibration's starting bracket.
SIGMA_TABLE = ((0.0, 1.0), (0.05, 0.91), (0.1, 0.84), (0.2, 0.63), (0.3, 0.42), (0.5, 0.01))
CALIBRATION_PROMPTS = (
    "What is the capital of France?",
    "Write a Python function that checks whether a number is prime.",
    "Write the opening paragraph of a story about a lighthouse keeper.",
    "Why is the sky blue?",
)
CALIBRATION_TOKENS = 64  # per prompt: 256 positions (binomial s.e. ~0.03 at 60%; prompts differ by more)
TOLERANCE = 0.03
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class BenchPair:
    """A SYNTHETIC target/draft pair and how it was made; also written as DIR/pair.json."""

    target: Path
    draft: Path
    cost_ratio_requested: float
    n_extra_layers: int
    sigma: float
    agreement_requested: float
    agreement_measured: float  # teacher-forced top-1 agreement of draft vs target, calibration prompts
    seed: int
    synthetic: bool = True


@dataclass(frozen=True)
class _Tensor:
    """A replacement tensor for `write_gguf`: raw data and its GGUF type."""

    data: np.ndarray
    tensor_type: object


# -- building the files ------------------------------------------------------------------------


def extra_layers_for(cost_ratio: float, n_layer: int) -> int:
    """Zero-norm layers to add so that target/draft cost per token is about `cost_ratio`.

    Cost per token ~ layers + head, the head worth HEAD_COST_PER_LAYER * n_layer layers, so
    ratio = (n + e + h) / (n + h) and e = (ratio - 1) * n * (1 + HEAD_COST_PER_LAYER), rounded.
    """
    if not cost_ratio >= 1.0:  # also refuses NaN
        raise UserError(f"--cost-ratio must be at least 1 (the target is the draft plus layers), got {cost_ratio}")
    if n_layer < 1:
        raise ValueError(f"n_layer must be positive, got {n_layer}")
    return round((cost_ratio - 1.0) * n_layer * (1.0 + HEAD_COST_PER_LAYER))


def make_target(source: Path, n_extra_layers: int, out: Path) -> Path:
    """Write the SYNTHETIC target: `source` plus `n_extra_layers` copies of its own layers (cycling
    through them) whose attn/ffn norm weights are 0, so they cost compute but change nothing."""
    reader = open_gguf(source)
    blocks: dict[int, list] = {}
    for tensor in reader.tensors:
        match = _BLOCK.match(tensor.name)
        if match is not None:
            blocks.setdefault(int(match[1]), []).append((match[2], tensor))
    n_layer, arch = len(blocks), _arch(reader)
    tensors = [(t.name, t) for t in reader.tensors]
    for extra in range(n_extra_layers):
        for rest, tensor in blocks[extra % n_layer]:
            data = np.zeros_like(_f32(tensor)) if rest in NORMS else tensor.data
            tensors.append((f"blk.{n_layer + extra}.{rest}", _Tensor(data, tensor.tensor_type)))
    with atomic_output(out) as tmp:
        write_gguf(reader, arch, tmp, tensors, {f"{arch}.block_count": n_layer + n_extra_layers})
    return out


def make_draft(source: Path, sigma: float, seed: int, out: Path) -> Path:
    """Write a SYNTHETIC draft: every block norm weight times (1 + sigma * N(0, 1)), drawn from a
    seeded generator in file order, so (source, sigma, seed) always gives the same bytes."""
    return _write_draft(open_gguf(source), sigma, seed, out)


def _write_draft(reader, sigma: float, seed: int, out: Path) -> Path:
    """make_draft from an open reader (opening SmolLM2's GGUF costs ~3 s: calibration opens it once)."""
    rng = np.random.default_rng(seed)
    tensors: list = []
    for tensor in reader.tensors:
        match = _BLOCK.match(tensor.name)
        if match is not None and match[2] in NORMS:
            weight = _f32(tensor)
            scaled = weight * (1.0 + sigma * rng.standard_normal(weight.shape))
            tensors.append((tensor.name, _Tensor(scaled.astype(np.float32), tensor.tensor_type)))
        else:
            tensors.append((tensor.name, tensor))
    with atomic_output(out) as tmp:
        write_gguf(reader, _arch(reader), tmp, tensors, {})
    return out


def _arch(reader) -> str:
    field = reader.fields["general.architecture"]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def _f32(tensor) -> np.ndarray:
    if tensor.tensor_type.name != "F32":
        raise ModelError(f"{tensor.name} is {tensor.tensor_type.name}; the bench pair needs F32 norm weights")
    return np.asarray(tensor.data, dtype=np.float32)


def make_real_pair(out_dir: Path, source: Path | None = None) -> tuple[Path, Path]:
    """The REAL (not synthetic) pair for tests: the Q4_1 source as target and its Q4_0
    re-quantisation by llama.cpp's quantiser as draft (~74% agreement, about the same cost)."""
    source = Path(source or default_model_path())
    draft = Path(out_dir) / REAL_DRAFT_NAME
    if not draft.is_file():
        with atomic_output(draft) as tmp:
            requantize_q4_0(source, tmp)
    return source, draft


def batched_source(out_dir: Path, source: Path | None = None) -> Path:
    """The source re-quantised to pure Q4_0, cached in out_dir: the bench pair's default base.

    Why: llama.cpp's CPU backend has a batched matrix kernel for Q4_0 but not for Q4_1, the default
    model's type. Measured on this project's 2-core machine, 1 thread, SmolLM2 layers only: a batch of
    4 tokens costs 3.2x one token in Q4_1 but 1.5x in Q4_0, and 8 tokens 5.7x against 2.7x.
    Verifying k draft tokens in one run is what speculation sells, so a Q4_1 pair would measure
    the missing kernel rather than the schedulers. The text is still SmolLM2's (a Q4_0 copy).
    """
    path = Path(out_dir) / "source-pure-q4_0.gguf"
    if not path.is_file():
        source = Path(source or default_model_path())
        with atomic_output(path) as tmp:
            requantize_q4_0(source, tmp, pure=True)
    return path


# -- measuring agreement -----------------------------------------------------------------------


@dataclass(frozen=True)
class Continuation:
    """A chat prompt's tokens and the target's greedy continuation of it."""

    prompt: tuple[int, ...]
    tokens: tuple[int, ...]


def chat_tokens(path: Path, prompts: Sequence[str]) -> list[list[int]]:
    """Each prompt as one user turn in the model's chat template, tokenised as Engine.encode(chat=True) does."""
    vocab = Vocab(path)
    try:
        return [vocab.chat_tokens([("user", p)]) for p in prompts]
    finally:
        vocab.close()


def target_continuations(target: Path, prompts: Sequence[str], n_tokens: int, n_threads: int) -> tuple[Continuation, ...]:
    """Greedy-generate up to n_tokens per prompt, each a chat turn, with the target (stopping at end of generation)."""
    return continuations(target, chat_tokens(target, prompts), n_tokens, n_threads)


def continuations(target: Path, prompt_ids: Sequence[Sequence[int]], n_tokens: int,
                  n_threads: int) -> tuple[Continuation, ...]:
    """Greedy-generate up to n_tokens after each tokenised prompt with the target (stopping at end of generation)."""
    vocab = Vocab(target)
    stage = _open_stage(target, max(len(p) for p in prompt_ids) + n_tokens, n_threads)
    try:
        return tuple(Continuation(tuple(p), tuple(greedy(stage, p, n_tokens, vocab.is_end))) for p in prompt_ids)
    finally:
        stage.close()
        vocab.close()


def greedy(stage: Stage, prompt: Sequence[int], n_tokens: int, is_end: Callable[[int], bool]) -> list[int]:
    """Plain greedy decoding, one token per decode, from an empty KV cache."""
    stage.clear()
    n = len(prompt)
    logits = stage.decode(range(n), [[0]] * n, tokens=prompt, outputs=[i == n - 1 for i in range(n)])
    tokens: list[int] = []
    while True:
        tokens.append(int(np.argmax(logits[-1])))
        if len(tokens) == n_tokens or is_end(tokens[-1]):
            return tokens
        logits = stage.decode([n + len(tokens) - 1], [[0]], tokens=tokens[-1:])


def draft_agreement(draft: Path, continuations: Sequence[Continuation], n_threads: int) -> float:
    """Teacher-forced top-1 agreement: the draft reads each prompt + continuation in one batch and
    predicts every continuation token; the fraction it gets right."""
    longest = max(len(c.prompt) + len(c.tokens) for c in continuations)
    stage = _open_stage(draft, longest, n_threads)
    agree = total = 0
    try:
        for c in continuations:
            stage.clear()
            tokens = list(c.prompt) + list(c.tokens[:-1])
            outputs = [i >= len(c.prompt) - 1 for i in range(len(tokens))]
            logits = stage.decode(range(len(tokens)), [[0]] * len(tokens), tokens=tokens, outputs=outputs)
            agree += int(np.sum(np.argmax(logits, axis=1) == np.asarray(c.tokens)))
            total += len(c.tokens)
    finally:
        stage.close()
    return agree / total


def agreement(target: Path, draft: Path, prompts: Sequence[str], n_tokens: int, n_threads: int) -> float:
    """Top-1 agreement of `draft` with `target` on the target's greedy text (see draft_agreement)."""
    return draft_agreement(draft, target_continuations(target, prompts, n_tokens, n_threads), n_threads)


def _open_stage(path: Path, n_tokens: int, n_threads: int) -> Stage:
    size = -(-n_tokens // 64) * 64  # one batch holds a whole sequence
    return Stage(StageConfig(path, is_first=True, is_last=True, n_ctx=size, n_batch=size, n_threads=n_threads))


# -- calibration -------------------------------------------------------------------------------


def search_sigma(
    measure: Callable[[float], float],
    wanted: float,
    tolerance: float,
    max_steps: int,
    table: Sequence[tuple[float, float]] = SIGMA_TABLE,
) -> tuple[float, float]:
    """Find sigma whose measured agreement is within `tolerance` of `wanted` (agreement falls as
    sigma grows; sigma 0 is the source itself, agreement ~1). The first guess interpolates `table`;
    sigma doubles until a measurement falls below `wanted`, then the bracket shrinks by
    interpolation kept 10% away from its ends (never slower than a 0.9 shrink per step).
    Returns the measured (sigma, agreement) closest to `wanted`."""
    lo, hi = (0.0, 1.0), None
    sigma = float(np.interp(-wanted, [-a for _, a in table], [s for s, _ in table]))
    best: tuple[float, float] | None = None
    for _ in range(max_steps):
        measured = measure(sigma)
        if best is None or abs(measured - wanted) < abs(best[1] - wanted):
            best = (sigma, measured)
        if abs(measured - wanted) <= tolerance:
            break
        lo, hi = ((sigma, measured), hi) if measured > wanted else (lo, (sigma, measured))
        sigma = 2 * sigma if hi is None else _interpolate(lo, hi, wanted)
    if best is None:
        raise ValueError(f"max_steps must be at least 1, got {max_steps}")
    return best


def _interpolate(lo: tuple[float, float], hi: tuple[float, float], wanted: float) -> float:
    """The sigma where the line through lo and hi (sigma, agreement) meets `wanted`, kept inside."""
    span = hi[0] - lo[0]
    guess = lo[0] + span * (lo[1] - wanted) / (lo[1] - hi[1]) if lo[1] != hi[1] else lo[0]
    return float(np.clip(guess, lo[0] + 0.1 * span, hi[0] - 0.1 * span))


def calibrate_sigma(
    target: Path,
    source: Path,
    agreement_wanted: float,
    seed: int,
    out_dir: Path,
    tolerance: float = TOLERANCE,
    max_steps: int = 8,
    prompts: Sequence[str] = CALIBRATION_PROMPTS,
    n_tokens: int = CALIBRATION_TOKENS,
    n_threads: int = 2,
    progress: Callable[[str], None] | None = None,
) -> tuple[float, float]:
    """Calibrate the SYNTHETIC draft's sigma against the target; leave the best draft at
    out_dir/DRAFT_NAME and return (sigma, measured agreement). The target's greedy text is
    generated once and reused by every step (it is the slow part)."""
    continuations = target_continuations(target, prompts, n_tokens, n_threads)
    reader = open_gguf(source)
    candidate = Path(out_dir) / f"candidate-{DRAFT_NAME}"

    def measure(sigma: float) -> float:
        measured = draft_agreement(_write_draft(reader, sigma, seed, candidate), continuations, n_threads)
        if progress:
            progress(f"synthetic draft sigma {sigma:.4f}: agreement {measured:.3f} (wanted {agreement_wanted:.3f})")
        return measured

    try:
        sigma, measured = search_sigma(measure, agreement_wanted, tolerance, max_steps)
    finally:
        candidate.unlink(missing_ok=True)
    _write_draft(reader, sigma, seed, Path(out_dir) / DRAFT_NAME)  # seeded: the same bytes as measured
    return sigma, measured


# -- the pair ----------------------------------------------------------------------------------


def build_bench_pair(
    cost_ratio: float,
    agreement: float,
    out_dir: Path,
    seed: int = 0,
    source: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> BenchPair:
    """Build (or reuse from out_dir) the SYNTHETIC pair for `cost_ratio` and `agreement`."""
    check_request(cost_ratio, agreement)
    source = Path(source or default_model_path())
    info = read_model_info(source)
    n_extra = extra_layers_for(cost_ratio, info.n_layer)
    out_dir = Path(out_dir).resolve()
    request = pair_request(source, cost_ratio, agreement, seed)
    cached = load_pair(out_dir, request)
    if cached is not None:
        return cached
    if progress:
        progress(f"writing the synthetic target: {info.n_layer} + {n_extra} zero-norm layers")
    target = make_target(source, n_extra, out_dir / TARGET_NAME)
    sigma, measured = calibrate_sigma(target, source, agreement, seed, out_dir, progress=progress)
    pair = BenchPair(target, out_dir / DRAFT_NAME, cost_ratio, n_extra, sigma, agreement, measured, seed)
    write_pair(out_dir, pair, source, request)
    return pair


def check_request(cost_ratio: float, agreement: float) -> None:
    """Refuse a pair that cannot be built, before anything is written."""
    if not 0.0 < agreement < 1.0:
        raise UserError(f"--agreement must be a fraction strictly between 0 and 1 (e.g. 0.6), got {agreement}")
    extra_layers_for(cost_ratio, 1)  # raises for a ratio below 1


def pair_request(source: Path, cost_ratio: float, agreement: float, seed: int) -> dict:
    """What a pair answers: a pair.json with the same request is reused instead of rebuilt."""
    return {"source_sha256": file_sha256(source), "cost_ratio": cost_ratio, "agreement": agreement, "seed": seed,
            "prompts": list(CALIBRATION_PROMPTS), "n_tokens": CALIBRATION_TOKENS, "tolerance": TOLERANCE}


def write_pair(out_dir: Path, pair: BenchPair, source: Path, request: dict) -> None:
    """Record the SYNTHETIC pair, its request and its file sizes in out_dir/pair.json (atomically)."""
    data = {key: str(value) if isinstance(value, Path) else value for key, value in asdict(pair).items()}
    note = ("SYNTHETIC benchmark pair: target = source + zero-norm layers (same text, more compute); "
            "draft = source with perturbed norm weights; not a real draft model")
    files = {str(p): p.stat().st_size for p in (pair.target, pair.draft)}
    atomic_write_text(out_dir / PAIR_JSON, json.dumps(
        {"note": note, **data, "source": str(source), "request": request, "file_bytes": files}, indent=2))


def load_pair(out_dir: Path, request: dict) -> BenchPair | None:
    """The pair recorded in out_dir/pair.json if it answers the same request and its files are intact."""
    try:
        data = json.loads((Path(out_dir) / PAIR_JSON).read_text())
        files = data.pop("file_bytes")
        same = data.pop("request") == request
        fields = {k: data[k] for k in BenchPair.__dataclass_fields__}
    except (OSError, ValueError, KeyError, AttributeError):
        return None
    intact = all(Path(p).is_file() and Path(p).stat().st_size == size for p, size in files.items())
    if not (same and intact):
        return None
    return BenchPair(**{**fields, "target": Path(fields["target"]), "draft": Path(fields["draft"])})
