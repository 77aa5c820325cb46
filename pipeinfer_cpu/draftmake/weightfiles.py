"""The draft's trained weights in the state folder: float16 .npz files of a few blocks each, so that
each stays under the 16 MiB a file that comes back from the GPU machine may have (no torch here)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

PREFIX = "draft-weights"


def save_weights(weights: Mapping[str, np.ndarray], state: Path, blocks_per_file: int = 2) -> None:
    groups: dict[int, dict[str, np.ndarray]] = {}
    for name, value in weights.items():
        block = int(name.split(".")[1]) if name.startswith("blk.") else 0
        groups.setdefault(block // blocks_per_file, {})[name] = value.astype(np.float16)
    for old in state.glob(f"{PREFIX}-*.npz"):
        old.unlink()
    for i, group in groups.items():
        np.savez(state / f"{PREFIX}-{i}.npz", **group)


def load_draft(state: Path) -> dict[str, np.ndarray] | None:
    """The saved weights as float32 by GGUF name, or None when there are none."""
    files = sorted(state.glob(f"{PREFIX}-*.npz"))
    if not files:
        return None
    return {name: value.astype(np.float32) for f in files for name, value in np.load(f).items()}
