"""Hidden states in the wire dtypes: exact sizes, f32 bit-exact, f16 and q8 within their rounding, edge values."""

import numpy as np
import pytest

from pipeinfer_cpu.errors import UserError
from pipeinfer_cpu.llama.settings import WIRE_DTYPES, LlamaSettings
from pipeinfer_cpu.modelfiles.planning import LayerRange
from pipeinfer_cpu.modelfiles.shards import ShardFile
from pipeinfer_cpu.wire import control as C
from pipeinfer_cpu.wire import hidden as H
from pipeinfer_cpu.wire import runs as P
from pipeinfer_cpu.wire.runs import Output, RunMessage

SHAPES = [(576,), (1, 576), (3, 576), (2, 40), (7,), (0, 576), (4, 0)]


def roundtrip(values: np.ndarray, dtype: str) -> np.ndarray:
    raw = H.encode(values, dtype)
    assert raw.dtype == np.uint8 and raw.nbytes == H.encoded_nbytes(values.shape, dtype)
    back = H.decode(raw, dtype, values.shape)
    assert back.dtype == np.float32 and back.shape == values.shape
    return back


def hidden_like(shape, seed=0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * 3).astype(np.float32)


@pytest.mark.parametrize("shape, f32, f16, q8", [((1, 576), 2304, 1152, 648), ((576,), 2304, 1152, 648),
                                                 ((3, 896), 10752, 5376, 3024), ((2, 40), 320, 160, 96),
                                                 ((7,), 28, 14, 11), ((0, 576), 0, 0, 0)])
def test_exact_sizes_in_bytes(shape, f32, f16, q8):
    """q8: one byte a value and a float32 scale per block of 32 (the last block may be shorter)."""
    assert [H.encoded_nbytes(shape, d) for d in ("f32", "f16", "q8")] == [f32, f16, q8]
    for dtype, size in zip(("f32", "f16", "q8"), (f32, f16, q8)):
        assert H.encode(np.zeros(shape, dtype=np.float32), dtype).nbytes == size


@pytest.mark.parametrize("shape", SHAPES)
def test_f32_is_bit_exact_and_zeros_survive_every_dtype(shape):
    values = hidden_like(shape)
    assert np.array_equal(roundtrip(values, "f32"), values)
    for dtype in WIRE_DTYPES:
        back = roundtrip(np.zeros(shape, dtype=np.float32), dtype)
        assert np.array_equal(back, np.zeros(shape)) and not np.signbit(back).any()


@pytest.mark.parametrize("shape", SHAPES)
def test_f16_rounds_to_nearest(shape):
    values = hidden_like(shape)
    back = roundtrip(values, "f16")
    assert np.array_equal(back, values.astype(np.float16).astype(np.float32))
    assert np.all(np.abs(back - values) <= np.abs(values) * 2.0 ** -11)


def test_f16_clips_beyond_its_range_keeps_inf_and_nan_and_flushes_the_tiny():
    values = np.array([1e5, -3e38, 65504, 65519, -7e4, np.inf, -np.inf, np.nan, 1e-9, -2.0 ** -24, 0.5],
                      dtype=np.float32)
    back = roundtrip(values, "f16")
    assert list(back[:5]) == [65504, -65504, 65504, 65504, -65504]
    assert back[5] == np.inf and back[6] == -np.inf and np.isnan(back[7])
    assert back[8] == 0 and back[9] == -(2.0 ** -24) and back[10] == 0.5


@pytest.mark.parametrize("shape", SHAPES)
def test_q8_error_is_at_most_half_a_step_of_its_block(shape):
    values = hidden_like(shape)
    back = roundtrip(values, "q8")
    rows = values.reshape(-1, shape[-1]) if values.size else values.reshape(0, 1)
    for row, row_back in zip(rows, back.reshape(rows.shape)):
        for start in range(0, row.size, H.Q8_BLOCK):
            block, block_back = row[start:start + H.Q8_BLOCK], row_back[start:start + H.Q8_BLOCK]
            step = np.abs(block).max() / 127
            assert np.all(np.abs(block_back - block) <= step * (0.5 + 1e-5))
            assert np.isclose(np.abs(block_back).max(), np.abs(block).max(), rtol=1e-6)  # the extreme is kept


