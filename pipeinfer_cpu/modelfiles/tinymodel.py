"""SYNTHETIC tiny GGUFs with random weights and a vocabulary of any size, of several architectures.

They exist to exercise what real models of that shape exercise — Qwen's 151,936-token and Gemma 3's
262,144-token logits rows on the wire, a split of any depth, each architecture's own tensors and
metadata (biases, q/k norms, fused projections, sliding-window patterns, scaled inputs) — in
seconds and a few tens of MB. Their text is random tokens: never report a quality number on one,
and label any speed measured on one as synthetic.
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
    # The spread of the weights. The defaults give peaked logits; greedy text wants VARIED's.
    gain: float = 1.0  # a block matrix's standard deviation times sqrt(its input width)
    embedding_std: float = 0.5


# Strong blocks beside a small embedding: a tied output would otherwise predict the input token
# again, and greedy text of weak blocks settles on one token, so that equal texts would prove little.
VARIED = TinyShape(gain=2.0, embedding_std=0.05)


@dataclass(frozen=True)
class TinyArch:
    """What one architecture's GGUF holds beyond the common keys, as llama.cpp's loader for it
    (src/models/<arch>.cpp) asks. `block` lists each block's tensors as "name dims...": a matrix of
    [out, in] or a vector, in E (embedding), Q, KV (query, key/value widths), QKV (their sum), F, 2F
    (feed-forward) and D (head) widths."""

    name: str
    block: tuple[str, ...]
    keys: tuple[tuple[str, int | float], ...] = ()  # `<arch>.` metadata of this architecture
    layer_norm: bool = False  # LayerNorm with biases instead of RMSNorm
    output: bool = False  # an output matrix of its own instead of the tied embedding
    # The graph multiplies token embeddings by sqrt(n_embd) (gemma): stored divided by it, else the
    # tied output would mostly predict the input token again.
    scaled_embedding: bool = False


_ATTENTION = ("attn_q.weight Q E", "attn_k.weight KV E", "attn_v.weight KV E", "attn_output.weight E Q")
_QKV_BIASES = ("attn_q.bias Q", "attn_k.bias KV", "attn_v.bias KV")
_GATED_FFN = ("ffn_gate.weight F E", "ffn_up.weight F E", "ffn_down.weight E F")
_LLAMA = ("attn_norm.weight E", *_ATTENTION, "ffn_norm.weight E", *_GATED_FFN)
_POST_NORMS = ("post_attention_norm.weight E", "post_ffw_norm.weight E")
_QK_NORMS = ("attn_q_norm.weight D", "attn_k_norm.weight D")
_WINDOW = (("attention.sliding_window", 8),)  # shorter than a test's prompt and answer, so it matters

TINY_ARCHS = {arch.name: arch for arch in (
    TinyArch("llama", _LLAMA),
    TinyArch("qwen2", _LLAMA + _QKV_BIASES, output=True),
    TinyArch("qwen3", _LLAMA + _QK_NORMS),
    TinyArch("gemma", _LLAMA, scaled_embedding=True),
    TinyArch("gemma2", _LLAMA + _POST_NORMS,
             _WINDOW + (("attn_logit_softcapping", 50.0), ("final_logit_softcapping", 30.0)), scaled_embedding=True),
    TinyArch("gemma3", _LLAMA + _POST_NORMS + _QK_NORMS,
             _WINDOW + (("rope.freq_base", 1e6), ("rope.freq_base_swa", 1e4)), scaled_embedding=True),
    TinyArch("phi3", ("attn_norm.weight E", "attn_qkv.weight QKV E", "attn_output.weight E Q",
                      "ffn_norm.weight E", "ffn_up.weight 2F E", "ffn_down.weight E F"), output=True),
    TinyArch("starcoder2", ("attn_norm.weight E", "attn_norm.bias E", *_ATTENTION, *_QKV_BIASES,
                            "attn_output.bias E", "ffn_norm.weight E", "ffn_norm.bias E", "ffn_up.weight F E",
                            "ffn_up.bias F", "ffn_down.weight E F", "ffn_down.bias E"), layer_norm=True),
    TinyArch("olmo2", (*_ATTENTION, "attn_q_norm.weight E", "attn_k_norm.weight KV", *_POST_NORMS, *_GATED_FFN),
             _WINDOW, output=True),  # OLMo 3's sliding window
    TinyArch("stablelm", ("attn_norm.weight E", "attn_norm.bias E", *_ATTENTION, *_QKV_BIASES,
                          "ffn_norm.weight E", "ffn_norm.bias E", *_GATED_FFN),
             (("rope.dimension_count", 4),), layer_norm=True, output=True),  # partial rotary
    TinyArch("granite", _LLAMA, (("logit_scale", 8.0), ("residual_scale", 0.22), ("embedding_scale", 12.0),
                                 ("attention.scale", 0.0625)), output=True),
    TinyArch("internlm2", _LLAMA, output=True),
    TinyArch("exaone", _LLAMA),
)}


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
    return write_tiny_model(path, "llama", shape, seed)


def _widths(shape: TinyShape) -> dict[str, int]:
    head = shape.n_embd // shape.n_head
    q, kv = shape.n_head * head, shape.n_head_kv * head
    return {"E": shape.n_embd, "Q": q, "KV": kv, "QKV": q + 2 * kv, "F": shape.n_ff, "2F": 2 * shape.n_ff, "D": head}


def write_tiny_model(path: Path, arch: str, shape: TinyShape = TinyShape(), seed: int = 0) -> Path:
    """Write a random-weight GGUF of one of `TINY_ARCHS` of `shape` (quantised matrices; F32 norms
    of ones and small random biases)."""
    import gguf

    spec, s = TINY_ARCHS[arch], shape
    rng = np.random.default_rng(seed)
    widths = _widths(s)
    quant = gguf.GGMLQuantizationType[s.quant]

    def matrix(rows: int, cols: int, std: float) -> np.ndarray:
        values = (rng.standard_normal((rows, cols)) * std).astype(np.float32)
        return values.astype(np.float16) if s.quant == "F16" else gguf.quants.quantize(values, quant)

    def tensor(name: str, dims: list[str]) -> np.ndarray:
        if len(dims) == 2:
            return matrix(widths[dims[0]], widths[dims[1]], s.gain / np.sqrt(widths[dims[1]]))
        if name.endswith(".bias"):
            return (0.1 * rng.standard_normal(widths[dims[0]])).astype(np.float32)
        return np.ones(widths[dims[0]], dtype=np.float32)

    embedding_std = s.embedding_std / np.sqrt(s.n_embd) if spec.scaled_embedding else s.embedding_std
    tensors = {"token_embd.weight": matrix(s.n_vocab, s.n_embd, embedding_std),
               "output_norm.weight": np.ones(s.n_embd, dtype=np.float32)}
    if spec.layer_norm:
        tensors["output_norm.bias"] = tensor("output_norm.bias", ["E"])
    if spec.output:
        tensors["output.weight"] = matrix(s.n_vocab, s.n_embd, 1 / np.sqrt(s.n_embd))
    for i in range(s.n_layer):
        for line in spec.block:
            name, *dims = line.split()
            tensors[f"blk.{i}.{name}"] = tensor(name, dims)
    tokens, scores, types = _vocabulary(s.n_vocab)
    with atomic_output(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch=arch)
        # No architecture in the name: llama.cpp asks a model named like "phi3" for phi3's own tokens.
        writer.add_name(f"SYNTHETIC tiny model, vocabulary {s.n_vocab}")
        writer.add_context_length(s.n_ctx)
        writer.add_embedding_length(s.n_embd)
        writer.add_block_count(s.n_layer)
        writer.add_feed_forward_length(s.n_ff)
        writer.add_head_count(s.n_head)
        writer.add_head_count_kv(s.n_head_kv)
        keys = {"rope.dimension_count": widths["D"]} | dict(spec.keys)
        for key, value in keys.items():
            add = writer.add_float32 if isinstance(value, float) else writer.add_uint32
            add(f"{arch}.{key}", value)
        if spec.layer_norm:
            writer.add_layer_norm_eps(1e-5)
        else:
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
