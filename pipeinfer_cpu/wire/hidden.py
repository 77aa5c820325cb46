"""Hidden states between stages in a wire dtype: f32 as computed (bit-exact), or f16 or q8 (lossy, smaller).

The sending stage encodes, the receiving one decodes back to float32 before llama.cpp sees them
(wire/runs.py names the dtype in the run's header). Bytes per value: f32 4, f16 2, q8 1 + 4/32 = 1.125.

f16: numpy float16, rounded to nearest. A finite value beyond f16's largest, ±65,504, is clipped to
±65,504 rather than becoming inf (one inf would turn the next stage's normalisation into NaN); ±inf and
NaN pass as they are; magnitudes below f16's smallest subnormal, 2**-24 (about 6e-8), become 0.

q8: each row is cut into blocks of 32 values (the last one shorter when the row length is not a
multiple of 32), as ggml's Q8_0 does; a block stores d = max|x| / 127 (float32) and round(x / d)
(int8). Blocks, not one scale per row: a transformer's residual stream has a few channels tens to
hundreds of times larger than the rest ("massive activations"); one scale per row sized for them
would leave every other value of the row a few levels, while in a block an outlier coarsens only
its 31 neighbours. The scale is float32 (ggml's is f16) so that no scale overflows or underflows, for
1/8 byte per value more. A block holding inf or NaN decodes as NaN throughout.
"""

from __future__ import annotations

import math

import numpy as np

from pipeinfer_cpu.llama.settings import WIRE_DTYPES

F16_MAX = float(np.finfo(np.float16).max)  # 65504
Q8_BLOCK = 32
_Q8_LEVELS = 127


def encoded_nbytes(shape: tuple[int, ...], dtype: str) -> int:
    """The bytes `encode` makes of a float32 array of this shape (1-D: one row)."""
    rows, cols = _rows_cols(shape)
    if dtype == "q8":
        return rows * (cols + 4 * math.ceil(cols / Q8_BLOCK))
    return rows * cols * {"f32": 4, "f16": 2}[checked_dtype(dtype)]


def encode(values: np.ndarray, dtype: str) -> np.ndarray:
    """A float32 array (1-D or 2-D) as raw bytes (uint8) in `dtype`."""
    if values.dtype != np.float32 or values.ndim not in (1, 2):
        raise TypeError(f"hidden states must be a 1-D or 2-D float32 array, got {values.dtype} {values.shape}")
    if checked_dtype(dtype) == "f32":
        data = np.ascontiguousarray(values)
    elif dtype == "f16":
        data = np.where(np.isinf(values), values, np.clip(values, -F16_MAX, F16_MAX)).astype(np.float16)
    else:
        scales, quants = _q8_encode(values.reshape(_rows_cols(values.shape)))
        return np.concatenate([scales.view(np.uint8).reshape(-1), quants.view(np.uint8).reshape(-1)])
    return data.view(np.uint8).reshape(-1)


def decode(raw: np.ndarray, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """The float32 array of `shape` that `encode` turned into the bytes `raw`."""
    expected = encoded_nbytes(shape, dtype)
    if raw.nbytes != expected:
        raise ValueError(f"expected {expected} bytes of {dtype} hidden states of shape {shape}, got {raw.nbytes}")
    if dtype == "f32":
        return raw.view(np.float32).reshape(shape)
    if dtype == "f16":
        return raw.view(np.float16).astype(np.float32).reshape(shape)
    rows, cols = _rows_cols(shape)
    n_blocks = math.ceil(cols / Q8_BLOCK)
    scales = raw[: rows * n_blocks * 4].view(np.float32).reshape(rows, n_blocks)
    quants = raw[rows * n_blocks * 4:].view(np.int8).reshape(rows, cols)
    padded = np.zeros((rows, n_blocks * Q8_BLOCK), dtype=np.float32)
    padded[:, :cols] = quants
    blocks = padded.reshape(rows, n_blocks, Q8_BLOCK) * scales[:, :, None]
    return blocks.reshape(rows, n_blocks * Q8_BLOCK)[:, :cols].reshape(shape)


def _q8_encode(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 scales [rows, blocks] and int8 values [rows, cols] (see the module's docstring)."""
    rows, cols = matrix.shape
    n_blocks = math.ceil(cols / Q8_BLOCK)
    padded = np.zeros((rows, n_blocks * Q8_BLOCK), dtype=np.float32)
    padded[:, :cols] = matrix
    blocks = padded.reshape(rows, n_blocks, Q8_BLOCK)
    with np.errstate(invalid="ignore", over="ignore"):
        scales = (np.max(np.abs(blocks), axis=2, initial=0.0) / _Q8_LEVELS).astype(np.float32)
        usable = (scales > 0) & np.isfinite(scales)
        # a zero block stays 0 (scale 0); a non-finite one gets 0s whose product with its scale is NaN
        ratio = np.where(usable[:, :, None], blocks / np.where(usable, scales, 1)[:, :, None], 0)
    quants = np.clip(np.rint(ratio), -_Q8_LEVELS, _Q8_LEVELS).astype(np.int8)
    scales = np.where(np.isfinite(scales), scales, np.float32(np.nan)).astype(np.float32)
    return scales, quants.reshape(rows, n_blocks * Q8_BLOCK)[:, :cols].copy()


def _rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    return (1, shape[0]) if len(shape) == 1 else (shape[0], shape[1])


def checked_dtype(dtype: str) -> str:
    """`dtype`, if it is a wire dtype; a ValueError otherwise."""
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"unknown wire dtype {dtype!r} (choose from {', '.join(WIRE_DTYPES)})")
    return dtype
