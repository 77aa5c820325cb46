"""Shards of the real default model: byte-identical tensors, every layer once, loadable, cached."""

from pathlib import Path

import numpy as np
import pytest

from pipeinfer_cpu.llama.runtime import Stage, StageConfig
from pipeinfer_cpu.modelfiles.models import open_gguf, read_model_info
from pipeinfer_cpu.modelfiles.planning import split_layers
from pipeinfer_cpu.modelfiles.shards import ShardPlan, shard_model


@pytest.fixture(scope="module")
def plan(default_model, tmp_path_factory):
    info = read_model_info(default_model)
    out = tmp_path_factory.mktemp("shards")
    return shard_model(info, split_layers(info.n_layer, [1, 2, 1]), out_dir=out,
                       cache_dir=tmp_path_factory.mktemp("cache"))


def test_shards_cover_every_layer_exactly_once(plan, default_model):
    layers = []
    for shard in plan.shards:
        reader = open_gguf(Path(shard.path))
        blocks = {int(t.name.split(".")[1]) for t in reader.tensors if t.name.startswith("blk.")}
        assert blocks == set(range(shard.end - shard.start))
        count = reader.fields["llama.block_count"]
        assert int(count.parts[count.data[0]][0]) == shard.end - shard.start
        layers.extend(range(shard.start, shard.end))
    assert layers == list(range(read_model_info(default_model).n_layer))


def test_shard_tensors_are_byte_identical_to_the_source(plan, default_model):
    source = {t.name: t for t in open_gguf(default_model).tensors}
    for shard in plan.shards:
        for tensor in open_gguf(Path(shard.path)).tensors:
            name = tensor.name
            if name.startswith("blk."):
                _, index, rest = name.split(".", 2)
                name = f"blk.{int(index) + shard.start}.{rest}"
            original = source[name]
            assert tensor.tensor_type == original.tensor_type
            assert np.array_equal(np.asarray(tensor.data).view(np.uint8), np.asarray(original.data).view(np.uint8))


def test_shards_load_in_llama_cpp_and_chain_to_the_whole_model(plan, default_model):
    prompt = [504, 3575, 282, 4649, 314]
    positions, seqs = list(range(len(prompt))), [[0]] * len(prompt)
    whole = Stage(StageConfig(default_model, True, True, n_ctx=64, n_threads=1))
    expected = whole.decode(positions, seqs, tokens=prompt)
    whole.close()
    hidden = None
    for shard in plan.shards:
        stage = Stage(StageConfig(Path(shard.path), shard.start == 0, shard.end == plan.n_layer, n_ctx=64, n_threads=1))
        out = stage.decode(positions, seqs, tokens=prompt if shard.start == 0 else None, hidden=hidden)
        stage.close()
        hidden = out
    assert np.array_equal(hidden, expected)  # bit-identical logits through three shards


def test_manifest_and_cache_reuse(plan, default_model, tmp_path):
    manifest = Path(plan.shards[0].path).parent / "manifest.json"
    assert ShardPlan.from_json(manifest.read_text()) == plan
    assert [(s.start, s.end) for s in plan.shards] == [(0, 8), (8, 22), (22, 30)]
    mtimes = [Path(s.path).stat().st_mtime_ns for s in plan.shards]
    again = shard_model(read_model_info(default_model), split_layers(30, [1, 2, 1]),
                        out_dir=manifest.parent, cache_dir=tmp_path)
    assert again == plan
    assert [Path(s.path).stat().st_mtime_ns for s in plan.shards] == mtimes  # nothing rewritten