def test_q8_an_outlier_coarsens_only_its_own_block():
    values = hidden_like((1, 96))
    values[0, 3] = 5000.0  # a "massive activation"
    back = roundtrip(values, "q8")
    assert np.abs(back[0, :32] - values[0, :32]).max() > 1  # its block: steps of 5000/127
    assert np.abs(back[0, 32:] - values[0, 32:]).max() <= np.abs(values[0, 32:]).max() / 254 * (1 + 1e-5)


def test_q8_huge_values_keep_their_relative_precision():
    values = np.array([[3e38, -1.5e38, 1e30, 7.0], [1e-30, -2e-30, 0, 5e-31]], dtype=np.float32)
    back = roundtrip(values, "q8")
    assert np.all(np.isfinite(back)) and back[0, 0] == np.float32(3e38) and back[0, 3] == 0
    for row, row_back in zip(values, back):
        assert np.all(np.abs(row_back - row) <= np.abs(row).max() / 254 * (1 + 1e-5))


def test_q8_a_block_holding_inf_or_nan_decodes_as_nan_and_only_that_block():
    values = hidden_like((2, 64))
    values[0, 5], values[1, 40] = np.inf, np.nan
    back = roundtrip(values, "q8")
    assert np.isnan(back[0, :32]).all() and np.isnan(back[1, 32:]).all()
    assert np.isfinite(back[0, 32:]).all() and np.isfinite(back[1, :32]).all()


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="unknown wire dtype 'f8'"):
        H.encode(np.zeros(4, dtype=np.float32), "f8")
    with pytest.raises(TypeError):
        H.encode(np.zeros(4, dtype=np.float64), "f16")
    with pytest.raises(ValueError, match="expected 648 bytes"):
        H.decode(np.zeros(647, dtype=np.uint8), "q8", (1, 576))
    with pytest.raises(UserError, match="--wire-dtype must be one of f32, f16, q8"):
        LlamaSettings(wire_dtype="f8")


@pytest.mark.parametrize("dtype", WIRE_DTYPES)
def test_a_run_carries_hidden_states_in_the_wire_dtype_and_decodes_to_float32(dtype):
    values = hidden_like((3, 576))
    message = RunMessage(7, (10, 11, 12), ((0,), (0, 3), (5,)), (), (False, False, True), payload=values)
    plain = P.encode_run(message)
    data = P.encode_run(message, dtype)
    assert data.nbytes == plain.nbytes - values.nbytes + H.encoded_nbytes(values.shape, dtype)
    back = P.decode_run(data)
    assert back == message and back.payload.dtype == np.float32
    assert np.array_equal(back.payload, H.decode(H.encode(values, dtype), dtype, values.shape))


def test_argmax_ids_are_never_compacted_and_an_unknown_dtype_is_refused():
    ids = np.array([5, 9], dtype=np.int32)
    back = P.decode_run(P.encode_run(RunMessage(3, output_kind=Output.ARGMAX, payload=ids), "q8"))
    assert back.payload.dtype == np.int32 and list(back.payload) == [5, 9]
    with pytest.raises(ValueError, match="unknown wire dtype"):
        P.encode_run(RunMessage(1, payload=np.zeros((1, 4), dtype=np.float32)), "bf16")


def test_the_wire_dtype_reaches_a_rank_inside_its_assignment():
    shard = ShardFile(1, 15, 30, "/x/stage1.gguf", 123, "ab" * 32)
    assignment = C.Assignment(0, LayerRange(0, 15, 30), shard, 2048, 256, 1, 1, 0, 2, False,
                              llama=LlamaSettings(wire_dtype="q8"))
    assert C.decode(C.encode(C.Assign(assignment))).assignment.llama.wire_dtype == "q8"
