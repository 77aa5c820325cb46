"""Shard files: one GGUF per pipeline stage holding a layer range, cached by source hash and range.

A shard is a normal GGUF model: every metadata key of the source, with what describes layers cut
to the range (`shard_metadata`), the blocks `blk.a..blk.(b-1)` renamed to `blk.0..`, and the
non-block tensors (embedding, output norm, output head) kept, with their quantised bytes untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from pipeinfer_cpu.errors import UserError
from pipeinfer_cpu.files import atomic_output, atomic_write_text
from pipeinfer_cpu.modelfiles.architectures import VERIFIED, swa_flags
from pipeinfer_cpu.modelfiles.models import ModelInfo, file_sha256, open_gguf
from pipeinfer_cpu.modelfiles.planning import LayerRange

MANIFEST_NAME = "manifest.json"
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class ShardFile:
    """One written shard: its layer range, file and content hash."""

    index: int
    start: int
    end: int
    path: str
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class ShardPlan:
    """The manifest of a sharded model: where each stage's layers live."""

    source_path: str
    source_sha256: str
    arch: str
    n_layer: int
    shards: tuple[ShardFile, ...]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @staticmethod
    def from_json(text: str) -> "ShardPlan":
        data = json.loads(text)
        data["shards"] = tuple(ShardFile(**s) for s in data["shards"])
        return ShardPlan(**data)


def default_cache_dir() -> Path:
    base = os.environ.get("PIPEINFER_CACHE") or os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "pipeinfer-cpu"


def source_hash(files: tuple[Path, ...], cache_dir: Path) -> str:
    """SHA-256 of the source model's file, or of its parts' hashes for a split GGUF (so that a changed
    part changes it)."""
    hashes = remembered_sha256(files, cache_dir)
    return hashes[0] if len(hashes) == 1 else hashlib.sha256("\n".join(hashes).encode()).hexdigest()


def remembered_sha256(files: Sequence[Path], cache_dir: Path) -> list[str]:
    """SHA-256 of each file, remembered in the cache by (path, size, mtime): a big file is hashed once,
    and again once it changes."""
    keys = [_hash_key(path) for path in files]
    index_path = cache_dir / "hashes.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if any(key not in index for key in keys):
        index.update({key: file_sha256(path) for key, path in zip(keys, files) if key not in index})
        atomic_write_text(index_path, json.dumps(index, indent=1))
    return [index[key] for key in keys]


def shard_intact(path: Path, shard: ShardFile, cache_dir: Path) -> bool:
    """Is the file at `path` this shard, byte for byte (a shard edited or damaged on disk is not)?"""
    return check_readable(path, shard.size_bytes) and remembered_sha256((path,), cache_dir)[0] == shard.sha256


