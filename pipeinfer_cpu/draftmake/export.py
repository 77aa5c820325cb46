"""The draft as a GGUF that llama.cpp loads: the target's metadata and tokenizer, the target's own
embedding (its quantised bytes, untouched: it doubles as the tied output head), and the draft's
blocks and output norm in F16 or Q8_0 (gguf-py's quantiser), or Q4_0 (llama.cpp's, from the F16 file)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, NamedTuple

import numpy as np

from pipeinfer_cpu.files import atomic_output
from pipeinfer_cpu.modelfiles.shards import write_gguf

QUANTS = ("f16", "q8_0", "q4_0")
_FILE_TYPES = {"f16": 1, "q8_0": 7}  # llama.cpp's LLAMA_FTYPE_MOSTLY_*


class _Tensor(NamedTuple):
    data: np.ndarray
    tensor_type: object


def _encoded(value: np.ndarray, quant: str) -> _Tensor:
    import gguf

    kinds = gguf.GGMLQuantizationType
    if value.ndim == 1:  # norms stay float32, as llama.cpp's own converter keeps them
        return _Tensor(value.astype(np.float32), kinds.F32)
    if quant == "q8_0":
        return _Tensor(gguf.quants.quantize(value.astype(np.float32), kinds.Q8_0), kinds.Q8_0)
    return _Tensor(value.astype(np.float16), kinds.F16)


def draft_tensors(reader, weights: Mapping[str, np.ndarray], quant: str) -> list[tuple[str, _Tensor]]:
    """(name, tensor) for the draft file: the target's embedding as it is, then the draft's own."""
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    own = [(name, _encoded(value, quant)) for name, value in sorted(weights.items(), key=lambda kv: _order(kv[0]))
           if name != "token_embd.weight"]
    return [("token_embd.weight", embedding)] + own


def _order(name: str) -> tuple[int, str]:
    parts = name.split(".")
    return (int(parts[1]), name) if parts[0] == "blk" else (1 << 30, name)


def write_draft(reader, arch: str, weights: Mapping[str, np.ndarray], n_layer: int, path: Path, quant: str) -> Path:
    """Write the draft GGUF at `path` (atomically)."""
    if quant == "q4_0":
        return _requantised(reader, arch, weights, n_layer, path)
    overrides = {f"{arch}.block_count": n_layer, "general.file_type": _FILE_TYPES[quant]}
    with atomic_output(path) as tmp:
        write_gguf(reader, arch, tmp, draft_tensors(reader, weights, quant), overrides)
    return path


def _requantised(reader, arch, weights, n_layer, path: Path) -> Path:
    from pipeinfer_cpu.llama.runtime import requantize_q4_0

    f16 = path.with_name(path.name + ".f16.tmp")
    try:
        write_draft(reader, arch, weights, n_layer, f16, "f16")
        with atomic_output(path) as tmp:
            requantize_q4_0(f16, tmp)
    finally:
        f16.unlink(missing_ok=True)
    return path
