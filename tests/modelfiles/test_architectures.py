"""The architecture gate and what a shard must say of its own layers: the pure parts, and shard files
read back by gguf-py and llama.cpp."""

from pathlib import Path

import numpy as np
import pytest

from pipeinfer_cpu.errors import ModelError
from pipeinfer_cpu.modelfiles.architectures import VERIFIED, refusal, stage_input_tensor, swa_flags
from pipeinfer_cpu.modelfiles.models import ModelInfo, check_supported, open_gguf, read_model_info
from pipeinfer_cpu.modelfiles.planning import LayerRange, split_layers
from pipeinfer_cpu.modelfiles.shards import shard_metadata, shard_model
from pipeinfer_cpu.modelfiles.tinymodel import TINY_ARCHS, TinyShape, write_tiny_model


@pytest.mark.parametrize("arch, reason", [
    ("mamba", "recurrent state"),
    ("rwkv7", "recurrent state"),
    ("jamba", "hybrid attention and recurrent layers"),
    ("qwen3next", "hybrid attention and recurrent layers"),
    ("t5", "an encoder-decoder model"),
    ("bert", "an encoder (embedding) model"),
    ("clip", "a multimodal projector (mmproj) file"),
    ("smollm3", "every 4th layer skips RoPE"),
])
def test_what_cannot_be_split_says_why_in_one_line(arch, reason):
    line = refusal("m.gguf", arch, 24)
    assert line.startswith(f"m.gguf: architecture {arch!r} cannot be split into pipeline stages yet (")
    assert reason in line and "\n" not in line


def test_an_unknown_architecture_is_not_verified_yet():
    assert refusal("m.gguf", "mystery", 24) == (
        "m.gguf: architecture 'mystery' is not verified yet (verified: llama, qwen2, qwen3, gemma, gemma2, "
        "gemma3, phi3, starcoder2, olmo2, stablelm, granite, internlm2, exaone)")


def test_gemma_27b_is_refused_by_its_depth_and_smaller_gemmas_pass():
    assert "with 46 layers cannot be split" in refusal("g.gguf", "gemma2", 46)
    assert "with 62 layers cannot be split" in refusal("g.gguf", "gemma3", 62)
    assert refusal("g.gguf", "gemma2", 26) is None and refusal("g.gguf", "gemma3", 34) is None


def test_every_verified_architecture_passes_and_has_a_tiny_model():
    assert all(refusal("m.gguf", arch, 4) is None for arch in VERIFIED)
    assert set(TINY_ARCHS) == set(VERIFIED)


def test_check_supported_raises_the_refusal():
    info = ModelInfo(Path("/m/x.gguf"), "rwkv6", 24, 2048, 65536, 4096, 1, "x", "")
    with pytest.raises(ModelError, match=r"^x.gguf: architecture 'rwkv6' cannot be split .*recurrent state"):
        check_supported(info)
    check_supported(ModelInfo(Path("/m/x.gguf"), "qwen3", 28, 1024, 151936, 4096, 1, "x", ""))


@pytest.mark.parametrize("pattern, period, expected", [
    (None, 6, [True] * 5 + [False] + [True] * 2),  # gemma3's default: 5 local, 1 global
    (None, 2, [True, False] * 4),  # gemma2's
    (4, 6, [True, True, True, False] * 2),  # the file's own period wins
    (0, 6, [True] * 8),  # period 0: every layer slides
    ([1, 0, 0], 6, [True, False, False] + [False] * 5),  # the file's flags; missing ones are global
])
def test_swa_flags_follow_llama_cpp(pattern, period, expected):
    assert swa_flags(pattern, period, 8) == expected


def test_a_shard_describes_its_own_layers():
    values = {"gemma3.block_count": 8, "gemma3.attention.head_count": [4, 4, 8, 8, 4, 4, 8, 8],
              "gemma3.rope.dimension_sections": [1, 2, 3, 4], "gemma3.embedding_length": 64,
              "gemma3.attention.sliding_window": 512}
    overrides = shard_metadata("gemma3", values, LayerRange(3, 7, 8))
    assert overrides == {"gemma3.block_count": 4, "gemma3.attention.head_count": [8, 4, 4, 8],
                         "gemma3.attention.sliding_window_pattern": [True, True, False, True]}


def test_an_architecture_without_a_window_gets_no_pattern():
    overrides = shard_metadata("llama", {"llama.block_count": 4, "llama.feed_forward_length": [8, 8, 16, 16]},
                               LayerRange(2, 4, 4))
    assert overrides == {"llama.block_count": 2, "llama.feed_forward_length": [16, 16]}


@pytest.mark.parametrize("arch, values, expected", [
    ("gemma2", {}, "inp_scaled"),
    ("gemma", {}, "inp_scaled"),
    ("gemma3", {}, None),  # scales token input only
    ("granite", {"granite.embedding_scale": "12.000000"}, "embd"),
    ("granite", {"granite.embedding_scale": "0.000000"}, None),
    ("granite", {}, None),
    ("llama", {}, None),
])
def test_which_input_tensor_a_later_stage_overwrites(arch, values, expected):
    assert stage_input_tensor(arch, values.get) == expected


def test_a_gemma3_shard_file_holds_its_layers_window_flags(tmp_path):
    """Written by gguf-py as a bool array: llama.cpp reads one in load_swa_pattern."""
    import gguf

    model = write_tiny_model(tmp_path / "g.gguf", "gemma3", TinyShape(n_vocab=512, n_layer=8))
    plan = shard_model(read_model_info(model), split_layers(8, [1, 1, 1]), out_dir=tmp_path / "out",
                       cache_dir=tmp_path / "cache")
    flags = []
    for shard in plan.shards:
        field = open_gguf(Path(shard.path)).fields["gemma3.attention.sliding_window_pattern"]
        assert field.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.BOOL]
        flags += field.contents()
    assert flags == swa_flags(None, 6, 8)


def test_per_layer_arrays_are_cut_so_shards_load_and_chain_to_the_whole_model(tmp_path):
    """llama.cpp refuses a per-layer array of another length than the file's block count."""
    from pipeinfer_cpu.llama.runtime import Stage, StageConfig
    from pipeinfer_cpu.modelfiles.shards import write_gguf

    plain = open_gguf(write_tiny_model(tmp_path / "plain.gguf", "llama", TinyShape(n_vocab=512, n_layer=4)))
    model = tmp_path / "arrays.gguf"
    per_layer = {"llama.attention.head_count_kv": [2] * 4, "llama.feed_forward_length": [128] * 4}
    write_gguf(plain, "llama", model, [(t.name, t) for t in plain.tensors], per_layer)
    plan = shard_model(read_model_info(model), split_layers(4, [1, 2, 1]), out_dir=tmp_path / "out",
                       cache_dir=tmp_path / "cache")
    assert open_gguf(Path(plan.shards[1].path)).fields["llama.feed_forward_length"].contents() == [128, 128]
    prompt = [300, 301, 302, 303, 304]
    positions, seqs = list(range(len(prompt))), [[0]] * len(prompt)
    whole = Stage(StageConfig(model, True, True, n_ctx=64))
    expected = whole.decode(positions, seqs, tokens=prompt)
    whole.close()
    hidden = None
    for shard in plan.shards:
        stage = Stage(StageConfig(Path(shard.path), shard.start == 0, shard.end == 4, n_ctx=64))
        hidden = stage.decode(positions, seqs, tokens=prompt if shard.start == 0 else None, hidden=hidden)
        stage.close()
    assert np.array_equal(hidden, expected)