def _hash_key(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def shard_model(
    info: ModelInfo,
    ranges: tuple[LayerRange, ...],
    out_dir: Path | None = None,
    cache_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> ShardPlan:
    """Write one GGUF per layer range (or reuse the cached ones) and a manifest; return the plan.

    Without `out_dir` the shards go to the cache, under the source hash and the ranges, so a second
    run with the same split writes nothing.
    """
    cache_dir = cache_dir or default_cache_dir()
    digest = source_hash(info.files, cache_dir)
    if out_dir is None:
        spans = "_".join(f"{r.start}-{r.end}" for r in ranges)
        out_dir = cache_dir / "shards" / f"{digest[:16]}-{spans}"
    out_dir.mkdir(parents=True, exist_ok=True)
    cached = _load_matching_plan(out_dir, digest, ranges, cache_dir)
    if cached is not None:
        return cached
    reader = open_gguf(info.path)
    shards = []
    for index, layer_range in enumerate(ranges):
        path = out_dir / f"{info.path.stem}.stage{index}-L{layer_range.start}-{layer_range.end}.gguf"
        if progress:
            progress(f"writing shard {index} (layers {layer_range}) to {path}")
        write_shard(reader, info, layer_range, path)
        shards.append(ShardFile(index, layer_range.start, layer_range.end, str(path.resolve()),
                                path.stat().st_size, remembered_sha256((path,), cache_dir)[0]))
    plan = ShardPlan(str(info.path.resolve()), digest, info.arch, info.n_layer, tuple(shards))
    atomic_write_text(out_dir / MANIFEST_NAME, plan.to_json())
    return plan


def _load_matching_plan(out_dir: Path, digest: str, ranges: tuple[LayerRange, ...], cache_dir: Path) -> ShardPlan | None:
    try:
        plan = ShardPlan.from_json((out_dir / MANIFEST_NAME).read_text())
    except (OSError, ValueError, TypeError, KeyError):
        return None
    same = plan.source_sha256 == digest and [(s.start, s.end) for s in plan.shards] == [
        (r.start, r.end) for r in ranges
    ]
    intact = all(shard_intact(Path(s.path), s, cache_dir) for s in plan.shards)
    return plan if same and intact else None


def write_shard(reader, info: ModelInfo, layers: LayerRange, path: Path) -> None:
    """Write the GGUF of one layer range, streaming tensor bytes from the source's memory map."""
    tensors = list(shard_tensors(reader.tensors, layers))
    values = {field.name: field.contents() for field in reader.fields.values()
              if field.name.startswith(f"{info.arch}.")}
    with atomic_output(path) as tmp:
        write_gguf(reader, info.arch, tmp, tensors, shard_metadata(info.arch, values, layers))


def shard_metadata(arch: str, values: Mapping[str, object], layers: LayerRange) -> dict[str, object]:
    """The metadata a shard of `layers` changes: its block count, every per-layer array (a numeric
    `<arch>.` array as long as the model is deep) cut to the range, and the sliding-window pattern
    as one flag per layer, since llama.cpp counts a period from the file's first layer."""
    overrides: dict[str, object] = {f"{arch}.block_count": layers.size}
    for key, value in values.items():
        if (key.startswith(f"{arch}.") and isinstance(value, list) and len(value) == layers.n_layer
                and all(isinstance(item, (int, float)) for item in value)):
            overrides[key] = value[layers.start:layers.end]
    spec = VERIFIED.get(arch)
    if spec is not None and spec.swa_period is not None:
        key = f"{arch}.attention.sliding_window_pattern"
        overrides[key] = swa_flags(values.get(key), spec.swa_period, layers.n_layer)[layers.start:layers.end]
    return overrides


def shard_tensors(tensors: Iterable, layers: LayerRange):
    """(new name, tensor) for every tensor a shard of `layers` keeps, blocks renumbered from 0."""
    for tensor in tensors:
        match = _BLOCK.match(tensor.name)
        if match is None:
            yield tensor.name, tensor
            continue
        block = int(match[1])
        if layers.start <= block < layers.end:
            yield f"blk.{block - layers.start}.{match[2]}", tensor


def write_gguf(reader, arch: str, path: Path, tensors: list, overrides: dict) -> None:
    """Write a GGUF with the reader's metadata, replaced or added by `overrides` (an int: uint32; a
    list of bools: a bool array; another list: an array of the source key's item type), and the
    given (name, tensor) pairs, whose data may be any numpy array of the tensor's raw bytes layout."""
    import gguf

    array, sources = gguf.GGUFValueType.ARRAY, {field.name: field for field in reader.fields.values()}
    writer = gguf.GGUFWriter(str(path), arch=arch, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        if field.name in overrides:
            continue
        kind = field.types[0]
        writer.add_key_value(field.name, field.contents(), kind, sub_type=field.types[-1] if kind == array else None)
    for key, value in overrides.items():
        if not isinstance(value, list):
            writer.add_uint32(key, int(value))
        elif all(isinstance(item, bool) for item in value):
            writer.add_key_value(key, value, array, sub_type=gguf.GGUFValueType.BOOL)
        else:
            writer.add_key_value(key, value, array, sub_type=sources[key].types[-1])
    for name, tensor in tensors:
        data = tensor.data
        writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, tensor in tensors:
        writer.write_tensor_data(tensor.data)
    writer.close()


def check_readable(path: Path, size_bytes: int) -> bool:
    """True when this host can read a file at `path` of the expected size."""
    try:
        return path.is_file() and os.access(path, os.R_OK) and path.stat().st_size == size_bytes
    except OSError:
        return False


def verify_shard(path: Path, expected_sha256: str) -> None:
    actual = file_sha256(path)
    if actual != expected_sha256:
        raise UserError(f"shard {path} is corrupt: sha256 {actual[:12]}…, expected {expected_sha256[:12]}…")
