"""The target's shape and weights, read from its GGUF with gguf-py and dequantised to float32."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeinfer_cpu.errors import ModelError
from pipeinfer_cpu.modelfiles.models import open_gguf, read_header

# Families the draft can copy: llama's block (RMSNorm, rotary attention with grouped KV heads, SwiGLU).
# qwen2 adds biases to q/k/v and uses the half-split rotary layout; not done yet.
SUPPORTED = ("llama",)
_ROPE_PAIRS = {"llama": "adjacent"}  # llama.cpp's rope type NORM: rotates (x[2i], x[2i+1])


@dataclass(frozen=True)
class DecoderShape:
    """The numbers a llama-family decoder is built from."""

    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    rms_eps: float
    rope_base: float

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def with_layers(self, n_layer: int) -> "DecoderShape":
        return DecoderShape(self.arch, n_layer, self.n_embd, self.n_head, self.n_head_kv, self.n_ff,
                            self.n_vocab, self.rms_eps, self.rope_base)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def read_shape(path: Path) -> DecoderShape:
    """The decoder shape of a GGUF, from the project's one-pass header reader (gguf's reader parses the
    whole tokenizer first); a ModelError for a family the draft maker cannot copy."""
    header = read_header(path)
    arch = header.values.get("general.architecture")
    if arch not in SUPPORTED:
        raise ModelError(f"draft distill supports the {', '.join(SUPPORTED)} architecture, not {arch!r}")
    number = lambda name, default=None: header.values.get(f"{arch}.{name}", default)  # noqa: E731
    n_head = int(number("attention.head_count"))
    return DecoderShape(arch=arch, n_layer=int(number("block_count")), n_embd=int(number("embedding_length")),
                        n_head=n_head, n_head_kv=int(number("attention.head_count_kv", n_head)),
                        n_ff=int(number("feed_forward_length")), n_vocab=header.n_vocab,
                        rms_eps=float(number("attention.layer_norm_rms_epsilon")),
                        rope_base=float(number("rope.freq_base", 10000.0)))


def open_target(path: Path):
    """(gguf reader, shape) of a target GGUF, after the architecture check."""
    shape = read_shape(path)
    return open_gguf(path), shape


def dequantised(tensor) -> np.ndarray:
    """One GGUF tensor as float32 in torch's layout ([out, in] for a matrix)."""
    import gguf

    return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)


def read_weights(reader) -> dict[str, np.ndarray]:
    """Every tensor of the target, dequantised, by its GGUF name; `output.weight` is the embedding
    when the file has none (tied)."""
    weights = {tensor.name: dequantised(tensor) for tensor in reader.tensors}
    weights.setdefault("output.weight", weights["token_embd.weight"])
    return weights
