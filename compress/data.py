"""CIFAR-10 loading from the project's JPEG zips, an unzipped folder of the same layout, or the
original `cifar-10-batches-py`; the seeded held-out split used by the search reward."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from compress.errors import DataError

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
ENV_VAR = "PIPEINFER_CIFAR10"
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8, (N, 32, 32, 3)
    labels: np.ndarray  # int64, (N,)

    def subset(self, idx: np.ndarray) -> "Split":
        return Split(self.images[idx], self.labels[idx])


def default_root() -> Path:
    """$PIPEINFER_CIFAR10, else ../shared/datasets/cifar10 beside the repository root."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cifar10"


def _decode(blob: bytes, where: str) -> np.ndarray:
    try:
        img = Image.open(io.BytesIO(blob)).convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"corrupt image {where}: {err}") from err
    if img.size != (32, 32):
        raise DataError(f"image {where} is {img.size[0]}x{img.size[1]}, expected 32x32")
    return np.asarray(img, dtype=np.uint8)


def _select(names: list[str], limit: int | None) -> list[str]:
    return sorted(names)[:limit] if limit is not None else sorted(names)


def _stack(images: list[np.ndarray], labels: list[int], where: Path) -> Split:
    if not images:
        raise DataError(f"no images found in {where}")
    return Split(np.stack(images), np.asarray(labels, dtype=np.int64))


def _from_zip(path: Path, split: str, limit: int | None) -> Split:
    try:
        with zipfile.ZipFile(path) as zf:
            members = [n for n in zf.namelist() if n.lower().endswith((".jpg", ".jpeg", ".png"))]
            images, labels = [], []
            for label, cls in enumerate(CLASSES):
                prefix = f"{split}/{cls}/"
                for name in _select([n for n in members if n.startswith(prefix)], limit):
                    images.append(_decode(zf.read(name), f"{path.name}:{name}"))
                    labels.append(label)
    except (zipfile.BadZipFile, OSError) as err:
        raise DataError(f"cannot read {path}: {err}") from err
    return _stack(images, labels, path)


def _from_folder(folder: Path, limit: int | None) -> Split:
    images, labels = [], []
    for label, cls in enumerate(CLASSES):
        files = [p.name for p in (folder / cls).glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
        for name in _select(files, limit):
            images.append(_decode((folder / cls / name).read_bytes(), str(folder / cls / name)))
            labels.append(label)
    return _stack(images, labels, folder)


def _from_batches(folder: Path, split: str, limit: int | None) -> Split:
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for name in files:
        try:
            with open(folder / name, "rb") as fh:
                batch = pickle.load(fh, encoding="bytes")
            data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError) as err:
            raise DataError(f"cannot read CIFAR batch {folder / name}: {err}") from err
        images.append(data.transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    split_data = Split(np.concatenate(images), np.concatenate(labels))
    if limit is None:
        return split_data
    idx = np.concatenate([np.flatnonzero(split_data.labels == c)[:limit] for c in range(len(CLASSES))])
    return split_data.subset(idx)


def load_split(root: str | Path | None, split: str, limit_per_class: int | None = None) -> Split:
    """Load `split` ('train' or 'test') from whichever supported layout `root` holds.

    Order is deterministic (class, then file name), so seeded splits are reproducible."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
    root = Path(root) if root is not None else default_root()
    if not root.is_dir():
        raise DataError(f"CIFAR-10 folder not found: {root} (set {ENV_VAR} or pass --data)")
    for batches in (root / "cifar-10-batches-py", root):
        if (batches / "test_batch").exists():
            return _from_batches(batches, split, limit_per_class)
    if (root / f"cifar10-{split}.zip").exists():
        return _from_zip(root / f"cifar10-{split}.zip", split, limit_per_class)
    if (root / split).is_dir():
        return _from_folder(root / split, limit_per_class)
    raise DataError(f"no CIFAR-10 {split} data in {root}: expected cifar10-{split}.zip, a {split}/ "
                    "folder of class subfolders, or cifar-10-batches-py")


def holdout_split(labels: np.ndarray, n_holdout: int = 5000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded (train_idx, holdout_idx); the holdout feeds the search reward only."""
    if not 0 < n_holdout < len(labels):
        raise DataError(f"cannot hold out {n_holdout} of {len(labels)} training images")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = n_holdout // len(classes)
    if per_class == 0:
        raise DataError(f"cannot hold out {n_holdout} images across {len(classes)} classes")
    held = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes]
    held_idx = np.sort(np.concatenate(held))
    mask = np.ones(len(labels), dtype=bool)
    mask[held_idx] = False
    return np.flatnonzero(mask), held_idx
