"""Split GGUFs (`name-00001-of-00003.gguf` ...), as gguf-py's own writer splits them: read, checked and
sharded as the whole file would be, run by real MPI processes and llama.cpp with the whole file's tokens
and bit-identical logits, and every bad set of parts refused in one line, before anything is written."""

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_clean_failure, read_json
from pipeinfer_cpu.errors import ModelError
from pipeinfer_cpu.head.cluster import draft_file
from pipeinfer_cpu.modelfiles.models import GgufHeader, open_gguf, read_model_info
from pipeinfer_cpu.modelfiles.planning import split_layers
from pipeinfer_cpu.modelfiles.shards import shard_model, source_hash
from pipeinfer_cpu.modelfiles.splits import check_tensors
from pipeinfer_cpu.modelfiles.tinymodel import VARIED, TinyShape, write_tiny_llama

PROMPT = "Hello world, the one that was in the world is for you and I have this of it"
SHAPE = replace(VARIED, n_vocab=2048, n_layer=4)  # 2 + 4 * 9 = 38 tensors; varied greedy text


def write_split(source: Path, folder: Path, max_tensors: int) -> tuple[Path, ...]:
    """`source` written again by gguf-py's GGUFWriter(split_max_tensors=...) as `<stem>-0000k-of-0000n.gguf`."""
    import gguf

    reader, array = gguf.GGUFReader(source), gguf.GGUFValueType.ARRAY
    folder.mkdir(parents=True)
    writer = gguf.GGUFWriter(str(folder / source.name), arch="llama", split_max_tensors=max_tensors)
    for field in reader.fields.values():
        if field.name != "general.architecture" and not field.name.startswith("GGUF."):
            kind = field.types[0]
            sub_type = field.types[-1] if kind == array else None
            writer.add_key_value(field.name, field.contents(), kind, sub_type=sub_type)
    for tensor in reader.tensors:
        data = tensor.data
        writer.add_tensor_info(tensor.name, data.shape, data.dtype, data.nbytes, tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data)
    writer.close()
    return tuple(sorted(folder.glob(f"{source.stem}-*.gguf")))


@dataclass(frozen=True)
class Models:
    whole: Path
    parts: tuple[Path, ...]  # the whole, in 3 parts
    four_parts: tuple[Path, ...]  # the whole, in 4 parts
    other_parts: tuple[Path, ...]  # a 3-layer model (29 tensors) in 3 parts


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Models:
    folder = tmp_path_factory.mktemp("splits")
    whole = write_tiny_llama(folder / "tiny.gguf", SHAPE)
    other = write_tiny_llama(folder / "other" / "tiny.gguf", TinyShape(n_vocab=2048, n_layer=3))
    return Models(whole, write_split(whole, folder / "three", 13), write_split(whole, folder / "four", 10),
                  write_split(other, folder / "other-three", 10))


def test_a_split_model_reads_and_shards_as_the_whole_file(models, tmp_path):
    whole, split = read_model_info(models.whole), read_model_info(models.parts[0])
    assert len(models.parts) == 3 and split.files == models.parts
    assert (split.arch, split.n_layer, split.vocab_sha256) == (whole.arch, whole.n_layer, whole.vocab_sha256)
    assert split.size_bytes == sum(part.stat().st_size for part in models.parts)
    reader, expected = open_gguf(models.parts[0]), open_gguf(models.whole)
    assert [t.name for t in reader.tensors] == [t.name for t in expected.tensors]
    assert list(reader.fields) == list(expected.fields)  # no split.* key left for a shard to claim
    ranges = split_layers(whole.n_layer, [1, 1])
    shards = [shard_model(info, ranges, tmp_path / info.path.stem, tmp_path / "cache") for info in (whole, split)]
    assert [s.sha256 for s in shards[0].shards] == [s.sha256 for s in shards[1].shards]  # byte for byte


def test_the_source_hash_covers_every_part(models, tmp_path):
    parts = tuple(Path(shutil.copy(part, tmp_path)) for part in models.parts)
    before = source_hash(parts, tmp_path / "cache")
    with open(parts[2], "r+b") as handle:  # a changed last part must not reuse the old shards
        handle.seek(-1, 2)
        handle.write(b"\x01")
    assert source_hash(parts, tmp_path / "cache") != before


