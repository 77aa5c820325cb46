"""Writing files so that a reader never sees half of one: a temporary name, then a rename."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


class atomic_output:
    """Context manager giving a temporary path beside `path`, renamed to `path` only on success."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        self.tmp = temporary_beside(self.path)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            self.tmp.unlink(missing_ok=True)
            return
        try:
            os.chmod(self.tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
            os.replace(self.tmp, self.path)
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise


def temporary_beside(path: Path) -> Path:
    """A new empty file (mode 0600) in `path`'s folder, which is created if missing. Its name is
    hidden and ends in .part, so that no reader takes it for the real file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    return Path(name)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write text durably: flushed and synced before the rename."""
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """`write(tmp)`, then the rename: for writers that want a file name, not a handle (torch.save,
    ONNX exporters, savefig). The temporary name has no real extension, so a writer that goes by it
    must be told the format (savefig's format=; onnx falls back to protobuf, as wanted). Returns
    `path`."""
    path = Path(path)
    with atomic_output(path) as tmp:
        write(tmp)
    return path
