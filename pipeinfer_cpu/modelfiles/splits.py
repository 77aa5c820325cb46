"""Split GGUFs: one model stored as `<name>-00001-of-0000N.gguf` ... `<name>-0000N-of-0000N.gguf`, as
llama.cpp's llama-gguf-split and gguf-py's GGUFWriter(split_max_tensors=...) write it. Every part holds
`split.no` (from 0), `split.count` and `split.tensors.count` (over all parts) and some of the tensors;
the first part also holds all other metadata.

llama.cpp loads a split model from its first part's path, derives the others' names from it
(llama_split_path) and refuses any other part; pipeinfer-cpu does the same. A split model is named by
its first part, which `--mode single`, the vocabulary and the draft hand to llama.cpp; it is checked
here as a whole before anything uses it, and pipeline stages get shard files written from all parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Protocol, TypeVar

from pipeinfer_cpu.errors import ModelError

if TYPE_CHECKING:
    from gguf import GGUFEndian, GGUFReader, ReaderField, ReaderTensor

SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS = "split.no", "split.count", "split.tensors.count"


class Header(Protocol):
    """What this module reads of a GGUF header: a models.GgufHeader (models imports this module, so the
    header reader is passed in, not imported)."""

    @property
    def path(self) -> Path: ...

    @property
    def values(self) -> Mapping[str, object]: ...

    @property
    def tensor_names(self) -> tuple[str, ...]: ...

    def number(self, key: str) -> float: ...


H = TypeVar("H", bound=Header)


@dataclass(frozen=True)
class SplitKeys:
    """What a part of a split model says of itself."""

    no: int  # from 0
    count: int
    n_tensors: int  # over all parts

    def __str__(self) -> str:
        return f"part {self.no + 1} of {self.count} with {self.n_tensors} tensors in all"


def split_keys(header: Header) -> SplitKeys | None:
    """The split keys of a part of a split model; None for a whole model (llama.cpp, too, reads a
    `split.count` of 1 as one)."""
    count = header.values.get(SPLIT_COUNT)
    if not isinstance(count, int) or count <= 1:
        return None
    return SplitKeys(int(header.number(SPLIT_NO)), count, int(header.number(SPLIT_TENSORS)))


def part_paths(path: Path, keys: SplitKeys) -> tuple[Path, ...]:
    """Every part's path, derived from the path of the part that `keys` describe as llama.cpp derives them."""
    suffix = _suffix(keys.no, keys.count)
    if not path.name.endswith(suffix) or path.name == suffix:
        raise ModelError(f"{path} is {keys} of a split GGUF, but its name does not end in {suffix} "
                         f"(llama.cpp finds the other parts by their names)")
    prefix = path.name[:-len(suffix)]
    return tuple(path.with_name(prefix + _suffix(no, keys.count)) for no in range(keys.count))


def _suffix(no: int, count: int) -> str:
    return f"-{no + 1:05d}-of-{count:05d}.gguf"


def read_parts(first: H, read_header: Callable[[Path], H]) -> tuple[H, ...]:
    """The headers of every file of the model whose first file's header is `first`: just it for a whole
    model; else every part, found by name, read with `read_header` and checked as one model (each there,
    a complete GGUF that says it is that part of the same split, every tensor in exactly one part). A
    later part is refused, as llama.cpp refuses it."""
    keys = split_keys(first)
    if keys is None:
        return (first,)
    paths = part_paths(first.path, keys)
    if keys.no != 0:
        raise ModelError(f"{first.path.name} is part {keys.no + 1} of the split GGUF {paths[0].name}: "
                         f"give its first part, from which llama.cpp loads a split model")
    headers = (first, *(_read_part(read_header, path, paths[0], SplitKeys(no, keys.count, keys.n_tensors))
                        for no, path in enumerate(paths[1:], start=1)))
    check_tensors(headers, keys.n_tensors)
    return headers


def _read_part(read_header: Callable[[Path], H], path: Path, first: Path, expected: SplitKeys) -> H:
    if not path.exists():
        raise ModelError(f"{path.name} is missing (split GGUF {first.name} has {expected.count} parts)")
    header = read_header(path)
    found = split_keys(header)
    if found != expected:
        said = "is a whole model" if found is None else f"says {found}"
        raise ModelError(f"{path.name} is not a part of the split GGUF {first.name}: it {said}, "
                         f"expected {expected}")
    return header


def check_tensors(headers: tuple[Header, ...], n_tensors: int) -> None:
    """Every tensor in exactly one part, and as many as `split.tensors.count` says."""
    seen: dict[str, Path] = {}
    for header in headers:
        for name in header.tensor_names:
            if name in seen:
                raise ModelError(f"split GGUF {headers[0].path.name}: tensor {name} appears twice "
                                 f"(in {seen[name].name} and {header.path.name})")
            seen[name] = header.path
    if len(seen) != n_tensors:
        raise ModelError(f"split GGUF {headers[0].path.name}: its parts hold {len(seen)} tensors, "
                         f"its {SPLIT_TENSORS} says {n_tensors}")


@dataclass(frozen=True)
class SplitReader:
    """A split model's parts read as one GGUFReader, as far as shards.write_gguf reads one: the first
    part's metadata without the split keys (a shard is one whole file), every part's tensors in part
    order."""

    fields: Mapping[str, ReaderField]
    tensors: tuple[ReaderTensor, ...]
    endianess: GGUFEndian


def joined(readers: tuple[GGUFReader, ...]) -> GGUFReader | SplitReader:
    """One reader over the readers of a model's files, in part order (the reader itself for a whole model)."""
    if len(readers) == 1:
        return readers[0]
    fields = {name: field for name, field in readers[0].fields.items() if not name.startswith("split.")}
    return SplitReader(fields, tuple(tensor for reader in readers for tensor in reader.tensors),
                       readers[0].endianess)
