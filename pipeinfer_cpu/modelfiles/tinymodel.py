"""SYNTHETIC tiny llama-architecture GGUFs with random weights and a vocabulary of any size.

They exist to exercise what real models of that shape exercise — Qwen's 151,936-token and Gemma 3's
262,144-token logits rows on the wire, a split of any depth — in seconds and a few tens of MB.
Their text is random tokens: never report a quality number on one, and label any speed measured
on one as synthetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeinfer_cpu.files import atomic_output

_SPECIALS = ("<unk>", "<s>", "</s>")
_UNKNOWN, _NORMAL, _CONTROL, _BYTE = 2, 1, 3, 6  # llama.cpp's token types
_WORDS = ("the", "a", "of", "and", "to", "in", "is", "it", "you", "that", "he", "was", "for", "on", "are",
          "with", "as", "I", "his", "they", "be", "at", "one", "have", "this", "from", "Hello", "world")


@dataclass(frozen=True)
class TinyShape:
    n_vocab: int = 151_936
    n_layer: int = 4
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    n_ctx: int = 2048
    quant: str = "F16"  # the matrices' type: F16, or Q8_0 / Q4_0 (gguf-py's own quantiser)


def _vocabulary(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """SentencePiece-style tokens: specials, the 256 byte tokens, some words, then filler pieces."""
    tokens = list(_SPECIALS) + [f"<0x{b:02X}>" for b in range(256)]
    types = [_UNKNOWN, _CONTROL, _CONTROL] + [_BYTE] * 256
    pieces = [f"\u2581{w}" for w in _WORDS] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces += [f"\u2581w{i}" for i in range(n_vocab - len(tokens) - len(pieces))]
    tokens += pieces
    types += [_NORMAL] * len(pieces)
    if len(tokens) != n_vocab:
        raise ValueError(f"a vocabulary needs at least {len(tokens)} tokens, asked for {n_vocab}")
    scores = [0.0] * (3 + 256) + [-float(i) for i in range(len(pieces))]
    return tokens, scores, types


def write_tiny_llama(path: Path, shape: TinyShape = TinyShape(), seed: int = 0) -> Path:
    """Write a random-weight llama GGUF of `shape` (quantised matrices, F32 norms, tied output)."""
    import gguf

    rng = np.random.default_rng(seed)
    s = shape
    head_dim = s.n_embd // s.n_head

    quant = gguf.GGMLQuantizationType[s.quant]

    def matrix(rows: int, cols: int, scale: float = 1.0) -> np.ndarray:
        values = (rng.standard_normal((rows, cols)) * scale / np.sqrt(cols)).astype(np.float32)
        return values.astype(np.float16) if s.quant == "F16" else gguf.quants.quantize(values, quant)

    tensors = {"token_embd.weight": matrix(s.n_vocab, s.n_embd, 0.5 * np.sqrt(s.n_embd)),
               "output_norm.weight": np.ones(s.n_embd, dtype=np.float32)}
    for i in range(s.n_layer):
        tensors |= {f"blk.{i}.attn_norm.weight": np.ones(s.n_embd, dtype=np.float32),
                    f"blk.{i}.attn_q.weight": matrix(s.n_embd, s.n_embd),
                    f"blk.{i}.attn_k.weight": matrix(s.n_head_kv * head_dim, s.n_embd),
                    f"blk.{i}.attn_v.weight": matrix(s.n_head_kv * head_dim, s.n_embd),
                    f"blk.{i}.attn_output.weight": matrix(s.n_embd, s.n_embd),
                    f"blk.{i}.ffn_norm.weight": np.ones(s.n_embd, dtype=np.float32),
                    f"blk.{i}.ffn_gate.weight": matrix(s.n_ff, s.n_embd),
                    f"blk.{i}.ffn_up.weight": matrix(s.n_ff, s.n_embd),
                    f"blk.{i}.ffn_down.weight": matrix(s.n_embd, s.n_ff)}
    tokens, scores, types = _vocabulary(s.n_vocab)
    with atomic_output(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch="llama")
        writer.add_name(f"SYNTHETIC tiny llama, vocabulary {s.n_vocab}")
        writer.add_context_length(s.n_ctx)
        writer.add_embedding_length(s.n_embd)
        writer.add_block_count(s.n_layer)
        writer.add_feed_forward_length(s.n_ff)
        writer.add_head_count(s.n_head)
        writer.add_head_count_kv(s.n_head_kv)
        writer.add_rope_dimension_count(head_dim)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_file_type(gguf.LlamaFileType[f"MOSTLY_{s.quant}"])
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)
        writer.add_add_bos_token(True)
        for name, data in tensors.items():
            writer.add_tensor(name, data, raw_dtype=None if data.dtype != np.uint8 else quant)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path
