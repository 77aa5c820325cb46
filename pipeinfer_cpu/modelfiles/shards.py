"""Shard files: one GGUF per pipeline stage holding a layer range, cached by source hash and range.

A shard is a normal GGUF model: every metadata key of the source, `<arch>.block_count` set to the
range's size, the blocks `blk.a..blk.(b-1)` renamed to `blk.0..`, and the non-block tensors
(embedding, output norm, output head) kept, with their quantised bytes untouched.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

from pipeinfer_cpu.errors import UserError
from pipeinfer_cpu.files import atomic_output, atomic_write_text
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


def source_hash(path: Path, cache_dir: Path) -> str:
    """SHA-256 of the source model, remembered by (path, size, mtime) so big files are hashed once."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    index_path = cache_dir / "hashes.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if key not in index:
        index[key] = file_sha256(path)
        atomic_write_text(index_path, json.dumps(index, indent=1))
    return index[key]


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
    digest = source_hash(info.path, cache_dir)
    if out_dir is None:
        spans = "_".join(f"{r.start}-{r.end}" for r in ranges)
        out_dir = cache_dir / "shards" / f"{digest[:16]}-{spans}"
    out_dir.mkdir(parents=True, exist_ok=True)
    cached = _load_matching_plan(out_dir, digest, ranges)
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
                                path.stat().st_size, file_sha256(path)))
    plan = ShardPlan(str(info.path.resolve()), digest, info.arch, info.n_layer, tuple(shards))
    atomic_write_text(out_dir / MANIFEST_NAME, plan.to_json())
    return plan


def _load_matching_plan(out_dir: Path, digest: str, ranges: tuple[LayerRange, ...]) -> ShardPlan | None:
    try:
        plan = ShardPlan.from_json((out_dir / MANIFEST_NAME).read_text())
    except (OSError, ValueError, TypeError, KeyError):
        return None
    same = plan.source_sha256 == digest and [(s.start, s.end) for s in plan.shards] == [
        (r.start, r.end) for r in ranges
    ]
    intact = all(Path(s.path).is_file() and Path(s.path).stat().st_size == s.size_bytes for s in plan.shards)
    return plan if same and intact else None


def write_shard(reader, info: ModelInfo, layers: LayerRange, path: Path) -> None:
    """Write the GGUF of one layer range, streaming tensor bytes from the source's memory map."""
    tensors = list(shard_tensors(reader.tensors, layers))
    with atomic_output(path) as tmp:
        write_gguf(reader, info.arch, tmp, tensors, {f"{info.arch}.block_count": layers.size})


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
    """Write a GGUF with the reader's metadata (with `overrides` for uint32 keys) and the given
    (name, tensor) pairs, whose data may be any numpy array of the tensor's raw bytes layout."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch=arch, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        if field.name in overrides:
            continue
        kind = field.types[0]
        sub_type = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub_type)
    for key, value in overrides.items():
        writer.add_uint32(key, int(value))
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
