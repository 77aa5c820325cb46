"""The target's shape and weights, read from its GGUF with gguf-py and dequantised to float32."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeinfer_cpu.errors import ModelError

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


def _reader(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} is not a readable GGUF file ({exc})") from exc


def _value(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def read_shape(reader) -> DecoderShape:
    """The decoder shape of a GGUF; a ModelError for a family the draft maker cannot copy."""
    arch = _value(reader, "general.architecture")
    if arch not in SUPPORTED:
        raise ModelError(f"draft distill supports the {', '.join(SUPPORTED)} architecture, not {arch!r}")
    key = lambda name: _value(reader, f"{arch}.{name}")  # noqa: E731
    n_head = int(key("attention.head_count"))
    tokens = reader.fields["tokenizer.ggml.tokens"]
    return DecoderShape(arch=arch, n_layer=int(key("block_count")), n_embd=int(key("embedding_length")),
                        n_head=n_head, n_head_kv=int(key("attention.head_count_kv") or n_head),
                        n_ff=int(key("feed_forward_length")), n_vocab=len(tokens.data),
                        rms_eps=float(key("attention.layer_norm_rms_epsilon")),
                        rope_base=float(key("rope.freq_base") or 10000.0))


def open_target(path: Path):
    """(reader, shape) of a target GGUF, after the architecture check."""
    reader = _reader(path)
    return reader, read_shape(reader)


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
