"""Which GGUF architectures can be cut into pipeline stages, and what a stage of each must do.

A stage is a GGUF of its own, its layer range renumbered from 0 (modelfiles/shards.py), fed the
previous stage's hidden states through the batch's `embd` (llama/runtime.py). That equals the whole
model only where llama.cpp's graph is a plain stack of blocks and every per-layer fact travels with
the shard. Each architecture in `VERIFIED` is proved by tests/test_architecture_pipelines.py: greedy
pipelines of 2 and 3 stages give the tokens of the whole model, and bit-identical logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Architecture:
    """What splitting one verified architecture takes beyond cutting its blocks."""

    name: str
    # llama.cpp's default period of `<arch>.attention.sliding_window_pattern` (load_swa_pattern's
    # n): a shard gets explicit per-layer flags, as renumbering its blocks would shift the period.
    swa_period: int | None = None
    # The graph tensor that scales the input whatever it is (gemma's `inp_scaled`): a later stage
    # overwrites it with the hidden states it receives, which must not be scaled a second time.
    scaled_input: str | None = None
    # `scaled_input` only when this `<arch>.` key is non-zero (granite's optional embedding scale).
    scaled_input_key: str | None = None
    # Depths at which llama.cpp picks a hyperparameter by the layer count itself (Gemma 27B's
    # attention scale): a shard has another count, so it would compute another model.
    sized_by_depth: tuple[int, ...] = ()


VERIFIED: dict[str, Architecture] = {arch.name: arch for arch in (
    Architecture("llama"),
    Architecture("qwen2"),
    Architecture("qwen3"),
    Architecture("gemma", scaled_input="inp_scaled"),
    Architecture("gemma2", swa_period=2, scaled_input="inp_scaled", sized_by_depth=(46,)),
    Architecture("gemma3", swa_period=6, sized_by_depth=(62,)),  # scales token input only
    Architecture("phi3"),
    Architecture("starcoder2"),
    Architecture("olmo2", swa_period=4),
    Architecture("stablelm"),
    Architecture("granite", scaled_input="embd", scaled_input_key="embedding_scale"),
    Architecture("internlm2"),
    Architecture("exaone"),
)}

_RECURRENT = "recurrent state, which the stages' KV-cache operations cannot roll back"
_HYBRID = "hybrid attention and recurrent layers, whose state the stages' KV-cache operations cannot roll back"
_ENCODER = "an encoder (embedding) model, not a text generator"
CANNOT_SPLIT: dict[str, str] = {
    **dict.fromkeys(("mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7"), _RECURRENT),
    **dict.fromkeys(("jamba", "falcon-h1", "plamo2", "granitehybrid", "lfm2", "lfm2moe", "nemotron_h",
                     "nemotron_h_moe", "qwen3next", "qwen35", "qwen35moe", "kimi-linear", "minimax-01"), _HYBRID),
    **dict.fromkeys(("bert", "modern-bert", "nomic-bert", "nomic-bert-moe", "neo-bert", "jina-bert-v2",
                     "jina-bert-v3", "eurobert", "t5encoder", "gemma-embedding", "llama-embed"), _ENCODER),
    "t5": "an encoder-decoder model",
    "clip": "a multimodal projector (mmproj) file, not a language model",
    "smollm3": "every 4th layer skips RoPE, counted from the file's first layer",
    "llama4": "its chunked-attention, RoPE-less and MoE layers are counted from the file's first layer",
    "exaone4": "llama.cpp turns sliding-window attention on only for a 64-layer file",
    "gemma3n": "per-layer embeddings and AltUp span the whole layer stack",
}


def refusal(file_name: str, arch: str, n_layer: int) -> str | None:
    """Why a model cannot be split into pipeline stages (one line), or None when it can."""
    cannot = f"{file_name}: architecture {arch!r} cannot be split into pipeline stages yet"
    if arch in CANNOT_SPLIT:
        return f"{cannot} ({CANNOT_SPLIT[arch]})"
    if arch not in VERIFIED:
        return f"{file_name}: architecture {arch!r} is not verified yet (verified: {', '.join(VERIFIED)})"
    if n_layer in VERIFIED[arch].sized_by_depth:
        return (f"{file_name}: architecture {arch!r} with {n_layer} layers cannot be split into pipeline stages "
                f"yet (llama.cpp picks its attention scale by the layer count, which a shard changes)")
    return None


def swa_flags(pattern: object, period: int, n_layer: int) -> list[bool]:
    """llama.cpp's per-layer sliding-window flags (load_swa_pattern): the file's own flags, else of
    the file's period or the architecture's, layer il slides unless it ends a period (n = 0: all)."""
    if isinstance(pattern, list):
        return [bool(flag) for flag in pattern[:n_layer]] + [False] * (n_layer - len(pattern))
    n = period if pattern is None else int(pattern)
    return [n == 0 or il % n < n - 1 for il in range(n_layer)]


def stage_input_tensor(arch: str, metadata: Callable[[str], str | None]) -> str | None:
    """The graph tensor a stage fed hidden states must overwrite with them (None: nothing to do);
    `metadata` reads one of the model's metadata values as text."""
    spec = VERIFIED.get(arch)
    if spec is None or spec.scaled_input is None:
        return None
    if spec.scaled_input_key is None:
        return spec.scaled_input
    value = metadata(f"{arch}.{spec.scaled_input_key}")
    return spec.scaled_input if value is not None and float(value) != 0.0 else None