def test_a_split_draft_is_handed_out_as_one_file(models, tmp_path, monkeypatch):
    monkeypatch.setenv("PIPEINFER_CACHE", str(tmp_path))
    shard = draft_file(read_model_info(models.parts[0]))
    info = read_model_info(Path(shard.path))
    assert info.other_parts == () and info.n_layer == SHAPE.n_layer and (shard.start, shard.end) == (0, 4)
    assert [t.name for t in open_gguf(Path(shard.path)).tensors] == [t.name for t in open_gguf(models.whole).tensors]


def test_a_tensor_in_two_parts_is_refused():
    headers = tuple(GgufHeader(Path(f"m-0000{k}-of-00002.gguf"), {}, 0, "", names)
                    for k, names in ((1, ("a", "b")), (2, ("b",))))
    with pytest.raises(ModelError, match=r"tensor b appears twice \(in m-00001-of-00002.gguf and m-00002"):
        check_tensors(headers, 3)


def generate(cli, folder, model, mode, *args):
    stats, logits = folder / f"{mode}{model.stem}.json", folder / f"{mode}{model.stem}.npy"
    done = cli("run", "--hostfile", "hosts/local.txt", "--model", str(model), "--mode", mode, "--raw", "-p", PROMPT,
               "-n", "16", "--stats-json", str(stats), "--save-logits", str(logits), *args)
    assert done.returncode == 0, done.stderr
    return read_json(stats)["tokens"], np.load(logits)


def test_a_split_model_runs_with_the_whole_files_tokens_and_logits(cli, models, tmp_path):
    tokens, logits = generate(cli, tmp_path, models.whole, "pipeline", "--stages", "2")
    assert len(set(tokens)) >= 4, tokens  # not a constant
    for run in (("pipeline", "--stages", "2"), ("single", "-t", "1")):
        split_tokens, split_logits = generate(cli, tmp_path, models.parts[0], *run)
        assert split_tokens == tokens, run
        assert np.array_equal(split_logits, logits), run  # bit-identical, not merely close


def _missing(models, folder):
    (folder / models.parts[1].name).unlink()


def _second_part_of(split):
    def spoil(models, folder):
        shutil.copy(getattr(models, split)[1], folder / models.parts[1].name)
    return spoil


def _truncated(models, folder):
    with open(folder / models.parts[2].name, "r+b") as handle:
        handle.truncate(models.parts[2].stat().st_size - 100)


@pytest.mark.parametrize("spoil, given, fragment", [
    (_missing, 0, "tiny-00002-of-00003.gguf is missing (split GGUF tiny-00001-of-00003.gguf has 3 parts)"),
    (_second_part_of("four_parts"), 0, "tiny-00002-of-00003.gguf is not a part of the split GGUF "
     "tiny-00001-of-00003.gguf: it says part 2 of 4 with 38 tensors in all, expected part 2 of 3 with 38"),
    (_second_part_of("other_parts"), 0, "it says part 2 of 3 with 29 tensors in all, expected part 2 of 3 with 38"),
    (_truncated, 0, "tiny-00003-of-00003.gguf is truncated: tensor"),
    (lambda models, folder: None, 1,
     "tiny-00002-of-00003.gguf is part 2 of the split GGUF tiny-00001-of-00003.gguf: give its first part"),
], ids=["missing", "from-another-split", "from-another-model", "truncated", "not-the-first"])
def test_a_bad_set_of_parts_is_one_line_and_writes_nothing(cli, models, tmp_path, spoil, given, fragment):
    folder = tmp_path / "model"
    folder.mkdir()
    for part in models.parts:
        shutil.copy(part, folder)
    spoil(models, folder)
    cache = tmp_path / "cache"
    done = cli("run", "--hostfile", "hosts/local.txt", "--model", str(folder / models.parts[given].name),
               "--stages", "2", "-p", "Hello", "-n", "4", env={"PIPEINFER_CACHE": str(cache)})
    assert_clean_failure(done, fragment)
    assert done.returncode == 1
    assert not [path for path in cache.rglob("*") if path.is_file()]  # nothing half-written
