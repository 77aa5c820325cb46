"""Build (once, cached) and load the C callbacks in callbacks.c; None when no compiler is at hand."""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("callbacks.c")


class Capture(ctypes.Structure):
    """Mirror of `struct pipeinfer_capture`."""

    _fields_ = [("name", ctypes.c_char * 64), ("dest", ctypes.c_void_p),
                ("capacity", ctypes.c_size_t), ("nbytes", ctypes.c_size_t),
                ("input_name", ctypes.c_char * 64), ("input", ctypes.c_void_p),
                ("input_nbytes", ctypes.c_size_t), ("written", ctypes.c_size_t)]


def load_callbacks(ggml_lib_dir: Path, cache_dir: Path) -> ctypes.CDLL | None:
    """The compiled callbacks library, built against llama-cpp-python's ggml, or None."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None or os.environ.get("PIPEINFER_NO_NATIVE"):
        return None
    digest = hashlib.sha256(SOURCE.read_bytes() + str(ggml_lib_dir).encode()).hexdigest()[:16]
    target = cache_dir / "native" / f"callbacks-{digest}.so"
    if not target.exists() and not _build(compiler, ggml_lib_dir, target):
        return None
    try:
        return ctypes.CDLL(str(target))
    except OSError:
        return None


def _build(compiler: str, ggml_lib_dir: Path, target: Path) -> bool:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    command = [compiler, "-O2", "-shared", "-fPIC", str(SOURCE), "-o", tmp, f"-L{ggml_lib_dir}",
               "-lggml-base", f"-Wl,-rpath,{ggml_lib_dir}"]
    try:
        built = subprocess.run(command, capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        built = False
    if built:
        os.replace(tmp, target)
    else:
        Path(tmp).unlink(missing_ok=True)
    return built
